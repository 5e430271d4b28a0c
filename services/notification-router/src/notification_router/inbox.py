"""The inbox relay: every router replica publishes, a few times a second, the inbox items (one
per user and message) whose ledger rows changed, each whole, as `InboxItemsUpdated` events that
message-service projects into users' inboxes.

Which items changed is a log the database writes itself (triggers on the ledger's tables, router
revision 0010), committed with the change. A change waits one pass (so that an item's decision
and its delivery report, which usually come within that, are published together), then a pass
(`repository.relay_inbox_changes`) takes the oldest due items with all their changes (and, for
an item holding a digest's or a held-push summary's delivery row, which names the window's first
message only, every item of that window), reads those items as they are then, publishes them
under a new version and deletes the changes: a crash or a broker outage leaves the changes for a
later pass, and a later pass always carries a state at least as new under a higher version. A
version, once handed to a publication, is never handed out again, even if that publication
failed: its events may have reached the broker all the same. So message-service keeps, per
item, the highest version it saw: a replayed or late event changes nothing, and a lost one is
superseded by the next.

`item_of` is pure: what the ledger's rows mean to a user, per channel and device (the states and
reason codes the inbox shows).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from faststream.rabbit.publisher import RabbitPublisher
from sqlalchemy.ext.asyncio import AsyncEngine

from herald_shared.events import (
    INBOX_REASON_MAX,
    Channel,
    InboxDelivery,
    InboxItem,
    InboxItemsUpdated,
    InboxState,
    Trigger,
    chunks,
)
from herald_shared.periodic import PeriodicTask
from herald_shared.publishing import publish_events
from notification_router import repository
from notification_router.routing import WAITING, DeliveryStatus, SkipReason

logger = logging.getLogger("notification_router.inbox")

# The reason codes of what was decided against, or cancelled while it waited.
_REASONS: Mapping[str, str] = {
    SkipReason.PUSH_DISABLED: "level:none",
    SkipReason.EMAIL_DISABLED: "level:none",
    SkipReason.LEVEL_MENTIONS: "level:mentions",
}
SKIPPED_PREFIX = "skipped:"
# Items made between two turns of the event loop. A publication's 500 made at once held the
# router's loop, and the direct messages waiting on it, for 50 ms and more on a busy 2-core
# machine (the lanes benchmark's loop lag).
ITEMS_PER_TURN = 100
CANCELLED_PREFIX = "cancelled:"


def _reason(code: str) -> str:
    return _REASONS.get(code, code)


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)  # SQLite: naive UTC


def _utc_or_none(value: datetime | None) -> datetime | None:
    return None if value is None else _utc(value)


def _delivery_state(row: Any) -> tuple[InboxState, str | None, datetime | None]:
    """A delivery row's state, reason and time of acceptance."""
    if row.status == DeliveryStatus.DELIVERED:
        return InboxState.SENT, None, _utc(row.updated_at)
    if row.status == DeliveryStatus.FAILED:
        # Cut to fit: the ledger keeps up to `repository.REASON_MAX_CHARS` of the sender's reason,
        # and an item that fails validation would stop every relay pass after it.
        reason = f"provider:{row.reason or 'unknown'}"[:INBOX_REASON_MAX]
        return InboxState.FAILED, reason, None
    return InboxState.PENDING, None, None


def item_of(
    decision: Any,
    deliveries: Sequence[Any],
    windows: Sequence[Any],
    digests: Mapping[uuid.UUID, Any],
) -> InboxItem:
    """One user's item for one message, from the ledger: per channel, what was decided and what
    became of it (per device for pushes sent at once)."""
    decided_at = _utc(decision.decided_at)
    by_channel = {row.channel: row for row in windows}
    recall = by_channel.get(repository.RECALL_WINDOW)
    recalled_at = None
    if recall is not None and recall.state == repository.WINDOW_SENT:
        recalled_at = _utc_or_none(recall.closed_at)
    result: list[InboxDelivery] = []
    for channel, decided in (
        (Channel.PUSH, decision.push_decision),
        (Channel.EMAIL, decision.email_decision),
    ):
        base = {"channel": channel, "decided_at": decided_at}
        if decided.startswith(SKIPPED_PREFIX):
            code = _reason(decided.removeprefix(SKIPPED_PREFIX))
            result.append(InboxDelivery(**base, state=InboxState.SUPPRESSED, reason=code))
            continue
        window = by_channel.get(str(channel))
        if decided == WAITING and window is not None:
            result.append(InboxDelivery(**base, **_waited(channel, window, digests)))
            continue
        # Sent at once: the deliveries of this message itself (not a digest's, a summary's or a
        # recall's, whose rows may name this message too).
        own = [
            row
            for row in deliveries
            if row.channel == channel and not _is_window_target(row.target)
        ]
        if not own:
            result.append(InboxDelivery(**base, state=InboxState.PENDING))
            continue
        for row in sorted(own, key=lambda row: row.target):
            state, reason, accepted_at = _delivery_state(row)
            if state is InboxState.SENT and recalled_at is not None and channel is Channel.PUSH:
                state = InboxState.RECALLED
            result.append(
                InboxDelivery(
                    **base,
                    device_id=uuid.UUID(row.target) if row.target else None,
                    state=state,
                    reason=reason,
                    accepted_at=accepted_at,
                    recalled_at=recalled_at if state is InboxState.RECALLED else None,
                )
            )
    return InboxItem(
        user_id=decision.recipient_id,
        message_id=decision.message_id,
        room_id=decision.room_id,
        trigger=Trigger(decision.trigger or Trigger.MESSAGE),
        decided_at=decided_at,
        message_created_at=_utc_or_none(decision.message_created_at),
        deliveries=result,
    )


def _is_window_target(target: str) -> bool:
    return target == repository.DIGEST_TARGET or target.startswith(
        (repository.HELD_PUSH_PREFIX, repository.RECALL_PREFIX)
    )


def _waited(channel: Channel, window: Any, digests: Mapping[uuid.UUID, Any]) -> dict[str, Any]:
    """What became of a channel that waited in a window: still waiting (deferred for quiet
    hours, batched for a digest), cancelled, or sent when the window ended."""
    due_at = _utc_or_none(window.due_at)
    tag = f"digest:{window.window_id}" if channel is Channel.EMAIL else "quiet_hours"
    if window.state == WAITING:
        state = InboxState.BATCHED if channel is Channel.EMAIL else InboxState.DEFERRED
        return {"state": state, "reason": tag, "due_at": due_at}
    if window.state.startswith(CANCELLED_PREFIX):
        code = _reason(window.state.removeprefix(CANCELLED_PREFIX))
        return {"state": InboxState.CANCELLED, "reason": code, "due_at": due_at}
    digest = digests.get(window.window_id) if channel is Channel.EMAIL else None
    if digest is None:
        # Pushes held for quiet hours go out as one summary per room and device when they end.
        return {"state": InboxState.SENT, "reason": tag, "due_at": due_at}
    state, reason, accepted_at = _delivery_state(digest)
    return {"state": state, "reason": reason or tag, "due_at": due_at, "accepted_at": accepted_at}


def items_of(rows: repository.InboxRows) -> list[InboxItem]:
    """Every item the rows hold (an item whose decision row is gone has nothing to show)."""
    return list(_items(rows))


async def items_in_turns(rows: repository.InboxRows) -> list[InboxItem]:
    """`items_of`, letting the event loop run other work every `ITEMS_PER_TURN` items."""
    items: list[InboxItem] = []
    for item in _items(rows):
        items.append(item)
        if len(items) % ITEMS_PER_TURN == 0:
            await asyncio.sleep(0)
    return items


def _items(rows: repository.InboxRows) -> Iterator[InboxItem]:
    deliveries: dict[tuple[uuid.UUID, uuid.UUID], list[Any]] = defaultdict(list)
    for row in rows.deliveries:
        deliveries[(row.recipient_id, row.message_id)].append(row)
    windows: dict[tuple[uuid.UUID, uuid.UUID], list[Any]] = defaultdict(list)
    for row in rows.windows:
        windows[(row.recipient_id, row.message_id)].append(row)
    for decision in rows.decisions:
        key = (decision.recipient_id, decision.message_id)
        yield item_of(decision, deliveries[key], windows[key], rows.digests)


class InboxRelay:
    """The periodic pass of one replica (`INBOX_RELAY_INTERVAL`); see the module's docstring."""

    def __init__(
        self,
        *,
        engine: AsyncEngine,
        publishers: Mapping[str, RabbitPublisher],
        publish_timeout: float,
        interval: float,
        batch_size: int,
    ) -> None:
        self._engine = engine
        self._publishers = publishers
        self._publish_timeout = publish_timeout
        self._batch_size = batch_size
        # The log's newest change at the previous pass: what is due at this one.
        self._seen = 0
        self._loop = PeriodicTask(
            self.relay_once,
            interval=interval,
            name="notification-router-inbox",
            logger=logger,
            failure="router.inbox.relay_failed",
        )

    async def _publish(self, version: int, rows: repository.InboxRows) -> None:
        items = await items_in_turns(rows)
        events = [InboxItemsUpdated(version=version, items=list(part)) for part in chunks(items)]
        await publish_events(events, self._publishers, timeout=self._publish_timeout)

    async def relay_once(self, *, settle: bool = True) -> int:
        """Passes until no due item is left (or another replica holds the relay); how many
        items were published. With `settle`, a change waits for the next pass (`interval`
        later) before it is due: an item whose decision and delivery report come within it
        (the common case) is published once, not twice."""
        head = await repository.inbox_change_head(self._engine)
        up_to, self._seen = (self._seen, head) if settle else (None, head)
        if up_to == 0:
            # The log was empty at the previous pass, so nothing in it is due yet: an idle pass
            # (every INBOX_RELAY_INTERVAL) is then this one read, not a transaction of two more.
            return 0
        relayed = 0
        while True:
            taken = await repository.relay_inbox_changes(
                self._engine, limit=self._batch_size, publish=self._publish, up_to=up_to
            )
            relayed += taken
            if taken < self._batch_size:
                return relayed

    @property
    def running(self) -> bool:
        return self._loop.running

    def start(self) -> None:
        self._loop.start()

    async def stop(self, timeout: float = 5.0) -> None:
        await self._loop.stop(timeout)
