"""What waits, on the machine's real PostgreSQL and RabbitMQ: one e-mail digest per window,
read markers that cancel, several dispatchers that never send a window twice, a dispatcher that
stopped between composing and publishing; pushes held by Do Not Disturb, summed up per room when
it ends."""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta

import pytest
from faststream import TestApp
from sqlalchemy import Table, func, select, text
from sqlalchemy.ext.asyncio import create_async_engine

from herald_shared.broker import RabbitSettings
from herald_shared.events import (
    Channel,
    DeliveryOutcome,
    DeliveryReported,
    EmailRequested,
    MessageDeleted,
    MessageEdited,
    PushRequested,
    RoomRead,
    notification_id_for,
    utc_now,
)
from notification_router import repository, routing, schedule
from notification_router.app import RouterService, build_service
from notification_router.schedule import WindowDispatcher
from notification_router.settings import Settings
from notification_router.tables import (
    message_changes,
    notification_deliveries,
    waiting_windows,
    window_entries,
)
from tests.integration.notification_router.test_router import (
    email_jobs,
    projected,
    publish,
    push_jobs,
    reaches,
)
from tests.support.infra import wait_until
from tests.support.router_factories import message_created, recipient, user_updated

# Every user's 120 s become 0.6 s.
DELAY_SCALE = 0.005


@pytest.fixture
async def service(pg_url: str, rabbit_url: str) -> AsyncIterator[RouterService]:
    settings = Settings(
        database_url=pg_url,
        rabbitmq=RabbitSettings(url=rabbit_url, retry_delays=(0.2, 0.4), prefetch=10),
        email_delay_scale=DELAY_SCALE,
        # The service's own dispatcher makes one pass at start-up, then waits a minute: the
        # tests run their passes themselves, when they choose.
        schedule_poll_interval=60,
    )
    service = build_service(settings)
    async with TestApp(service.app):
        yield service


def dispatcher(service: RouterService, **overrides: object) -> WindowDispatcher:
    options: dict[str, object] = {
        "engine": service.engine,
        "publishers": service.deps.publishers,
        "metrics": service.deps.metrics,
        "publish_timeout": 5.0,
        "interval": 60.0,
        "batch_size": 100,
    } | overrides
    return WindowDispatcher(**options)  # type: ignore[arg-type]


async def count(service: RouterService, table: Table, **where: object) -> int:
    async with service.engine.connect() as connection:
        statement = select(func.count()).select_from(table)
        for column, value in where.items():
            statement = statement.where(table.c[column] == value)
        return int(await connection.scalar(statement) or 0)


def entries_recorded(service: RouterService, expected: int) -> Callable[[], Awaitable[bool]]:
    async def condition() -> bool:
        return await count(service, window_entries) >= expected

    return condition


async def dispatch_until_sent(
    service: RouterService, digests: WindowDispatcher, expected: int
) -> None:
    """Passes until `expected` digests left `waiting` (their windows end within a second)."""

    async def done() -> bool:
        await digests.dispatch_once()
        return await count(service, waiting_windows, state="waiting") == 0 and (
            await count(service, waiting_windows) >= expected
        )

    await wait_until(done, timeout=10)


async def test_the_waiting_emails_of_a_window_go_out_as_one_digest_per_user(
    service: RouterService, rabbit_url: str
) -> None:
    bob = user_updated(display_name="Bob", email="bob@example.com", email_delay=120)
    carol = user_updated(display_name="Carol", email="carol@example.com", email_delay=120)
    for user in (bob, carol):
        await publish(service, user)
    await wait_until(projected(service, 2))
    general, random = uuid.uuid4(), uuid.uuid4()
    sent_at = utc_now()
    messages = [
        message_created(
            recipient_ids=[bob.user_id, carol.user_id],
            room_id=room,
            room_name=name,
            content=f"message {index}",
            timestamp=sent_at + timedelta(milliseconds=index),
        )
        for index, (room, name) in enumerate([(general, "general")] * 3 + [(random, "random")] * 2)
    ]
    for message in messages:
        await publish(service, message)
    await wait_until(entries_recorded(service, 10))
    assert await email_jobs(rabbit_url) == []  # nothing went out at once

    await dispatch_until_sent(service, dispatcher(service), expected=2)

    jobs = {job.recipient_id: job for job in await email_jobs(rabbit_url)}
    assert sorted(jobs) == sorted([bob.user_id, carol.user_id])
    for job in jobs.values():
        assert [entry.message_id for entry in job.digest] == [m.message_id for m in messages]
        assert [entry.room_name for entry in job.digest] == ["general"] * 3 + ["random"] * 2
    assert jobs[bob.user_id].to_address == "bob@example.com"
    async with service.engine.connect() as connection:
        targets = (
            await connection.execute(
                select(notification_deliveries.c.target, notification_deliveries.c.status).where(
                    notification_deliveries.c.channel == "email"
                )
            )
        ).all()
    assert sorted(targets) == [("digest", "pending"), ("digest", "pending")]
    assert await count(service, window_entries, state="sent") == 10
    assert await count(service, waiting_windows, state="sent") == 2
    # The operators' "why (not)?" of a message in the middle of the window shows its digest.
    why = await repository.explain(
        service.engine, message_id=messages[2].message_id, user_id=bob.user_id
    )
    assert why is not None
    assert why["email"] == "waiting"
    # Bob's phone was pushed at once; the digest's delivery is under the window's first message.
    assert [delivery["channel"] for delivery in why["deliveries"]] == ["push"]
    (window,) = why["windows"]
    assert (window["channel"], window["entry"], window["state"]) == ("email", "sent", "sent")
    assert window["digest_delivery"] == "pending"


async def test_a_room_read_before_the_window_ends_is_left_out_and_all_read_sends_nothing(
    service: RouterService, rabbit_url: str
) -> None:
    bob = user_updated(display_name="Bob", email_delay=120)
    dave = user_updated(display_name="Dave", email_delay=120)
    for user in (bob, dave):
        await publish(service, user)
    await wait_until(projected(service, 2))
    general, random = uuid.uuid4(), uuid.uuid4()
    sent_at = utc_now()
    in_general = [
        message_created(
            recipient_ids=[bob.user_id, dave.user_id],
            room_id=general,
            timestamp=sent_at + timedelta(milliseconds=index),
        )
        for index in range(3)
    ]
    in_random = message_created(
        recipient_ids=[bob.user_id], room_id=random, timestamp=sent_at + timedelta(seconds=1)
    )
    for message in [*in_general, in_random]:
        await publish(service, message)
    await wait_until(entries_recorded(service, 7))
    last = in_general[-1]
    for reader in (bob, dave):  # both read #general to its end, on some device
        await publish(
            service,
            RoomRead(
                user_id=reader.user_id,
                room_id=general,
                message_id=last.message_id,
                up_to=last.timestamp,
            ),
        )

    async def markers_applied() -> bool:
        read = await repository.load_read_markers(
            service.engine, [bob.user_id, dave.user_id], [general]
        )
        return len(read) == 2

    await wait_until(markers_applied)
    await dispatch_until_sent(service, dispatcher(service), expected=2)

    jobs = await email_jobs(rabbit_url)
    assert [(job.recipient_id, [e.message_id for e in job.digest]) for job in jobs] == [
        (bob.user_id, [in_random.message_id])
    ]
    assert await count(service, waiting_windows, state="cancelled") == 1  # Dave's
    assert await count(service, window_entries, state="cancelled:read") == 6


async def test_several_dispatchers_send_each_digest_exactly_once(
    service: RouterService, rabbit_url: str
) -> None:
    users = [user_updated(display_name=f"User {i}", email_delay=120) for i in range(40)]
    for user in users:
        await publish(service, user)
    await wait_until(projected(service, len(users)))
    for index in range(3):
        await publish(
            service,
            message_created(
                recipient_ids=[user.user_id for user in users],
                timestamp=utc_now() + timedelta(milliseconds=index),
            ),
        )
    await wait_until(entries_recorded(service, 3 * len(users)))
    # Small batches, so that the dispatchers take turns many times over the same due rows.
    replicas = [dispatcher(service, batch_size=3) for _ in range(4)]

    async def all_closed() -> bool:
        await asyncio.gather(*(replica.dispatch_once() for replica in replicas))
        return await count(service, waiting_windows, state="sent") == len(users)

    await wait_until(all_closed, timeout=20)

    jobs = await email_jobs(rabbit_url)
    assert len(jobs) == len(users)
    assert len({job.notification_id for job in jobs}) == len(users)
    assert {job.recipient_id for job in jobs} == {user.user_id for user in users}
    assert all(len(job.digest) == 3 for job in jobs)


async def test_a_digest_left_sending_by_a_stopped_dispatcher_is_published_again_the_same(
    service: RouterService, rabbit_url: str
) -> None:
    bob = user_updated(display_name="Bob", email_delay=120)
    await publish(service, bob)
    await wait_until(projected(service))
    await publish(service, message_created(recipient_ids=[bob.user_id], timestamp=utc_now()))
    await wait_until(entries_recorded(service, 1))

    # A dispatcher composes and commits, then dies before publishing.
    composed: list[PushRequested | EmailRequested] = []

    async def closed_without_publishing() -> bool:
        now = utc_now()
        closed = await repository.close_due_windows(
            service.engine,
            now=now,
            limit=10,
            resend_after=timedelta(minutes=1),
            compose=functools.partial(schedule.compose, now=now),
        )
        composed.extend(job for window in closed for job in window.jobs)
        return bool(composed)

    await wait_until(closed_without_publishing)
    assert await count(service, waiting_windows, state="sending") == 1
    patient = dispatcher(service)  # waits 30 s before taking a `sending` digest
    await patient.dispatch_once()
    assert await email_jobs(rabbit_url) == []

    await dispatcher(service, resend_after=timedelta(0)).dispatch_once()

    jobs = await email_jobs(rabbit_url)
    assert [job.notification_id for job in jobs] == [composed[0].notification_id]
    assert isinstance(composed[0], EmailRequested)
    assert jobs[0].digest == composed[0].digest
    assert await count(service, waiting_windows, state="sent") == 1
    assert (
        service.registry.get_sample_value(
            "herald_router_windows_total", {"channel": "email", "outcome": "resent"}
        )
        == 1
    )


async def routing_waits_on_a_lock(service: RouterService) -> bool:
    async with service.engine.connect() as connection:
        waiting = await connection.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE wait_event_type = 'Lock' AND datname = current_database()"
            )
        )
    return bool(waiting)


async def test_a_message_arriving_while_its_window_is_being_closed_opens_the_next_one(
    service: RouterService, rabbit_url: str
) -> None:
    """The routing transaction's upsert waits for the dispatcher's lock on the waiting digest;
    once that digest is `sending`, the new e-mail opens a new window instead of joining one that
    is already composed (and so would be lost)."""
    bob = user_updated(display_name="Bob", email_delay=120)
    await publish(service, bob)
    await wait_until(projected(service))
    first = message_created(recipient_ids=[bob.user_id], timestamp=utc_now())
    await publish(service, first)
    await wait_until(entries_recorded(service, 1))

    async def due() -> bool:
        async with service.engine.connect() as connection:
            due_at = await connection.scalar(select(waiting_windows.c.due_at))
        return due_at is not None and due_at <= utc_now()

    await wait_until(due)
    # The dispatcher's transaction holds the digest while the second message is routed.
    async with service.engine.begin() as connection:
        held = await connection.execute(select(waiting_windows.c.window_id).with_for_update())
        (held_id,) = held.scalars().all()
        second = message_created(recipient_ids=[bob.user_id], timestamp=utc_now())
        await publish(service, second)
        await wait_until(functools.partial(routing_waits_on_a_lock, service))
        await connection.execute(
            waiting_windows.update()
            .where(waiting_windows.c.window_id == held_id)
            .values(state="cancelled", closed_at=utc_now())
        )
    await wait_until(entries_recorded(service, 2))

    async with service.engine.connect() as connection:
        rows = (
            await connection.execute(
                select(window_entries.c.message_id, window_entries.c.window_id)
            )
        ).all()
    digest_of = dict(rows)
    assert digest_of[first.message_id] == held_id
    assert digest_of[second.message_id] != held_id
    assert await count(service, waiting_windows, state="waiting") == 1


async def test_pushes_held_by_a_snooze_come_as_one_summary_per_room_when_it_ends(
    service: RouterService, rabbit_url: str
) -> None:
    # Long enough for the four messages to be routed while it lasts, even on a loaded machine.
    snooze_ends = utc_now() + timedelta(seconds=10)
    bob = user_updated(display_name="Bob", devices=1, snoozed_until=snooze_ends)
    await publish(service, bob)
    await wait_until(projected(service))
    general, random = uuid.uuid4(), uuid.uuid4()
    in_general = [
        message_created(
            recipient_ids=[bob.user_id],
            room_id=general,
            room_name="general",
            timestamp=utc_now() + timedelta(milliseconds=index),
        )
        for index in range(3)
    ]
    in_random = message_created(recipient_ids=[bob.user_id], room_id=random, room_name="random")
    for message in [*in_general, in_random]:
        await publish(service, message)
    await wait_until(entries_recorded(service, 4))
    assert utc_now() < snooze_ends, "the messages came after the snooze; make it longer"
    assert await push_jobs(rabbit_url) == []  # held
    assert len(await email_jobs(rabbit_url)) == 4  # e-mail does not wait for a snooze

    digests = dispatcher(service)

    async def summed_up() -> bool:
        await digests.dispatch_once()
        return await count(service, waiting_windows, state="sent") == 1

    await wait_until(summed_up, timeout=20)

    assert utc_now() >= snooze_ends
    by_room = {job.room_id: job for job in await push_jobs(rabbit_url)}
    assert sorted(by_room) == sorted([general, random])
    # Three messages in #general: one summary; #random's one message: its own push, as held.
    assert (by_room[general].title, by_room[general].body) == (
        "#general",
        "3 new messages in #general",
    )
    assert by_room[general].message_id == in_general[-1].message_id
    assert (by_room[random].title, by_room[random].body) == (
        "John Doe in random",
        "Hello everyone! 👋",
    )
    assert by_room[random].notification_id == notification_id_for(
        message_id=in_random.message_id,
        recipient_id=bob.user_id,
        channel=Channel.PUSH,
        target=str(bob.devices[0].device_id),
    )
    assert await count(service, window_entries, state="sent") == 4

    # Delivered after waiting on purpose: no latency to speak of, and said so.
    for job in by_room.values():
        await publish(
            service,
            DeliveryReported(
                notification_id=job.notification_id,
                message_id=job.message_id,
                recipient_id=job.recipient_id,
                channel=Channel.PUSH,
                outcome=DeliveryOutcome.DELIVERED,
            ),
        )
    await wait_until(
        reaches(
            service,
            "herald_router_delivery_reports_total",
            2,
            channel="push",
            outcome="delivered",
            result="applied_after_waiting",
        )
    )
    latencies = service.registry.get_sample_value(
        "herald_end_to_end_latency_seconds_count", {"channel": "push", "lane": "normal"}
    )
    assert not latencies


async def test_a_snooze_turned_off_early_releases_what_it_held(
    service: RouterService, rabbit_url: str
) -> None:
    bob = user_updated(display_name="Bob", devices=1, snoozed_until=utc_now() + timedelta(hours=1))
    await publish(service, bob)
    await wait_until(projected(service))
    await publish(service, message_created(recipient_ids=[bob.user_id], timestamp=utc_now()))
    await wait_until(entries_recorded(service, 1))
    digests = dispatcher(service)
    await digests.dispatch_once()
    assert await push_jobs(rabbit_url) == []  # still snoozed for an hour

    awake = bob.model_copy(
        update={
            "version": 2,
            "preferences": bob.preferences.model_copy(update={"snoozed_until": None}),
        }
    )
    await publish(service, awake)
    await wait_until(projected(service, 2))

    async def released() -> bool:
        await digests.dispatch_once()
        return await count(service, waiting_windows, state="sent") == 1

    await wait_until(released)
    assert len(await push_jobs(rabbit_url)) == 1


async def test_edits_and_deletions_reach_what_still_waits(
    service: RouterService, rabbit_url: str
) -> None:
    bob = user_updated(display_name="Bob", devices=0, email_delay=120)
    await publish(service, bob)
    await wait_until(projected(service))
    sent_at = utc_now()
    typo, oops, fine = (
        message_created(
            recipient_ids=[bob.user_id], content=text, timestamp=sent_at + timedelta(seconds=i)
        )
        for i, text in enumerate(["teh typo", "oops, wrong room", "all fine"])
    )
    for message in (typo, oops, fine):
        await publish(service, message)
    await wait_until(entries_recorded(service, 3))

    changes = [
        MessageEdited(
            message_id=typo.message_id,
            room_id=typo.room_id,
            sender_id=typo.sender_id,
            message_content="the typo, fixed",
            edited_at=sent_at + timedelta(seconds=5),
        ),
        # An older edit arriving late changes nothing.
        MessageEdited(
            message_id=typo.message_id,
            room_id=typo.room_id,
            sender_id=typo.sender_id,
            message_content="an older edit",
            edited_at=sent_at + timedelta(seconds=4),
        ),
        MessageDeleted(
            message_id=oops.message_id,
            room_id=oops.room_id,
            sender_id=oops.sender_id,
            deleted_at=sent_at + timedelta(seconds=6),
        ),
    ]
    for change in changes:
        await publish(service, change)

    async def deletion_applied() -> bool:
        return await count(service, window_entries, state="cancelled:deleted") == 1

    await wait_until(deletion_applied)

    async def edits_applied() -> bool:
        async with service.engine.connect() as connection:
            content = await connection.scalar(
                select(message_changes.c.content).where(
                    message_changes.c.message_id == typo.message_id
                )
            )
        return content == "the typo, fixed"

    await wait_until(edits_applied)
    await dispatch_until_sent(service, dispatcher(service), expected=1)

    (job,) = await email_jobs(rabbit_url)
    assert [(entry.message_id, entry.message_content) for entry in job.digest] == [
        (typo.message_id, "the typo, fixed"),
        (fine.message_id, "all fine"),
    ]


async def test_a_long_lived_connection_keeps_opening_and_joining_windows(
    service: RouterService,
) -> None:
    """The upsert of a waiting window names the partial unique index by its predicate; with the
    predicate as a parameter, PostgreSQL stopped matching it once asyncpg's prepared statement
    went generic (from its sixth run on one connection) and every routing batch after that
    failed. One connection, many batches of the same shape."""
    one_connection = create_async_engine(service.settings.database_url, pool_size=1, max_overflow=0)
    try:
        for batch in range(12):
            bob = recipient(email_delay=120, devices=0)
            event = message_created(recipient_ids=[bob.user_id], timestamp=utc_now())
            plan = routing.plan_notifications(event, {bob.user_id: bob}, now=utc_now())
            await repository.record_decisions(
                one_connection, [(event, plan.decisions)], now=utc_now()
            )
            assert await count(service, window_entries) == batch + 1
    finally:
        await one_connection.dispose()
