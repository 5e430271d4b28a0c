"""Badges and recalls, on the machine's real PostgreSQL and RabbitMQ: every push carries the
recipient's unread count; a read (or a deletion) recalls what a device may still show, one
recall per device for everything read together, on the urgent lane, from the router's own
dispatcher woken for it (its poll interval here is a minute)."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta

import pytest
from faststream import TestApp
from sqlalchemy import select

from herald_shared.broker import RabbitSettings
from herald_shared.events import (
    Channel,
    DeliveryOutcome,
    DeliveryReported,
    MessageCreated,
    MessageDeleted,
    PushRequested,
    RoomLeft,
    RoomRead,
    utc_now,
)
from herald_shared.topology import PUSH_NOTIFICATIONS_URGENT
from notification_router import repository, schedule
from notification_router.app import RouterService, build_service
from notification_router.handlers import (
    apply_message_change,
    project_read_marker,
    record_reports,
    route_messages,
)
from notification_router.repository import ReportResult
from notification_router.settings import Settings
from notification_router.tables import window_entries
from tests.integration.notification_router.test_router import projected, publish, push_jobs
from tests.integration.notification_router.test_schedule import dispatcher
from tests.support.infra import wait_until
from tests.support.router_factories import message_created, user_updated


@pytest.fixture
async def service(pg_url: str, rabbit_url: str) -> AsyncIterator[RouterService]:
    settings = Settings(
        database_url=pg_url,
        rabbitmq=RabbitSettings(url=rabbit_url, retry_delays=(0.2, 0.4), prefetch=10),
        # Only a wake from a handler makes a pass within a test's time.
        schedule_poll_interval=60,
        recall_linger=0.3,
    )
    service = build_service(settings)
    async with TestApp(service.app):
        yield service


async def urgent_push_jobs(rabbit_url: str) -> list[PushRequested]:
    return await push_jobs(rabbit_url, PUSH_NOTIFICATIONS_URGENT.name)


def recalls_published(
    rabbit_url: str, expected: int, taken: list[PushRequested]
) -> Callable[[], Awaitable[bool]]:
    """A `wait_until` condition: `expected` recalls were taken off the urgent lane (into
    `taken`)."""

    async def condition() -> bool:
        taken.extend(job for job in await urgent_push_jobs(rabbit_url) if job.recall)
        return len(taken) >= expected

    return condition


async def delivered(service: RouterService, jobs: list[PushRequested]) -> None:
    await record_reports(
        [
            DeliveryReported(
                notification_id=job.notification_id,
                message_id=job.message_id,
                recipient_id=job.recipient_id,
                channel=Channel.PUSH,
                outcome=DeliveryOutcome.DELIVERED,
            )
            for job in jobs
        ],
        service.deps,
    )


async def bob_with_devices(service: RouterService, devices: int = 2) -> uuid.UUID:
    bob = user_updated(display_name="Bob", devices=devices)
    await publish(service, bob)
    await wait_until(projected(service))
    return bob.user_id


def messages_in(
    rooms: list[uuid.UUID], recipient: uuid.UUID, per_room: int
) -> list[MessageCreated]:
    start = utc_now() - timedelta(minutes=1)
    return [
        message_created(
            recipient_ids=[recipient],
            room_id=room,
            timestamp=start + timedelta(milliseconds=10 * (index * per_room + number)),
        )
        for index, room in enumerate(rooms)
        for number in range(per_room)
    ]


def read(user_id: uuid.UUID, message: MessageCreated) -> RoomRead:
    return RoomRead(
        user_id=user_id,
        room_id=message.room_id,
        message_id=message.message_id,
        up_to=message.timestamp,
    )


async def test_pushes_carry_the_unread_count_and_a_read_recalls_them_once_per_device(
    service: RouterService, rabbit_url: str
) -> None:
    bob = await bob_with_devices(service)
    general, random = uuid.uuid4(), uuid.uuid4()
    messages = messages_in([general, random], bob, per_room=2)
    await route_messages(messages, service.deps)
    pushes = await push_jobs(rabbit_url)
    assert len(pushes) == 4 * 2
    # The badge counts the message it comes with, oldest first.
    badge_of = {job.message_id: job.badge for job in pushes}
    assert [badge_of[message.message_id] for message in messages] == [1, 2, 3, 4]
    # ... and its room's own count: two rooms of two messages.
    in_room = {job.message_id: job.room_unread for job in pushes}
    assert [in_room[message.message_id] for message in messages] == [1, 2, 1, 2]
    assert await repository.unread_totals(service.engine, [bob]) == {bob: 4}
    await delivered(service, pushes)

    # Both rooms read within the linger: one recall per device, naming both rooms.
    await project_read_marker(read(bob, messages[1]), service.deps)
    await project_read_marker(read(bob, messages[3]), service.deps)
    recalls: list[PushRequested] = []
    await wait_until(recalls_published(rabbit_url, 2, recalls), timeout=5)

    assert sorted(job.device_id for job in recalls) == sorted({job.device_id for job in pushes})
    for recall in recalls:
        assert recall.recall is not None
        assert recall.title == recall.body == ""
        assert recall.badge == 0
        assert recall.urgent
        assert set(recall.recall.room_ids) == {general, random}
        assert recall.recall.room_ids[0] == random  # newest first
        assert set(recall.recall.notification_ids) == {
            job.notification_id for job in pushes if job.device_id == recall.device_id
        }
    assert await repository.unread_totals(service.engine, [bob]) == {bob: 0}

    # The same read again (another device, a redelivery) moves nothing and recalls nothing.
    assert (
        await repository.apply_read_marker(
            service.engine, read(bob, messages[3]), now=utc_now(), recall_linger=timedelta(0)
        )
        is None
    )
    # A recall's report is applied, and is no message's latency.
    results = await repository.apply_delivery_reports(
        service.engine,
        [
            DeliveryReported(
                notification_id=recall.notification_id,
                message_id=recall.message_id,
                recipient_id=bob,
                channel=Channel.PUSH,
                outcome=DeliveryOutcome.DELIVERED,
            )
            for recall in recalls
        ],
        now=utc_now(),
    )
    assert set(results.values()) == {ReportResult.APPLIED_RECALL}


async def test_a_partial_read_recalls_only_what_it_read_and_keeps_the_rest_unread(
    service: RouterService, rabbit_url: str
) -> None:
    bob = await bob_with_devices(service, devices=1)
    room = uuid.uuid4()
    messages = messages_in([room], bob, per_room=3)
    await route_messages(messages, service.deps)
    pushes = await push_jobs(rabbit_url)
    await delivered(service, pushes)

    await project_read_marker(read(bob, messages[0]), service.deps)
    recalls: list[PushRequested] = []
    await wait_until(recalls_published(rabbit_url, 1, recalls), timeout=5)

    (recall,) = recalls
    assert recall.recall is not None
    assert recall.recall.notification_ids == [
        job.notification_id for job in pushes if job.message_id == messages[0].message_id
    ]
    assert recall.badge == 2
    assert await repository.unread_totals(service.engine, [bob]) == {bob: 2}


async def test_fifty_rooms_read_at_once_make_one_recall_per_device(
    service: RouterService, rabbit_url: str
) -> None:
    bob = await bob_with_devices(service)
    rooms = [uuid.uuid4() for _ in range(50)]
    messages = messages_in(rooms, bob, per_room=1)
    await route_messages(messages, service.deps)
    pushes = await push_jobs(rabbit_url)
    await delivered(service, pushes)

    # At once, as the read-markers queue hands them to the router. A burst is one recall as
    # long as no two of its reads are further apart than the linger: on a loaded machine fifty
    # transactions on one window row can be, so this burst's linger is 2 s rather than 0.3 s.
    deps = dataclasses.replace(service.deps, recall_linger=timedelta(seconds=2))
    await asyncio.gather(*(project_read_marker(read(bob, message), deps) for message in messages))
    recalls: list[PushRequested] = []
    await wait_until(recalls_published(rabbit_url, 2, recalls), timeout=10)

    assert len(recalls) == 2
    for recall in recalls:
        assert recall.recall is not None
        assert set(recall.recall.room_ids) == set(rooms)
        # The 30 newest notifications; the device clears the rest by room.
        assert len(recall.recall.notification_ids) == 30
    assert await repository.unread_totals(service.engine, [bob]) == {bob: 0}


async def test_a_deleted_message_leaves_the_unread_count_and_its_pushes_are_recalled(
    service: RouterService, rabbit_url: str
) -> None:
    bob = await bob_with_devices(service, devices=1)
    room = uuid.uuid4()
    kept, deleted = messages_in([room], bob, per_room=2)
    await route_messages([kept, deleted], service.deps)
    (first, second) = sorted(await push_jobs(rabbit_url), key=lambda job: job.badge or 0)
    assert (first.message_id, first.badge) == (kept.message_id, 1)
    assert (second.message_id, second.badge) == (deleted.message_id, 2)
    # No report yet: a push on its way may be on screen by the time its recall arrives.

    await apply_message_change(
        MessageDeleted(
            message_id=deleted.message_id,
            room_id=room,
            sender_id=deleted.sender_id,
            deleted_at=utc_now(),
        ),
        service.deps,
    )
    recalls: list[PushRequested] = []
    await wait_until(recalls_published(rabbit_url, 1, recalls), timeout=5)

    (recall,) = recalls
    assert recall.recall is not None
    assert recall.recall.notification_ids == [second.notification_id]
    assert recall.badge == 1
    assert await repository.unread_totals(service.engine, [bob]) == {bob: 1}


async def test_leaving_a_room_cancels_what_waits_of_it_and_recalls_what_was_shown(
    service: RouterService, rabbit_url: str
) -> None:
    bob = user_updated(display_name="Bob", devices=1, email="bob@example.com", email_delay=120)
    await publish(service, bob)
    await wait_until(projected(service))
    left, stayed = uuid.uuid4(), uuid.uuid4()
    messages = messages_in([left, stayed], bob.user_id, per_room=1)
    await route_messages(messages, service.deps)
    pushes = await push_jobs(rabbit_url)
    await delivered(service, pushes)

    await project_read_marker(
        RoomLeft(user_id=bob.user_id, room_id=left, left_at=utc_now()), service.deps
    )
    recalls: list[PushRequested] = []
    await wait_until(recalls_published(rabbit_url, 1, recalls), timeout=5)

    (recall,) = recalls
    assert recall.recall is not None
    assert recall.recall.room_ids == [left]
    assert recall.badge == 1  # the room still joined
    async with service.engine.connect() as connection:
        entries = dict(
            (
                await connection.execute(
                    select(window_entries.c.room_id, window_entries.c.state).where(
                        window_entries.c.channel == "email"
                    )
                )
            ).all()
        )
    # The e-mail of the room left will not be in the digest; the other's still waits.
    assert entries == {left: "cancelled:left", stayed: "waiting"}

    def waiting(channel: str) -> float | None:
        return service.registry.get_sample_value(
            "herald_router_notifications_waiting", {"channel": channel}
        )

    async def gauges_counted() -> bool:
        # The pass that sent the recall counts what still waits, by why, once it is out.
        return waiting("email") == 1 and waiting("recall") == 0 and waiting("push") == 0

    await wait_until(gauges_counted, timeout=5)


async def test_a_recall_left_sending_by_a_stopped_dispatcher_is_published_again_the_same(
    service: RouterService, rabbit_url: str
) -> None:
    bob = await bob_with_devices(service, devices=1)
    (message,) = messages_in([uuid.uuid4()], bob, per_room=1)
    await route_messages([message], service.deps)
    await delivered(service, await push_jobs(rabbit_url))
    # Straight to the repository: no handler wakes the service's dispatcher.
    await repository.apply_read_marker(
        service.engine, read(bob, message), now=utc_now(), recall_linger=timedelta(0)
    )

    # A dispatcher composes and commits the recall, then dies before publishing it.
    now = utc_now()
    closed = await repository.close_due_windows(
        service.engine,
        now=now,
        limit=10,
        resend_after=timedelta(minutes=1),
        compose=functools.partial(schedule.compose, now=now),
    )
    (composed,) = [job for window in closed for job in window.jobs]
    assert await urgent_push_jobs(rabbit_url) == []

    await dispatcher(service, resend_after=timedelta(0)).dispatch_once()

    (resent,) = await urgent_push_jobs(rabbit_url)
    assert isinstance(composed, PushRequested)
    assert resent.notification_id == composed.notification_id
    assert resent.recall == composed.recall
    assert resent.recall is not None
    assert resent.recall.notification_ids
