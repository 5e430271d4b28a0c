"""`repository.relay_inbox_changes` on SQLite: which items a pass publishes, and under which
version, when a publication fails and when a digest's delivery is reported."""

from __future__ import annotations

import functools
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import timedelta

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from herald_shared.database import make_engine
from herald_shared.events import (
    Channel,
    DeliveryOutcome,
    DeliveryReported,
    EmailRequested,
    InboxItem,
    InboxState,
)
from notification_router import repository, routing, schedule
from notification_router.inbox import items_of
from tests.support.router_factories import NOW, message_created, user_updated


@pytest.fixture
async def engine(migrated_sqlite_url: Callable[[str], str]) -> AsyncIterator[AsyncEngine]:
    engine = make_engine(migrated_sqlite_url("notification-router"))
    yield engine
    await engine.dispose()


class Published:
    """What the relay handed to the broker, (version, item) in order; `fail`: a publication
    that raises after the broker got its events (a confirm that timed out)."""

    def __init__(self) -> None:
        self.items: list[tuple[int, InboxItem]] = []
        self.fail = False

    async def __call__(self, version: int, rows: repository.InboxRows) -> None:
        self.items.extend((version, item) for item in items_of(rows))
        if self.fail:
            raise TimeoutError("no confirm from the broker")

    def take(self) -> list[tuple[int, InboxItem]]:
        items, self.items = self.items, []
        return items


async def relay(engine: AsyncEngine, published: Published) -> int:
    return await repository.relay_inbox_changes(engine, limit=100, publish=published)


async def decide(engine: AsyncEngine, **preferences: object) -> tuple[uuid.UUID, list[uuid.UUID]]:
    """Bob (no device) and two messages to him, decided: (Bob, the messages)."""
    snapshot = user_updated(display_name="Bob", devices=0, **preferences)  # type: ignore[arg-type]
    await repository.upsert_recipient(engine, snapshot, now=NOW)
    bob = routing.Recipient.from_snapshot(snapshot)
    events = [message_created(recipient_ids=[bob.user_id], timestamp=NOW) for _ in range(2)]
    plans = [
        (event, routing.plan_notifications(event, {bob.user_id: bob}, now=NOW).decisions)
        for event in events
    ]
    await repository.record_decisions(engine, plans, now=NOW)
    return bob.user_id, [event.message_id for event in events]


def email_of(item: InboxItem) -> tuple[InboxState, str | None]:
    [email] = [delivery for delivery in item.deliveries if delivery.channel is Channel.EMAIL]
    return email.state, email.reason


async def test_a_publication_that_failed_after_the_broker_got_it_never_lends_its_version(
    engine: AsyncEngine,
) -> None:
    bob, messages = await decide(engine)
    published = Published()
    published.fail = True
    with pytest.raises(TimeoutError):
        await relay(engine, published)
    [(failed, _), _] = published.take()  # delivered all the same

    published.fail = False
    assert await relay(engine, published) == 2  # the changes were left for this pass

    again = published.take()
    assert {(item.user_id, item.message_id) for _, item in again} == {
        (bob, message) for message in messages
    }
    assert {version for version, _ in again} == {failed + 1}


async def test_a_state_published_after_a_failed_publication_goes_out_under_a_higher_version(
    engine: AsyncEngine,
) -> None:
    """The broker got the pass's events though its publication failed; the item changes since
    (its push is reported): its next publication must win over the one that got through."""
    snapshot = user_updated(display_name="Bob", devices=1, email_enabled=False)
    await repository.upsert_recipient(engine, snapshot, now=NOW)
    bob = routing.Recipient.from_snapshot(snapshot)
    event = message_created(recipient_ids=[bob.user_id], timestamp=NOW)
    plan = routing.plan_notifications(event, {bob.user_id: bob}, now=NOW)
    await repository.record_decisions(engine, [(event, plan.decisions)], now=NOW)
    published = Published()
    published.fail = True
    with pytest.raises(TimeoutError):
        await relay(engine, published)
    [job] = plan.decisions[0].jobs
    await repository.apply_delivery_reports(
        engine,
        [
            DeliveryReported(
                notification_id=job.notification_id,
                message_id=event.message_id,
                recipient_id=bob.user_id,
                channel=Channel.PUSH,
                outcome=DeliveryOutcome.DELIVERED,
            )
        ],
        now=NOW,
    )
    published.fail = False
    await relay(engine, published)

    # message-service applies an item only under a version higher than the one it has.
    [(first, pending), (second, sent)] = published.take()
    assert [d.state for d in pending.deliveries if d.channel is Channel.PUSH] == [
        InboxState.PENDING
    ]
    assert [d.state for d in sent.deliveries if d.channel is Channel.PUSH] == [InboxState.SENT]
    assert second > first


async def test_a_digests_delivery_report_is_published_to_every_message_it_told_of(
    engine: AsyncEngine,
) -> None:
    bob, messages = await decide(engine, email_delay=120)
    published = Published()
    await relay(engine, published)
    assert [email_of(item)[0] for _, item in published.take()] == [InboxState.BATCHED] * 2

    later = NOW + timedelta(minutes=10)
    [window] = await repository.close_due_windows(
        engine,
        now=later,
        limit=10,
        resend_after=schedule.RESEND_AFTER,
        compose=functools.partial(schedule.compose, now=later),
    )
    [digest] = window.jobs
    assert isinstance(digest, EmailRequested)
    assert len(digest.digest) == 2
    await repository.mark_windows_sent(engine, [window.window_id])
    await relay(engine, published)
    assert {email_of(item)[0] for _, item in published.take()} == {InboxState.PENDING}

    await repository.apply_delivery_reports(
        engine,
        [
            DeliveryReported(
                notification_id=digest.notification_id,
                message_id=digest.message_id,  # the digest's first message
                recipient_id=bob,
                channel=Channel.EMAIL,
                outcome=DeliveryOutcome.DELIVERED,
            )
        ],
        now=later,
    )
    assert await relay(engine, published) == 2

    reported = {item.message_id: email_of(item) for _, item in published.take()}
    tag = f"digest:{window.window_id}"
    assert reported == {message: (InboxState.SENT, tag) for message in messages}
    assert await repository.inbox_backlog(engine) == 0
