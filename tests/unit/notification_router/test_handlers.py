"""The handlers' wiring, with the in-memory broker and SQLite: what lands in the projection and
the ledger, and what is published."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from faststream import TestApp
from faststream.rabbit import RabbitBroker, TestRabbitBroker
from sqlalchemy import Connection, event, func, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from herald_shared.config import BatchSettings
from herald_shared.events import (
    MAX_ITEMS_PER_EVENT,
    Channel,
    DeliveriesReported,
    DeliveryBatchReported,
    DeliveryOutcome,
    DeliveryReported,
    DeviceSnapshot,
    EmailJobsRequested,
    EmailRequested,
    Event,
    Level,
    Platform,
    PushJobsRequested,
    PushRequested,
    RoomKind,
    RoomSettingsSnapshot,
    UserUpdated,
    reports_events,
    utc_now,
)
from herald_shared.retry import RetryableError
from herald_shared.topology import (
    EMAIL_SEND,
    EXCHANGE,
    PUSH_SEND,
    PUSH_SEND_URGENT,
    routing_key_for,
)
from notification_router import repository
from notification_router.app import RouterService, build_service, specification
from notification_router.handlers import (
    MessageTimes,
    project_recipient,
    record_deliveries,
    record_reports,
    route_message,
    route_messages,
)
from notification_router.repository import ReportResult
from notification_router.routing import MUTED_FOREVER, RoomSettings
from notification_router.settings import Settings
from notification_router.tables import (
    metadata,
    notification_deliveries,
    notifications,
    presence_connections,
    recipients,
    waiting_windows,
)
from tests.support.router_factories import NOW, message_created, user_updated


@pytest.fixture
async def service(sqlite_url: str) -> AsyncIterator[RouterService]:
    service = build_service(Settings(database_url=sqlite_url))
    # TestApp runs the real start-up hooks: migrations, then the (mocked) topology declaration.
    async with TestRabbitBroker(service.broker), TestApp(service.app):
        yield service


async def publish(broker: RabbitBroker, event: Event) -> None:
    await broker.publish(event, exchange=EXCHANGE, routing_key=routing_key_for(event))


def published(publisher_mock: Any) -> list[dict[str, Any]]:
    return [call.args[0] for call in publisher_mock.call_args_list]


def push_batches(service: RouterService) -> list[PushJobsRequested]:
    return [
        PushJobsRequested.model_validate(body)
        for body in published(service.deps.publishers[PUSH_SEND].mock)
    ]


def email_batches(service: RouterService) -> list[EmailJobsRequested]:
    return [
        EmailJobsRequested.model_validate(body)
        for body in published(service.deps.publishers[EMAIL_SEND].mock)
    ]


def reset_publishers(service: RouterService) -> None:
    for publisher in service.deps.publishers.values():
        publisher.mock.reset_mock()


def pushes(service: RouterService) -> list[PushRequested]:
    """Every push job published so far, event after event."""
    return [job for batch in push_batches(service) for job in batch.jobs]


def emails(service: RouterService) -> list[EmailRequested]:
    return [job for batch in email_batches(service) for job in batch.jobs]


def with_devices(user: UserUpdated, *platforms: Platform) -> UserUpdated:
    """The snapshot with one device per platform listed instead of its own."""
    devices = [
        DeviceSnapshot(device_id=uuid.uuid4(), platform=platform, token="secret-token")
        for platform in platforms
    ]
    return user.model_copy(update={"devices": devices})


def report(
    job: PushRequested | EmailRequested, outcome: DeliveryOutcome, reason: str | None = None
) -> DeliveryReported:
    return DeliveryReported(
        notification_id=job.notification_id,
        message_id=job.message_id,
        recipient_id=job.recipient_id,
        channel=Channel.PUSH if isinstance(job, PushRequested) else Channel.EMAIL,
        outcome=outcome,
        reason=reason,
        trigger=job.trigger,
    )


def batch_report(reports: list[DeliveryReported]) -> DeliveryBatchReported:
    """One message's reports, as a sender of the previous version sent them: still accepted."""
    first = reports[0]
    return DeliveryBatchReported(
        message_id=first.message_id, channel=first.channel, outcome=first.outcome, reports=reports
    )


def reports_event(reports: list[DeliveryReported]) -> DeliveriesReported:
    """Reports of one channel and outcome, of any messages, as the senders send them now."""
    (event,) = reports_events(reports)
    return event


def report_count(service: RouterService, channel: str, outcome: str, result: str) -> float:
    labels = {"channel": channel, "outcome": outcome, "result": result}
    return service.registry.get_sample_value("herald_router_delivery_reports_total", labels) or 0


async def ledger(engine: AsyncEngine, message_id: uuid.UUID) -> dict[uuid.UUID, tuple[str, str]]:
    async with engine.connect() as connection:
        rows = await connection.execute(
            select(notifications).where(notifications.c.message_id == message_id)
        )
        return {row.recipient_id: (row.push_decision, row.email_decision) for row in rows}


async def statuses(engine: AsyncEngine) -> dict[uuid.UUID, tuple[str, str, str]]:
    async with engine.connect() as connection:
        rows = await connection.execute(select(notification_deliveries))
        return {row.notification_id: (row.channel, row.target, row.status) for row in rows}


async def test_user_updated_builds_the_projection_and_ignores_older_versions(
    service: RouterService,
) -> None:
    user_id = uuid.uuid4()
    v2 = user_updated(user_id=user_id, version=2, email="new@example.com", devices=2)
    v1 = user_updated(user_id=user_id, version=1, email="old@example.com", push_enabled=False)

    await publish(service.broker, v2)
    await publish(service.broker, v1)  # late, older: ignored
    await publish(service.broker, v2)  # replay: no change

    stored = (await repository.load_recipients(service.engine, [user_id]))[user_id]
    assert stored.version == 2
    assert stored.email == "new@example.com"
    assert stored.push_level is Level.ALL  # an older snapshot's push_enabled=True
    assert [d.device_id for d in stored.devices] == [d.device_id for d in v2.devices]
    assert stored.time_zone == "Europe/Paris"

    v3 = user_updated(user_id=user_id, version=3, email=None, devices=0, muted_room_ids=[user_id])
    await publish(service.broker, v3)
    stored = (await repository.load_recipients(service.engine, [user_id]))[user_id]
    assert (stored.version, stored.email, stored.devices) == (3, None, ())
    assert stored.rooms == {user_id: RoomSettings(muted_until=MUTED_FOREVER)}

    until = NOW + timedelta(hours=1)
    v4 = user_updated(
        user_id=user_id,
        version=4,
        push_level=Level.MENTIONS,
        email_level=Level.NONE,
        rooms=[RoomSettingsSnapshot(room_id=user_id, push=Level.ALL, muted_until=until)],
    )
    await publish(service.broker, v4)
    stored = (await repository.load_recipients(service.engine, [user_id]))[user_id]
    assert (stored.push_level, stored.email_level) == (Level.MENTIONS, Level.NONE)
    assert stored.rooms == {user_id: RoomSettings(push=Level.ALL, muted_until=until)}


async def test_a_deletion_and_its_clean_up_are_applied_together_or_not_at_all(
    service: RouterService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deleted account's snapshot and the removal of what the router kept beside it share one
    transaction: when the removal fails, the retry finds the version not applied yet and does
    both (before, it found the version applied and skipped the removal for good)."""
    user_id = uuid.uuid4()
    await project_recipient(user_updated(user_id=user_id, version=1), service.deps)
    async with service.engine.begin() as connection:
        await connection.execute(
            insert(presence_connections).values(
                user_id=user_id, connection_id=uuid.uuid4(), expires_at=NOW, at=NOW
            )
        )
    deleted = user_updated(user_id=user_id, version=2).model_copy(update={"deleted": True})
    forget = repository._forget_recipient

    async def fails_once(connection: AsyncConnection, user: uuid.UUID) -> None:
        monkeypatch.setattr(repository, "_forget_recipient", forget)
        raise ConnectionResetError("lost in the middle")

    monkeypatch.setattr(repository, "_forget_recipient", fails_once)
    with pytest.raises(ConnectionResetError):
        await project_recipient(deleted, service.deps)
    assert await projected_version(service.engine, user_id) == 1

    await project_recipient(deleted, service.deps)  # the retry

    assert await projected_version(service.engine, user_id) == 2
    async with service.engine.connect() as connection:
        presence = await connection.execute(
            select(presence_connections).where(presence_connections.c.user_id == user_id)
        )
        assert presence.all() == []


async def test_held_pushes_wait_as_long_as_the_quiet_the_user_sets_now(
    service: RouterService,
) -> None:
    """A snooze set longer keeps what it holds longer; turned off, it lets it go at once."""
    now = utc_now()
    bob = user_updated(devices=1, snoozed_until=now + timedelta(hours=1))
    await publish(service.broker, bob)
    await publish(service.broker, message_created(recipient_ids=[bob.user_id], timestamp=now))
    assert await push_window_due(service.engine, bob.user_id) == now + timedelta(hours=1)

    longer = snoozed(bob, version=2, until=now + timedelta(hours=3))
    await publish(service.broker, longer)
    assert await push_window_due(service.engine, bob.user_id) == now + timedelta(hours=3)

    await publish(service.broker, snoozed(bob, version=3, until=None))
    due = await push_window_due(service.engine, bob.user_id)
    assert now <= due <= utc_now()


def snoozed(user: UserUpdated, *, version: int, until: datetime | None) -> UserUpdated:
    preferences = user.preferences.model_copy(update={"snoozed_until": until})
    return user.model_copy(update={"version": version, "preferences": preferences})


async def push_window_due(engine: AsyncEngine, user_id: uuid.UUID) -> datetime:
    async with engine.connect() as connection:
        (due,) = (
            await connection.execute(
                select(waiting_windows.c.due_at).where(
                    waiting_windows.c.user_id == user_id, waiting_windows.c.channel == "push"
                )
            )
        ).one()
    assert isinstance(due, datetime)
    return due.replace(tzinfo=UTC)  # SQLite: naive UTC


async def projected_version(engine: AsyncEngine, user_id: uuid.UUID) -> int:
    async with engine.connect() as connection:
        version = await connection.scalar(
            select(recipients.c.version).where(recipients.c.user_id == user_id)
        )
    assert isinstance(version, int)
    return version


async def test_message_created_writes_the_ledger_and_publishes_the_jobs(
    service: RouterService,
) -> None:
    alice = user_updated(display_name="Alice", devices=2)
    bob = user_updated(display_name="Bob", email="bob@example.com", push_enabled=False)
    muted_room = uuid.uuid4()
    carol = user_updated(display_name="Carol", muted_room_ids=[muted_room])
    for user in (alice, bob, carol):
        await publish(service.broker, user)
    event = message_created(
        recipient_ids=[alice.user_id, bob.user_id, carol.user_id], room_id=muted_room
    )
    sender_id = event.sender_id

    await publish(service.broker, event)

    assert await ledger(service.engine, event.message_id) == {
        alice.user_id: ("pending", "pending"),
        bob.user_id: ("skipped:push_disabled", "pending"),
        carol.user_id: ("skipped:muted", "skipped:muted"),
    }
    (push_batch,) = push_batches(service)
    (email_batch,) = email_batches(service)
    assert push_batch.platform == Platform.FCM
    jobs_published: list[PushRequested | EmailRequested] = [*push_batch.jobs, *email_batch.jobs]
    assert {job.message_id for job in jobs_published} == {event.message_id}
    assert sorted(p.device_id for p in push_batch.jobs) == sorted(
        d.device_id for d in alice.devices
    )
    assert {p.recipient_id for p in push_batch.jobs} == {alice.user_id}
    assert {(e.recipient_id, e.to_address) for e in email_batch.jobs} == {
        (alice.user_id, "alice@example.com"),
        (bob.user_id, "bob@example.com"),
    }
    jobs: list[PushRequested | EmailRequested] = [*push_batch.jobs, *email_batch.jobs]
    assert sender_id not in {job.recipient_id for job in jobs}
    assert all(p.title == "John Doe in general" for p in push_batch.jobs)
    stored = await statuses(service.engine)
    assert set(stored) == {job.notification_id for job in jobs}
    assert {status for _, _, status in stored.values()} == {"pending"}
    assert sorted(target for channel, target, _ in stored.values() if channel == "push") == sorted(
        str(d.device_id) for d in alice.devices
    )


async def test_each_platform_gets_one_push_batch_and_the_e_mails_one_batch(
    service: RouterService,
) -> None:
    fcm, apns = Platform.FCM, Platform.APNS
    room_id = uuid.uuid4()
    users = [
        *(with_devices(user_updated(), fcm) for _ in range(3)),
        *(with_devices(user_updated(email=None), apns) for _ in range(2)),
        with_devices(user_updated(), fcm, apns),
        user_updated(devices=0),
        with_devices(user_updated(push_enabled=False), apns),
        user_updated(muted_room_ids=[room_id]),
    ]
    for user in users:
        await publish(service.broker, user)
    event = message_created(recipient_ids=[user.user_id for user in users], room_id=room_id)

    await publish(service.broker, event)

    assert sorted((batch.platform, len(batch.jobs)) for batch in push_batches(service)) == [
        (apns, 3),
        (fcm, 4),
    ]
    (email_batch,) = email_batches(service)
    assert len(email_batch.jobs) == 6
    jobs: list[PushRequested | EmailRequested] = [*pushes(service), *emails(service)]
    published_ids = [job.notification_id for job in jobs]
    stored = await statuses(service.engine)
    assert sorted(published_ids) == sorted(stored)  # every pending notification, once
    assert {status for _, _, status in stored.values()} == {"pending"}


async def test_jobs_above_an_events_size_are_published_in_full_events_and_the_rest(
    service: RouterService,
) -> None:
    """Two rooms of 300 routed together: 600 jobs per channel, cut at 500 per event."""
    count = 300
    users = [user_updated(devices=1) for _ in range(2 * count)]
    for user in users:
        await repository.upsert_recipient(service.engine, user, now=utc_now())
    events = [
        message_created(recipient_ids=[user.user_id for user in users[:count]]),
        message_created(recipient_ids=[user.user_id for user in users[count:]]),
    ]

    assert await route_messages(events, service.deps) == [None, None]

    sizes = [MAX_ITEMS_PER_EVENT, 2 * count - MAX_ITEMS_PER_EVENT]
    assert [len(batch.jobs) for batch in push_batches(service)] == sizes
    assert [len(batch.jobs) for batch in email_batches(service)] == sizes
    jobs: list[PushRequested | EmailRequested] = [*pushes(service), *emails(service)]
    assert sorted(job.notification_id for job in jobs) == sorted(await statuses(service.engine))
    assert {job.message_id for job in jobs} == {event.message_id for event in events}
    for channel in ("push", "email"):
        published_jobs = service.registry.get_sample_value(
            "herald_router_jobs_published_total", {"channel": channel}
        )
        assert published_jobs == 2 * count


async def test_a_message_that_comes_alone_is_routed_without_lingering(sqlite_url: str) -> None:
    """A chat message that comes a linger or more after the one before starts its batch at
    once: at a moderate rate waiting would rarely find company, and every wait is the push's.
    (With a linger of a minute, one that waited would not be routed within the test.)"""
    # `model_construct`: BATCH_LINGER allows at most a second, too short to tell apart here.
    batch = BatchSettings.model_construct(max_items=1000, concurrency=2, linger=60.0)
    service = build_service(Settings(database_url=sqlite_url, batch=batch))
    async with TestRabbitBroker(service.broker), TestApp(service.app):
        alice = user_updated(devices=1)
        await publish(service.broker, alice)
        event = message_created(recipient_ids=[alice.user_id], room_kind=RoomKind.GROUP)

        await asyncio.wait_for(publish(service.broker, event), timeout=10)

        assert [job.message_id for job in pushes(service)] == [event.message_id]
        # Alone in its batch, it tells the senders that the pipeline is quiet: they claim its
        # jobs at once too.
        assert [batch.quiet for batch in push_batches(service)] == [True]


async def test_messages_routed_together_share_one_ledger_transaction_and_their_events(
    service: RouterService,
) -> None:
    """What the batcher hands `route_messages`: one read of the recipients, one transaction
    and one event per platform and for the e-mails, for all the messages; each message still
    ends on its own (a recipient without a projection retries its message only)."""
    alice, bob = user_updated(devices=1), user_updated(devices=2)
    for user in (alice, bob):
        await publish(service.broker, user)
    first = message_created(recipient_ids=[alice.user_id])
    second = message_created(recipient_ids=[alice.user_id, bob.user_id])
    waiting = message_created(recipient_ids=[uuid.uuid4()])
    statements: list[str] = []
    # Only the handler's statements: the replica's periodic passes stay out of the count.
    # (The retention pass too: CI once counted its DELETE of old waiting windows here.)
    await service.schedule.stop()
    await service.inbox.stop()
    await service.retention.stop()

    def executed(connection: Any, cursor: Any, statement: str, *context: Any) -> None:
        table = re.search(r"\b(?:INTO|FROM)\s+(\w+)", statement)
        statements.append(" ".join([statement.split()[0], table[1] if table else ""]).strip())

    engine = service.engine.sync_engine
    event.listen(engine, "before_cursor_execute", executed)
    try:
        outcomes = await route_messages([first, second, waiting, first], service.deps)
    finally:
        event.remove(engine, "before_cursor_execute", executed)

    assert [type(outcome).__name__ for outcome in outcomes] == [
        "NoneType",
        "NoneType",
        "RetryableError",
        "NoneType",
    ]
    # One read each of the recipients, their presence and their read markers (in any order: a
    # batch with an urgent message makes them at once), then one transaction: one insert of
    # every decision, one of every job, one upsert of every unread counter.
    assert sorted(statements[:3]) == [
        "SELECT presence_connections",
        "SELECT read_markers",
        "SELECT recipients",
    ]
    assert statements[3:] == [
        "BEGIN",
        "INSERT notifications",
        "INSERT notification_deliveries",
        "INSERT unread_counts",  # its rooms' counts come back with it
        "SELECT unread_counts",  # the recipients' totals, with these messages in
    ]
    (push_event,) = push_batches(service)
    (email_event,) = email_batches(service)
    assert (push_event.quiet, email_event.quiet) == (False, False)  # messages came together
    assert {job.message_id for job in push_event.jobs} == {first.message_id, second.message_id}
    assert len(push_event.jobs) == 1 + 1 + 2  # a message listed twice is routed once
    assert sorted((job.message_id, job.recipient_id) for job in email_event.jobs) == sorted(
        [
            (first.message_id, alice.user_id),
            (second.message_id, alice.user_id),
            (second.message_id, bob.user_id),
        ]
    )
    assert set(await ledger(service.engine, second.message_id)) == {alice.user_id, bob.user_id}
    assert await ledger(service.engine, waiting.message_id) == {}


@pytest.mark.parametrize(
    ("room_kind", "reads_at_once"), [(RoomKind.DIRECT, 3), (RoomKind.GROUP, 1)]
)
async def test_a_batch_with_a_direct_message_reads_its_context_at_once(
    service: RouterService,
    monkeypatch: pytest.MonkeyPatch,
    room_kind: RoomKind,
    reads_at_once: int,
) -> None:
    """The recipients, their presence and their read markers: an urgent batch has the three
    reads in flight together (one round trip to wait for), room chatter one after another."""
    in_flight, most = 0, 0

    def counted(read: Any) -> Any:
        async def run(*args: Any, **kwargs: Any) -> Any:
            nonlocal in_flight, most
            in_flight += 1
            most = max(most, in_flight)
            try:
                for _ in range(3):  # a few turns of the loop, as a round trip takes
                    await asyncio.sleep(0)
                return await read(*args, **kwargs)
            finally:
                in_flight -= 1

        return run

    for name in ("load_recipients", "load_presence", "load_read_markers"):
        monkeypatch.setattr(repository, name, counted(getattr(repository, name)))
    alice = user_updated(devices=1)
    await publish(service.broker, alice)

    message = message_created(recipient_ids=[alice.user_id], room_kind=room_kind)
    await route_message(message, service.deps)

    assert most == reads_at_once
    assert set(await ledger(service.engine, message.message_id)) == {alice.user_id}


async def test_messages_delivered_at_once_are_each_acknowledged_or_retried(
    service: RouterService,
) -> None:
    """Through the subscriber: the deliveries the consumer holds at once go to the batcher
    together, and each still ends as its message says."""
    alice = user_updated(devices=1)
    await publish(service.broker, alice)
    routed = [message_created(recipient_ids=[alice.user_id]) for _ in range(3)]
    waiting = message_created(recipient_ids=[uuid.uuid4()])

    await asyncio.gather(*(publish(service.broker, event) for event in (*routed, waiting)))

    assert sorted(job.message_id for job in pushes(service)) == sorted(
        event.message_id for event in routed
    )
    assert len(emails(service)) == 3
    processed = service.registry.get_sample_value(
        "herald_messages_processed_total", {"queue": "message_notifications", "outcome": "error"}
    )
    assert processed == 1  # the message whose recipient is unknown, alone


async def test_redelivery_adds_no_ledger_row_and_republishes_the_same_jobs(
    service: RouterService,
) -> None:
    alice = user_updated(devices=1)
    await publish(service.broker, alice)
    event = message_created(recipient_ids=[alice.user_id])

    await publish(service.broker, event)
    (first_push,) = pushes(service)
    # A device is added before the redelivery: the ledger keeps the first decision.
    devices = [alice.devices[0].device_id, uuid.uuid4()]
    await publish(service.broker, user_updated(user_id=alice.user_id, version=2, devices=devices))
    await publish(service.broker, event)

    async with service.engine.connect() as connection:
        ledger_rows = await connection.scalar(select(func.count()).select_from(notifications))
        delivery_rows = await connection.scalar(
            select(func.count()).select_from(notification_deliveries)
        )
    assert (ledger_rows, delivery_rows) == (1, 2)
    assert [len(batch.jobs) for batch in push_batches(service)] == [1, 1]
    assert [p.notification_id for p in pushes(service)] == [first_push.notification_id] * 2
    first_email, again = emails(service)
    assert first_email.notification_id == again.notification_id
    # The same jobs make the same batch: a republished batch is the same event.
    first_batch, republished = push_batches(service)
    assert first_batch.event_id == republished.event_id


async def test_a_redelivery_republishes_only_the_jobs_still_pending(
    service: RouterService,
) -> None:
    alice = user_updated(devices=2)
    bob = user_updated(email="bob@example.com", devices=0)
    for user in (alice, bob):
        await publish(service.broker, user)
    event = message_created(recipient_ids=[alice.user_id, bob.user_id])
    await publish(service.broker, event)
    delivered_push, pending_push = pushes(service)
    by_recipient = {job.recipient_id: job for job in emails(service)}
    await record_deliveries(report(delivered_push, DeliveryOutcome.DELIVERED), service.deps)
    await record_deliveries(report(by_recipient[bob.user_id], DeliveryOutcome.FAILED), service.deps)
    reset_publishers(service)

    await publish(service.broker, event)  # the redelivery after a crash

    assert [job.notification_id for job in pushes(service)] == [pending_push.notification_id]
    assert [job.notification_id for job in emails(service)] == [
        by_recipient[alice.user_id].notification_id
    ]


class BrokenPublisher:
    """A publisher whose broker confirm never comes."""

    async def publish(self, *args: Any, **kwargs: Any) -> None:
        raise TimeoutError


async def test_a_publish_failure_after_commit_is_repaired_by_the_redelivery(
    service: RouterService,
) -> None:
    alice = user_updated(devices=2)
    await publish(service.broker, alice)
    event = message_created(recipient_ids=[alice.user_id])
    broken = dataclasses.replace(
        service.deps,
        publishers={**service.deps.publishers, PUSH_SEND: cast(Any, BrokenPublisher())},
    )

    with pytest.raises(TimeoutError):  # the plain error, for the retry middleware to classify
        await route_message(event, broken)

    assert set(await ledger(service.engine, event.message_id)) == {alice.user_id}
    assert published(service.deps.publishers[PUSH_SEND].mock) == []
    await publish(service.broker, event)  # the redelivery
    assert [len(batch.jobs) for batch in push_batches(service)] == [2]
    assert len(await statuses(service.engine)) == 3


async def test_unknown_recipient_is_retried_while_known_ones_are_done(
    service: RouterService,
) -> None:
    known = user_updated()
    late_id = uuid.uuid4()
    await publish(service.broker, known)
    event = message_created(recipient_ids=[known.user_id, late_id])

    # The retry itself is the shared middleware's job (tested on a real broker); the handler's
    # part is to finish what it can and raise.
    with pytest.raises(RetryableError) as raised:
        await route_message(event, service.deps)

    assert str(late_id) not in raised.value.reason
    assert set(await ledger(service.engine, event.message_id)) == {known.user_id}
    assert len(pushes(service)) == 1

    await publish(service.broker, user_updated(user_id=late_id, email="late@example.com"))
    await route_message(event, service.deps)  # the retry

    assert set(await ledger(service.engine, event.message_id)) == {known.user_id, late_id}
    # The known recipient's pending jobs are published again (the senders dedupe), once each.
    assert [sorted(e.recipient_id for e in batch.jobs) for batch in email_batches(service)] == [
        [known.user_id],
        sorted([known.user_id, late_id]),
    ]


async def test_delivery_reports_update_status_and_never_move_delivered_back(
    service: RouterService, caplog: pytest.LogCaptureFixture
) -> None:
    alice = user_updated(devices=2)
    await publish(service.broker, alice)
    event = message_created(recipient_ids=[alice.user_id])
    await publish(service.broker, event)
    first_push, second_push = pushes(service)
    (email,) = emails(service)
    delivered, failed = DeliveryOutcome.DELIVERED, DeliveryOutcome.FAILED

    # A single DeliveryReported (a sender of an earlier version, a replayed dead letter) is
    # still accepted. notification.push.delivered is the key the subscriber binds in the
    # in-memory broker; the other report keys are bound by declare_topology on a real broker
    # (integration tests).
    await publish(service.broker, report(first_push, delivered))
    await record_deliveries(report(first_push, failed, "UNAVAILABLE"), service.deps)  # late
    await record_deliveries(report(second_push, failed, "UNAVAILABLE"), service.deps)
    await record_deliveries(batch_report([report(email, failed, "UNAVAILABLE")]), service.deps)
    await record_deliveries(batch_report([report(email, delivered)]), service.deps)
    unknown = report(first_push, delivered).model_copy(update={"notification_id": uuid.uuid4()})
    with caplog.at_level(logging.DEBUG, logger="notification_router"):
        await record_deliveries(unknown, service.deps)

    stored = await statuses(service.engine)
    assert stored[first_push.notification_id][2] == "delivered"
    assert stored[second_push.notification_id][2] == "failed"
    assert stored[email.notification_id][2] == "delivered"
    assert unknown.notification_id not in stored
    assert f"router.report.unknown notification_id={unknown.notification_id}" in caplog.text
    assert report_count(service, "push", "failed", "stale") == 1
    assert report_count(service, "push", "failed", "applied") == 1
    assert report_count(service, "email", "delivered", "applied") == 1


async def test_a_report_event_is_applied_per_notification_across_messages(
    service: RouterService, caplog: pytest.LogCaptureFixture
) -> None:
    alice, bob = user_updated(devices=3), user_updated(devices=1)
    for user in (alice, bob):
        await publish(service.broker, user)
    event = message_created(recipient_ids=[alice.user_id])
    other_message = message_created(recipient_ids=[bob.user_id])
    await publish(service.broker, event)
    await publish(service.broker, other_message)
    delivered_push, pending_push, other_push, bobs_push = sorted(
        pushes(service), key=lambda job: (job.message_id != event.message_id, job.notification_id)
    )
    assert bobs_push.message_id == other_message.message_id
    # What the senders publish now, through the subscriber (its in-memory binding).
    await publish(
        service.broker, reports_event([report(delivered_push, DeliveryOutcome.DELIVERED)])
    )
    unknown = report(pending_push, DeliveryOutcome.FAILED).model_copy(
        update={"notification_id": uuid.uuid4()}
    )
    failures = reports_event(
        [
            report(delivered_push, DeliveryOutcome.FAILED, "retries exhausted"),
            report(pending_push, DeliveryOutcome.FAILED, "retries exhausted"),
            report(other_push, DeliveryOutcome.FAILED, "UNREGISTERED"),
            report(bobs_push, DeliveryOutcome.FAILED, "UNREGISTERED"),
            unknown,
        ]
    )

    with caplog.at_level(logging.DEBUG, logger="notification_router"):
        await record_deliveries(failures, service.deps)

    stored = await statuses(service.engine)
    assert stored[delivered_push.notification_id][2] == "delivered"  # never overwritten
    assert stored[pending_push.notification_id][2] == "failed"
    assert stored[other_push.notification_id][2] == "failed"
    assert stored[bobs_push.notification_id][2] == "failed"
    assert unknown.notification_id not in stored
    assert report_count(service, "push", "delivered", "applied") == 1
    assert report_count(service, "push", "failed", "applied") == 3
    assert report_count(service, "push", "failed", "stale") == 1
    assert report_count(service, "push", "failed", "unknown") == 1
    assert f"router.report.stale notification_id={delivered_push.notification_id}" in caplog.text
    assert f"router.report.unknown notification_id={unknown.notification_id}" in caplog.text


async def test_report_events_handled_together_are_applied_once_per_report(
    service: RouterService,
) -> None:
    """What the batcher hands `record_reports`: events of every kind, a report that two of them
    carry (a redelivered event) counted once."""
    alice = user_updated(devices=2)
    await publish(service.broker, alice)
    event = message_created(recipient_ids=[alice.user_id])
    await publish(service.broker, event)
    first_push, second_push = pushes(service)
    (email,) = emails(service)
    delivered = DeliveryOutcome.DELIVERED
    pushes_delivered = reports_event(
        [report(first_push, delivered), report(second_push, delivered)]
    )

    results = await record_reports(
        [
            pushes_delivered,
            pushes_delivered,  # a copy of the same event
            batch_report([report(email, DeliveryOutcome.FAILED, "smtp 550 5.1.1")]),
            report(first_push, delivered),  # a single report of one of them
        ],
        service.deps,
    )

    assert results == [None, None, None, None]
    stored = await statuses(service.engine)
    assert {notification_id: status for notification_id, (_, _, status) in stored.items()} == {
        first_push.notification_id: "delivered",
        second_push.notification_id: "delivered",
        email.notification_id: "failed",
    }
    assert report_count(service, "push", "delivered", "applied") == 2
    assert report_count(service, "push", "delivered", "stale") == 0
    assert report_count(service, "email", "failed", "applied") == 1


async def test_apply_delivery_reports_says_what_each_report_did(service: RouterService) -> None:
    alice = user_updated(devices=2)
    await publish(service.broker, alice)
    event = message_created(recipient_ids=[alice.user_id])
    await publish(service.broker, event)
    delivered_push, pending_push = pushes(service)
    (email,) = emails(service)
    now = event.timestamp
    await repository.apply_delivery_reports(
        service.engine, [report(delivered_push, DeliveryOutcome.DELIVERED)], now=now
    )
    unknown = report(pending_push, DeliveryOutcome.FAILED).model_copy(
        update={"notification_id": uuid.uuid4()}
    )
    on_the_wrong_channel = report(email, DeliveryOutcome.FAILED).model_copy(
        update={"channel": Channel.PUSH}
    )

    results = await repository.apply_delivery_reports(
        service.engine,
        [
            report(delivered_push, DeliveryOutcome.FAILED, "retries exhausted"),
            report(pending_push, DeliveryOutcome.FAILED, "x" * 500),
            unknown,
            on_the_wrong_channel,
        ],
        now=now,
    )

    assert results == {
        delivered_push.notification_id: ReportResult.STALE,
        pending_push.notification_id: ReportResult.APPLIED,
        unknown.notification_id: ReportResult.UNKNOWN,
        email.notification_id: ReportResult.UNKNOWN,
    }
    async with service.engine.connect() as connection:
        rows = await connection.execute(
            select(
                notification_deliveries.c.notification_id,
                notification_deliveries.c.status,
                notification_deliveries.c.reason,
            )
        )
        stored = {notification_id: (status, reason) for notification_id, status, reason in rows}
    assert stored == {
        delivered_push.notification_id: ("delivered", None),
        pending_push.notification_id: ("failed", "x" * repository.REASON_MAX_CHARS),
        email.notification_id: ("pending", None),
    }
    assert await repository.apply_delivery_reports(service.engine, [], now=now) == {}


async def test_latency_is_observed_once_per_applied_delivered_report(
    service: RouterService, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice = user_updated(devices=3)
    await publish(service.broker, alice)
    event = message_created(recipient_ids=[alice.user_id])
    await publish(service.broker, event)
    first, second, third = pushes(service)
    looked_up: list[set[uuid.UUID]] = []
    read_created_at = repository.messages_created_at

    async def spy(engine: AsyncEngine, message_ids: set[uuid.UUID]) -> dict[uuid.UUID, Any]:
        looked_up.append(set(message_ids))
        return await read_created_at(engine, message_ids)

    monkeypatch.setattr(repository, "messages_created_at", spy)
    delivered, failed = DeliveryOutcome.DELIVERED, DeliveryOutcome.FAILED

    def observed() -> float | None:
        return service.registry.get_sample_value(
            "herald_end_to_end_latency_seconds_count", {"channel": "push", "lane": "normal"}
        )

    await record_deliveries(report(first, delivered), service.deps)
    await record_deliveries(report(second, failed, "UNAVAILABLE"), service.deps)
    # The router routed that message itself: it knows when it was created without a read.
    assert (observed(), looked_up) == (1, [])

    # After a restart (or on another replica) the creation time comes from the ledger, read
    # once per batch. first: already delivered (stale); second: failed before, delivered now;
    # third: pending.
    restarted = dataclasses.replace(service.deps, message_times=MessageTimes())
    await record_deliveries(
        reports_event([report(job, delivered) for job in (first, second, third)]), restarted
    )

    assert observed() == 3
    assert looked_up == [{event.message_id}]  # once per batch, not once per report
    latency = service.registry.get_sample_value(
        "herald_end_to_end_latency_seconds_sum", {"channel": "push", "lane": "normal"}
    )
    assert latency is not None
    assert latency > 0  # the factory's message was sent long before the reports


async def test_latency_is_observed_per_lane(service: RouterService) -> None:
    alice = user_updated(devices=1)
    await publish(service.broker, alice)
    chatter = message_created(recipient_ids=[alice.user_id])
    direct = message_created(recipient_ids=[alice.user_id], room_kind=RoomKind.DIRECT)
    for message in (chatter, direct):
        await publish(service.broker, message)

    urgent = [
        job
        for body in published(service.deps.publishers[PUSH_SEND_URGENT].mock)
        for job in PushJobsRequested.model_validate(body).jobs
    ]
    assert [job.message_id for job in urgent] == [direct.message_id]  # the urgent lane's queue
    for job in (*pushes(service), *urgent):
        await record_deliveries(report(job, DeliveryOutcome.DELIVERED), service.deps)

    def observed(lane: str) -> float | None:
        return service.registry.get_sample_value(
            "herald_end_to_end_latency_seconds_count", {"channel": "push", "lane": lane}
        )

    assert (observed("urgent"), observed("normal")) == (1, 1)


async def test_message_times_forget_the_oldest_beyond_their_capacity(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    read: list[set[uuid.UUID]] = []

    async def from_ledger(_: AsyncEngine, message_ids: set[uuid.UUID]) -> dict[uuid.UUID, Any]:
        read.append(set(message_ids))
        return {}

    monkeypatch.setattr(repository, "messages_created_at", from_ledger)
    times = MessageTimes(capacity=2)
    first, second, third = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    created_at = datetime(2026, 1, 1, tzinfo=UTC)
    for message_id in (first, second, third):
        times.remember(message_id, created_at)

    known = await times.of(cast(AsyncEngine, None), {first, second, third})

    assert known == {second: created_at, third: created_at}
    assert read == [{first}]


async def test_metrics_count_each_decision_once_and_observe_latency(
    service: RouterService,
) -> None:
    alice = user_updated(devices=2)
    bob = user_updated(email=None, devices=0)
    for user in (alice, bob):
        await publish(service.broker, user)
    event = message_created(recipient_ids=[alice.user_id, bob.user_id])

    await publish(service.broker, event)
    await publish(service.broker, event)  # a redelivery decides nothing new

    def decided(channel: str, outcome: str, reason: str = "") -> float | None:
        return service.registry.get_sample_value(
            "herald_router_notifications_decided_total",
            {"channel": channel, "outcome": outcome, "reason": reason, "trigger": "message"},
        )

    assert decided("push", "sent") == 1
    assert decided("email", "sent") == 1
    assert decided("push", "skipped", "no_device") == 1
    assert decided("email", "skipped", "no_email") == 1
    assert service.registry.get_sample_value("herald_router_decision_latency_seconds_count") == 2
    # The factory's message was sent long ago: the latency is real wall-clock time.
    latency_sum = service.registry.get_sample_value("herald_router_decision_latency_seconds_sum")
    assert latency_sum is not None
    assert latency_sum > 0
    jobs = service.registry.get_sample_value(
        "herald_router_jobs_published_total", {"channel": "push"}
    )
    assert jobs == 4


async def test_logs_carry_ids_but_no_personal_data(
    service: RouterService, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    alice = user_updated(email="alice.secret@example.com", devices=1)
    event = message_created(recipient_ids=[alice.user_id, uuid.uuid4()], content="the secret plan")

    await publish(service.broker, alice)
    with pytest.raises(RetryableError):
        await route_message(event, service.deps)
    await publish(service.broker, alice)  # stale: logged at DEBUG

    # aiosqlite logs statements with their parameters at DEBUG: main() keeps it at INFO.
    ours = [r for r in caplog.records if not r.name.startswith("aiosqlite")]
    text = "\n".join(r.getMessage() for r in ours)
    # Ids only: the router's lines name users and counts (a batch of messages is routed at
    # once; each delivery's message id is in the log context the broker's middleware sets).
    assert f"router.recipient.updated user_id={alice.user_id}" in text
    assert "router.messages.routed messages=1 new=1" in text
    for secret in ("alice.secret@example.com", "secret-token", "the secret plan"):
        assert secret not in text


async def test_migrations_match_the_tables(service: RouterService) -> None:
    def differences(connection: Connection) -> list[Any]:
        context = MigrationContext.configure(
            connection,
            opts={"version_table": "alembic_version_notification_router"},
        )
        return list(compare_metadata(context, metadata))

    async with service.engine.connect() as connection:
        assert await connection.run_sync(differences) == []


def test_specification_documents_the_queues_and_the_jobs() -> None:
    document = specification(Settings()).to_specification().to_jsonable()

    assert set(document["channels"]) == {
        "message_notifications:consume",
        "recipient_updates:consume",
        "presence_updates:consume",
        "read_markers:consume",
        "message_changes:consume",
        "delivery_reports:consume",
        "notification.push.send:publish",
        "notification.email.send:publish",
        "notification.push.send.urgent:publish",
        "notification.email.send.urgent:publish",
        "notification.inbox.updated:publish",
    }
    schemas = document["components"]["schemas"]
    assert {"MessageCreated", "UserUpdated", "PushJobsRequested", "EmailJobsRequested"} <= set(
        schemas
    )
    payloads = {
        name: message["payload"]["$ref"].rsplit("/", 1)[1]
        for name, message in document["components"]["messages"].items()
    }
    assert payloads["notification.push.send:publish:Message"] == "PushJobsRequested"
    assert payloads["notification.email.send:publish:Message"] == "EmailJobsRequested"
    assert payloads["notification.push.send.urgent:publish:Message"] == "PushJobsRequested"
    assert payloads["notification.email.send.urgent:publish:Message"] == "EmailJobsRequested"
    assert payloads["notification.inbox.updated:publish:Message"] == "InboxItemsUpdated"
    # Every kind of report is accepted: the senders' now, and those of earlier versions.
    [reports] = [
        payload for name, payload in payloads.items() if name.startswith("delivery_reports")
    ]
    assert {ref["$ref"].rsplit("/", 1)[1] for ref in schemas[reports]["oneOf"]} == {
        "DeliveryReported",
        "DeliveryBatchReported",
        "DeliveriesReported",
    }
