"""`inbox.item_of`: what the ledger's rows of one user and message mean in their inbox, per
channel and device, one row of this table per case."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest

from herald_shared.events import INBOX_REASON_MAX, Channel, InboxState, Trigger
from notification_router.inbox import ITEMS_PER_TURN, item_of, items_in_turns, items_of
from notification_router.repository import (
    DIGEST_TARGET,
    REASON_MAX_CHARS,
    RECALL_PREFIX,
    RECALL_WINDOW,
    InboxRows,
)

DECIDED = datetime(2026, 12, 2, 9, 0, tzinfo=UTC)
USER, MESSAGE, ROOM, DEVICE = uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
WINDOW = uuid.uuid4()


def decision(push: str, email: str, trigger: str | None = "message") -> Any:
    return SimpleNamespace(
        recipient_id=USER,
        message_id=MESSAGE,
        room_id=ROOM,
        trigger=trigger,
        push_decision=push,
        email_decision=email,
        # SQLite hands back naive UTC: read as UTC.
        decided_at=DECIDED.replace(tzinfo=None),
        message_created_at=DECIDED - timedelta(seconds=1),
    )


def delivery(channel: str, target: str, status: str, reason: str | None = None) -> Any:
    return SimpleNamespace(
        channel=channel,
        target=target,
        status=status,
        reason=reason,
        updated_at=DECIDED + timedelta(seconds=2),
    )


def window(channel: str, state: str, closed: bool = False) -> Any:
    return SimpleNamespace(
        channel=channel,
        state=state,
        window_id=WINDOW,
        due_at=DECIDED + timedelta(minutes=2),
        closed_at=DECIDED + timedelta(minutes=2) if closed else None,
    )


PUSHED = delivery("push", str(DEVICE), "delivered")
# (push decision, email decision, deliveries, windows, digests) → (push, email) as
# (state, reason, device).
CASES = {
    "pushed and accepted, e-mail below the level": (
        ("pending", "skipped:level_mentions", [PUSHED], [], {}),
        ((InboxState.SENT, None, DEVICE), (InboxState.SUPPRESSED, "level:mentions", None)),
    ),
    "refused by the provider, e-mail on its way": (
        (
            "pending",
            "pending",
            [
                delivery("push", str(DEVICE), "failed", "UNREGISTERED"),
                delivery("email", "", "pending"),
            ],
            [],
            {},
        ),
        ((InboxState.FAILED, "provider:UNREGISTERED", DEVICE), (InboxState.PENDING, None, None)),
    ),
    "muted room, level none": (
        ("skipped:muted", "skipped:email_disabled", [], [], {}),
        ((InboxState.SUPPRESSED, "muted", None), (InboxState.SUPPRESSED, "level:none", None)),
    ),
    "room in view, online": (
        ("skipped:active_in_room", "skipped:online", [], [], {}),
        (
            (InboxState.SUPPRESSED, "active_in_room", None),
            (InboxState.SUPPRESSED, "online", None),
        ),
    ),
    "held for quiet hours, gathered for a digest": (
        ("waiting", "waiting", [], [window("push", "waiting"), window("email", "waiting")], {}),
        (
            (InboxState.DEFERRED, "quiet_hours", None),
            (InboxState.BATCHED, f"digest:{WINDOW}", None),
        ),
    ),
    "read before the digest": (
        ("skipped:no_device", "waiting", [], [window("email", "cancelled:read", True)], {}),
        ((InboxState.SUPPRESSED, "no_device", None), (InboxState.CANCELLED, "read", None)),
    ),
    "digest accepted, its row not this message's push": (
        (
            "skipped:level_mentions",
            "waiting",
            [delivery("email", DIGEST_TARGET, "delivered")],
            [window("email", "sent", True)],
            {WINDOW: delivery("email", DIGEST_TARGET, "delivered")},
        ),
        (
            (InboxState.SUPPRESSED, "level:mentions", None),
            (InboxState.SENT, f"digest:{WINDOW}", None),
        ),
    ),
    "pushed, then recalled by a read elsewhere": (
        (
            "pending",
            "skipped:level_mentions",
            [PUSHED, delivery("push", f"{RECALL_PREFIX}{DEVICE}", "delivered")],
            [window(RECALL_WINDOW, "sent", True)],
            {},
        ),
        ((InboxState.RECALLED, None, DEVICE), (InboxState.SUPPRESSED, "level:mentions", None)),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_channel_gets_its_state_and_reason(case: str) -> None:
    (push, email, deliveries, windows, digests), expected = CASES[case]

    item = item_of(decision(push, email), deliveries, windows, digests)

    by_channel = {
        channel: [d for d in item.deliveries if d.channel is channel] for channel in Channel
    }
    assert [
        (d.state, d.reason, d.device_id)
        for d in by_channel[Channel.PUSH] + by_channel[Channel.EMAIL]
    ] == list(expected)
    assert all(d.decided_at == DECIDED for d in item.deliveries)


def test_times_follow_the_rows() -> None:
    recalled = item_of(
        decision("pending", "skipped:online"),
        [PUSHED],
        [window(RECALL_WINDOW, "sent", True)],
        {},
    )
    [push] = [d for d in recalled.deliveries if d.channel is Channel.PUSH]
    assert push.accepted_at == DECIDED + timedelta(seconds=2)
    assert push.recalled_at == DECIDED + timedelta(minutes=2)
    waiting = item_of(decision("skipped:online", "waiting"), [], [window("email", "waiting")], {})
    [email] = [d for d in waiting.deliveries if d.channel is Channel.EMAIL]
    assert (email.due_at, email.accepted_at) == (DECIDED + timedelta(minutes=2), None)


def test_the_longest_reason_the_ledger_keeps_still_makes_an_item() -> None:
    # The ledger keeps 200 characters of a sender's reason; with `provider:` in front, an item
    # that kept it whole would fail validation and stop the relay at that item for good.
    kept = "E" * REASON_MAX_CHARS
    item = item_of(
        decision("pending", "skipped:level_mentions"),
        [delivery("push", str(DEVICE), "failed", kept)],
        [],
        {},
    )
    [push] = [d for d in item.deliveries if d.channel is Channel.PUSH]
    assert push.state is InboxState.FAILED
    assert push.reason == f"provider:{kept}"[:INBOX_REASON_MAX]


def test_a_decision_from_before_triggers_reads_as_a_plain_message() -> None:
    item = item_of(decision("pending", "pending", trigger=None), [], [], {})
    assert item.trigger is Trigger.MESSAGE
    assert [d.state for d in item.deliveries] == [InboxState.PENDING, InboxState.PENDING]
    assert (item.user_id, item.message_id, item.room_id) == (USER, MESSAGE, ROOM)


async def test_a_publications_items_are_made_a_hundred_per_turn_of_the_event_loop() -> None:
    decisions = [
        SimpleNamespace(
            **{**vars(decision("pending", "skipped:email_disabled")), "recipient_id": user}
        )
        for user in (uuid.uuid4() for _ in range(2 * ITEMS_PER_TURN + 1))
    ]
    deliveries = [
        SimpleNamespace(**vars(PUSHED), recipient_id=row.recipient_id, message_id=MESSAGE)
        for row in decisions
    ]
    rows = InboxRows(decisions, deliveries, [], {})
    turns = 0

    async def count_turns() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    counting = asyncio.create_task(count_turns())
    await asyncio.sleep(0)  # counting's first turn
    made = await items_in_turns(rows)
    counting.cancel()

    assert made == items_of(rows)
    assert [item.user_id for item in made] == [row.recipient_id for row in decisions]
    assert turns == 1 + 2  # the loop ran other work twice while 201 items were made
