"""The inbox relay on the machine's real PostgreSQL and RabbitMQ: the ledger's triggers log every
change of an item, the relay publishes each changed item whole under a growing version and
forgets the changes, and a failed publication leaves them for the next pass."""

from __future__ import annotations

import functools
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta

import pytest
from faststream import TestApp
from sqlalchemy import event, func, select

from herald_shared.broker import RabbitSettings
from herald_shared.events import (
    Channel,
    DeliveryOutcome,
    DeliveryReported,
    InboxDelivery,
    InboxItem,
    InboxItemsUpdated,
    InboxState,
    Level,
    Trigger,
    utc_now,
)
from herald_shared.retention import RetentionTask
from herald_shared.topology import INBOX_UPDATES
from notification_router import repository, schedule
from notification_router.app import RouterService, build_service
from notification_router.handlers import record_reports, route_messages
from notification_router.settings import Settings
from notification_router.tables import (
    inbox_changes,
    inbox_relay,
    notification_deliveries,
    notifications,
    window_entries,
)
from tests.integration.notification_router.test_router import drain, projected, publish, push_jobs
from tests.support.infra import wait_until
from tests.support.router_factories import message_created, user_updated


@pytest.fixture
async def service(pg_url: str, rabbit_url: str) -> AsyncIterator[RouterService]:
    settings = Settings(
        database_url=pg_url,
        rabbitmq=RabbitSettings(url=rabbit_url, retry_delays=(0.2, 0.4), prefetch=10),
    )
    service = build_service(settings)
    async with TestApp(service.app):
        await service.inbox.stop()  # the tests run the passes themselves
        yield service


async def published_items(rabbit_url: str) -> list[tuple[int, InboxItem]]:
    """The items the relay published, with their version, in order."""
    events = [
        InboxItemsUpdated.model_validate_json(message.body)
        for message in await drain(rabbit_url, INBOX_UPDATES.name)
    ]
    return [(event.version, item) for event in events for item in event.items]


async def changes_left(service: RouterService) -> int:
    async with service.engine.connect() as connection:
        return int(await connection.scalar(select(func.count()).select_from(inbox_changes)) or 0)


def by_channel(item: InboxItem, channel: Channel) -> list[InboxDelivery]:
    return [delivery for delivery in item.deliveries if delivery.channel is channel]


async def test_an_item_is_published_when_decided_and_again_when_its_pushes_are_accepted(
    service: RouterService, rabbit_url: str
) -> None:
    bob = user_updated(display_name="Bob", devices=2, email_level=Level.MENTIONS)
    await publish(service, bob)
    await wait_until(projected(service))
    message = message_created(recipient_ids=[bob.user_id])
    await route_messages([message], service.deps)
    await service.inbox.relay_once(settle=False)

    [(first_version, decided)] = await published_items(rabbit_url)
    assert (decided.user_id, decided.message_id) == (bob.user_id, message.message_id)
    assert decided.room_id == message.room_id
    assert decided.trigger is Trigger.MESSAGE
    assert decided.message_created_at == message.timestamp
    pushes = by_channel(decided, Channel.PUSH)
    assert {push.device_id for push in pushes} == {device.device_id for device in bob.devices}
    assert {push.state for push in pushes} == {InboxState.PENDING}
    # The e-mail was decided against: a plain message, and Bob's e-mail level is `mentions`.
    [email] = by_channel(decided, Channel.EMAIL)
    assert (email.state, email.reason, email.device_id) == (
        InboxState.SUPPRESSED,
        "level:mentions",
        None,
    )
    assert await changes_left(service) == 0

    jobs = await push_jobs(rabbit_url)
    accepted, refused = jobs
    await record_reports(
        [
            DeliveryReported(
                notification_id=accepted.notification_id,
                message_id=message.message_id,
                recipient_id=bob.user_id,
                channel=Channel.PUSH,
                outcome=DeliveryOutcome.DELIVERED,
            ),
            DeliveryReported(
                notification_id=refused.notification_id,
                message_id=message.message_id,
                recipient_id=bob.user_id,
                channel=Channel.PUSH,
                outcome=DeliveryOutcome.FAILED,
                reason="UNREGISTERED",
            ),
        ],
        service.deps,
    )
    await service.inbox.relay_once(settle=False)

    [(second_version, reported)] = await published_items(rabbit_url)
    assert second_version > first_version
    states = {push.device_id: push for push in by_channel(reported, Channel.PUSH)}
    assert states[accepted.device_id].state is InboxState.SENT
    assert states[accepted.device_id].accepted_at is not None
    assert (states[refused.device_id].state, states[refused.device_id].reason) == (
        InboxState.FAILED,
        "provider:UNREGISTERED",
    )
    # A redelivered message changes no ledger row: nothing to publish.
    await route_messages([message], service.deps)
    assert await changes_left(service) == 0


async def test_the_changes_of_many_items_go_out_in_one_pass_each_item_once(
    service: RouterService, rabbit_url: str
) -> None:
    users = [user_updated(display_name=f"User{n}", devices=1) for n in range(3)]
    for user in users:
        await publish(service, user)
    await wait_until(projected(service, len(users)))
    messages = [message_created(recipient_ids=[user.user_id for user in users]) for _ in range(4)]
    await route_messages(messages, service.deps)
    # One change per item: its decision (its deliveries' rows are inserted with it).
    assert await changes_left(service) == len(users) * len(messages)

    relayed = await service.inbox.relay_once(settle=False)

    items = await published_items(rabbit_url)
    assert relayed == len(users) * len(messages)
    assert sorted((item.user_id, item.message_id) for _, item in items) == sorted(
        (user.user_id, message.message_id) for user in users for message in messages
    )
    assert len({version for version, _ in items}) == 1


async def test_a_failed_publication_leaves_the_changes_for_the_next_pass_but_not_its_version(
    service: RouterService, rabbit_url: str
) -> None:
    bob = user_updated(display_name="Bob")
    await publish(service, bob)
    await wait_until(projected(service))
    await route_messages([message_created(recipient_ids=[bob.user_id])], service.deps)
    waiting = await changes_left(service)
    handed: list[int] = []

    async def confirm_timed_out(version: int, rows: repository.InboxRows) -> None:
        # The broker may have had the events all the same: that version is spent.
        handed.append(version)
        raise TimeoutError("no confirm from the broker")

    with pytest.raises(TimeoutError):
        await repository.relay_inbox_changes(service.engine, limit=100, publish=confirm_timed_out)

    assert await changes_left(service) == waiting
    await service.inbox.relay_once(settle=False)
    [(version, item)] = await published_items(rabbit_url)
    assert item.user_id == bob.user_id
    assert version > handed[0]
    async with service.engine.connect() as connection:
        assert await connection.scalar(select(inbox_relay.c.version)) == version
    assert await changes_left(service) == 0


async def test_a_digests_delivery_report_is_published_to_every_message_it_told_of(
    service: RouterService, rabbit_url: str
) -> None:
    """The digest's delivery row names its first message only (and only that item's change is
    logged when the report lands); every message the digest told of reads its state from it."""
    bob = user_updated(display_name="Bob", devices=0, email_delay=120)
    await publish(service, bob)
    await wait_until(projected(service))
    messages = [message_created(recipient_ids=[bob.user_id]) for _ in range(3)]
    await route_messages(messages, service.deps)
    await service.inbox.relay_once(settle=False)
    await published_items(rabbit_url)
    later = utc_now() + timedelta(minutes=10)
    [window] = await repository.close_due_windows(
        service.engine,
        now=later,
        limit=10,
        resend_after=schedule.RESEND_AFTER,
        compose=functools.partial(schedule.compose, now=later),
    )
    [digest] = window.jobs
    await repository.mark_windows_sent(service.engine, [window.window_id])
    await service.inbox.relay_once(settle=False)
    assert len(await published_items(rabbit_url)) == len(messages)  # each item now pending

    await record_reports(
        [
            DeliveryReported(
                notification_id=digest.notification_id,
                message_id=digest.message_id,
                recipient_id=bob.user_id,
                channel=Channel.EMAIL,
                outcome=DeliveryOutcome.DELIVERED,
            )
        ],
        service.deps,
    )
    assert await service.inbox.relay_once(settle=False) == len(messages)

    emails = {
        item.message_id: [(d.state, d.reason) for d in by_channel(item, Channel.EMAIL)]
        for _, item in await published_items(rabbit_url)
    }
    tag = f"digest:{window.window_id}"
    assert emails == {message.message_id: [(InboxState.SENT, tag)] for message in messages}
    assert await changes_left(service) == 0


async def test_an_item_of_an_unknown_message_is_not_published(service: RouterService) -> None:
    """A change whose ledger row is gone (retention deleted it since) publishes nothing."""
    async with service.engine.begin() as connection:
        await connection.execute(
            inbox_changes.insert().values(user_id=uuid.uuid4(), message_id=uuid.uuid4())
        )
    published: list[repository.InboxRows] = []

    async def record(version: int, rows: repository.InboxRows) -> None:
        published.append(rows)

    assert await repository.relay_inbox_changes(service.engine, limit=10, publish=record) == 1
    assert [list(rows.decisions) for rows in published] == [[]]
    assert await changes_left(service) == 0


def decisions_retention(
    service: RouterService, *, now: datetime, keep: timedelta, batch: int
) -> RetentionTask:
    """The router's retention of decisions alone, its clock at `now`."""
    prune = functools.partial(repository.prune_decisions, service.engine)
    return RetentionTask(
        {"notifications": lambda before, batch: prune(before=before, batch=batch)},
        keep=keep,
        interval=3600,
        batch=batch,
        name="test-retention",
        clock=lambda: now,
    )


async def test_retention_deletes_old_decisions_with_their_deliveries_in_batches(
    service: RouterService, rabbit_url: str
) -> None:
    bob = user_updated(display_name="Bob", devices=2)
    await publish(service, bob)
    await wait_until(projected(service))
    messages = [message_created(recipient_ids=[bob.user_id]) for _ in range(5)]
    await route_messages(messages, service.deps)

    def retention_at(now: datetime) -> RetentionTask:  # batches of 2: several of them
        return decisions_retention(service, now=now, keep=timedelta(days=90), batch=2)

    retention = retention_at(utc_now() + timedelta(days=91))
    kept = message_created(recipient_ids=[bob.user_id])

    assert await retention.prune_once() == {"notifications": len(messages)}

    async with service.engine.connect() as connection:
        assert await connection.scalar(select(func.count()).select_from(notifications)) == 0
        deliveries = select(func.count()).select_from(notification_deliveries)
        assert await connection.scalar(deliveries) == 0  # cascaded
    await route_messages([kept], service.deps)
    assert await retention_at(utc_now() + timedelta(days=89)).prune_once() == {"notifications": 0}


async def test_retention_keeps_a_decision_that_still_waits_in_a_window(
    service: RouterService, rabbit_url: str
) -> None:
    """A snooze of seven days with a retention of one: what it holds must still go out."""
    bob = user_updated(display_name="Bob", devices=1, snoozed_until=utc_now() + timedelta(days=7))
    await publish(service, bob)
    await wait_until(projected(service))
    held = message_created(recipient_ids=[bob.user_id])
    await route_messages([held], service.deps)
    retention = decisions_retention(
        service, now=utc_now() + timedelta(days=2), keep=timedelta(days=1), batch=10
    )

    assert await retention.prune_once() == {"notifications": 0}
    async with service.engine.connect() as connection:
        entries = select(func.count()).select_from(window_entries)
        assert await connection.scalar(entries) == 1


async def test_a_change_waits_one_pass_so_a_decision_and_its_report_go_out_together(
    service: RouterService, rabbit_url: str
) -> None:
    bob = user_updated(display_name="Bob", devices=1, email_level=Level.NONE)
    await publish(service, bob)
    await wait_until(projected(service))
    message = message_created(recipient_ids=[bob.user_id])
    await route_messages([message], service.deps)

    assert await service.inbox.relay_once() == 0  # decided since the last pass: not yet due
    [job] = await push_jobs(rabbit_url)
    await record_reports(
        [
            DeliveryReported(
                notification_id=job.notification_id,
                message_id=message.message_id,
                recipient_id=bob.user_id,
                channel=Channel.PUSH,
                outcome=DeliveryOutcome.DELIVERED,
            )
        ],
        service.deps,
    )
    assert await service.inbox.relay_once() == 1  # due now, with the report's change too

    [(_, item)] = await published_items(rabbit_url)
    assert [push.state for push in by_channel(item, Channel.PUSH)] == [InboxState.SENT]
    assert await changes_left(service) == 0


async def test_an_idle_pass_reads_only_the_logs_head(service: RouterService) -> None:
    """With nothing logged at the previous pass nothing is due, and the relay, which looks
    every INBOX_RELAY_INTERVAL, says so without a transaction (this test's first pass
    records the empty log's head). The router's other periodic tasks share the engine: only
    the statements on the inbox's tables are the relay's."""
    assert await service.inbox.relay_once() == 0
    statements: list[str] = []

    def count(_connection: object, _cursor: object, statement: str, *_: object) -> None:
        if "inbox_" in statement:
            statements.append(statement)

    event.listen(service.engine.sync_engine, "before_cursor_execute", count)
    try:
        assert await service.inbox.relay_once() == 0
    finally:
        event.remove(service.engine.sync_engine, "before_cursor_execute", count)
    assert len(statements) == 1
    assert "max(inbox_changes.seq)" in statements[0]
