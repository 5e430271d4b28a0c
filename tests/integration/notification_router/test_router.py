"""notification-router on the machine's real PostgreSQL and RabbitMQ: concurrency, ordering,
persistence and retries, which the in-memory broker cannot show."""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import aio_pika
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from faststream import TestApp
from sqlalchemy import Connection, func, select

from herald_shared.broker import RabbitSettings
from herald_shared.database import run_migrations
from herald_shared.events import (
    Channel,
    DeliveriesReported,
    DeliveryBatchReported,
    DeliveryOutcome,
    DeliveryReported,
    EmailJobsRequested,
    EmailRequested,
    Event,
    PushJobsRequested,
    PushRequested,
    notification_id_for,
)
from herald_shared.topology import (
    EMAIL_NOTIFICATIONS,
    EXCHANGE,
    PUSH_NOTIFICATIONS,
    routing_key_for,
)
from notification_router import repository
from notification_router.app import RouterService, build_service
from notification_router.settings import Settings
from notification_router.tables import metadata, notification_deliveries, notifications
from tests.support.infra import wait_until
from tests.support.router_factories import message_created, user_updated

RETRY_DELAYS = (0.2, 0.4, 0.8)


@pytest.fixture
async def service(pg_url: str, rabbit_url: str) -> AsyncIterator[RouterService]:
    settings = Settings(
        database_url=pg_url,
        rabbitmq=RabbitSettings(url=rabbit_url, retry_delays=RETRY_DELAYS, prefetch=10),
    )
    service = build_service(settings)
    # The real start-up: migrations, broker connection, topology; and the real shutdown.
    async with TestApp(service.app):
        yield service


async def publish(service: RouterService, event: Event) -> None:
    await service.broker.publish(
        event,
        exchange=EXCHANGE,
        routing_key=routing_key_for(event),
        persist=True,
        message_id=str(event.event_id),
    )


def counter(service: RouterService, name: str, **labels: str) -> float:
    return service.registry.get_sample_value(name, labels) or 0.0


def reaches(
    service: RouterService, name: str, target: float, **labels: str
) -> Callable[[], Awaitable[bool]]:
    """A `wait_until` condition: the router's counter has reached `target`."""

    async def condition() -> bool:
        return counter(service, name, **labels) >= target

    return condition


def projected(service: RouterService, count: int = 1) -> Callable[[], Awaitable[bool]]:
    return reaches(service, "herald_router_recipient_updates_total", count, result="applied")


async def queue_depth(rabbit_url: str, queue_name: str) -> int:
    connection = await aio_pika.connect(rabbit_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, passive=True)
        count = queue.declaration_result.message_count
        return int(count or 0)


async def drain(rabbit_url: str, queue_name: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    connection = await aio_pika.connect(rabbit_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(queue_name)
        messages = []
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            messages.append(message)
        return messages


async def push_jobs(rabbit_url: str, queue: str = PUSH_NOTIFICATIONS.name) -> list[PushRequested]:
    """Take the push events waiting for push-sender off a queue of its (the normal lane's
    unless told): their jobs, in order."""
    batches = [
        PushJobsRequested.model_validate_json(message.body)
        for message in await drain(rabbit_url, queue)
    ]
    return [job for batch in batches for job in batch.jobs]


async def email_jobs(rabbit_url: str) -> list[EmailRequested]:
    batches = [
        EmailJobsRequested.model_validate_json(message.body)
        for message in await drain(rabbit_url, EMAIL_NOTIFICATIONS.name)
    ]
    return [job for batch in batches for job in batch.jobs]


def reports_counted(service: RouterService, count: int) -> Callable[[], Awaitable[bool]]:
    """A `wait_until` condition: `count` delivery reports were handled, whatever their labels."""

    async def condition() -> bool:
        family = "herald_router_delivery_reports_total"
        total = sum(
            sample.value
            for metric in service.registry.collect()
            for sample in metric.samples
            if sample.name == family
        )
        return total >= count

    return condition


async def delivery_statuses(service: RouterService) -> dict[uuid.UUID, str]:
    async with service.engine.connect() as connection:
        rows = await connection.execute(
            select(notification_deliveries.c.notification_id, notification_deliveries.c.status)
        )
        return {notification_id: status for notification_id, status in rows}


def email_id(message_id: uuid.UUID, recipient_id: uuid.UUID) -> uuid.UUID:
    return notification_id_for(
        message_id=message_id, recipient_id=recipient_id, channel=Channel.EMAIL
    )


async def test_concurrent_duplicate_deliveries_leave_one_ledger_row_per_recipient(
    service: RouterService, rabbit_url: str
) -> None:
    users = [user_updated(devices=2) for _ in range(3)]
    for user in users:
        await publish(service, user)
    await wait_until(projected(service, 3))
    event = message_created(recipient_ids=[user.user_id for user in users])

    # Five copies at once, prefetch 10: the handlers race on the same unique keys (copies that
    # the batcher takes together are routed once; the other batches race each other).
    await asyncio.gather(*(publish(service, event) for _ in range(5)))

    await wait_until(
        reaches(
            service,
            "herald_messages_processed_total",
            5,
            queue="message_notifications",
            outcome="success",
        ),
        timeout=20,
    )
    async with service.engine.connect() as connection:
        rows = (
            await connection.execute(
                select(notifications.c.recipient_id, func.count())
                .where(notifications.c.message_id == event.message_id)
                .group_by(notifications.c.recipient_id)
            )
        ).all()
        deliveries = await connection.scalar(
            select(func.count()).select_from(notification_deliveries)
        )
    assert sorted((recipient_id, n) for recipient_id, n in rows) == sorted(
        (user.user_id, 1) for user in users
    )
    assert deliveries == 3 * (2 + 1)
    decided = counter(
        service,
        "herald_router_notifications_decided_total",
        channel="push",
        outcome="sent",
        reason="",
        trigger="message",
    )
    assert decided == 3  # each recipient counted once, whichever copy won
    # Every batch of copies published the same jobs, in one event: the senders see the same 6
    # push notification ids (and 3 e-mail ones) once per batch, and dedupe them.
    batches = await drain(rabbit_url, PUSH_NOTIFICATIONS.name)
    assert 1 <= len(batches) <= 5
    for message in batches:
        jobs = json.loads(message.body)["jobs"]
        assert len(jobs) == 6
        assert len({job["notification_id"] for job in jobs}) == 6
    assert len({job["notification_id"] for m in batches for job in json.loads(m.body)["jobs"]}) == 6
    published = counter(service, "herald_router_jobs_published_total", channel="push")
    assert published == 6 * len(batches)
    emails = await email_jobs(rabbit_url)
    assert len(emails) == 3 * len(batches)
    assert len({job.notification_id for job in emails}) == 3


async def test_projection_converges_on_the_highest_version_whatever_the_order(
    service: RouterService,
) -> None:
    user_id = uuid.uuid4()
    versions = [
        user_updated(user_id=user_id, version=v, email=f"v{v}@example.com", devices=v)
        for v in range(1, 9)
    ]
    shuffled = random.sample(versions, len(versions))

    await asyncio.gather(*(publish(service, snapshot) for snapshot in shuffled))
    await publish(service, versions[3])  # a replay of an old one, afterwards

    async def all_processed() -> bool:
        applied = counter(service, "herald_router_recipient_updates_total", result="applied")
        stale = counter(service, "herald_router_recipient_updates_total", result="stale")
        return applied + stale == len(versions) + 1

    await wait_until(all_processed, timeout=20)
    stored = (await repository.load_recipients(service.engine, [user_id]))[user_id]
    assert stored.version == 8
    assert stored.email == "v8@example.com"
    assert [d.device_id for d in stored.devices] == [d.device_id for d in versions[-1].devices]


async def test_jobs_arrive_on_the_sender_queues_as_persistent_messages(
    service: RouterService, rabbit_url: str
) -> None:
    alice = user_updated(devices=1)
    await publish(service, alice)
    await wait_until(projected(service))
    event = message_created(recipient_ids=[alice.user_id])
    await publish(service, event)

    await wait_until(lambda: queue_depth(rabbit_url, EMAIL_NOTIFICATIONS.name))
    await wait_until(lambda: queue_depth(rabbit_url, PUSH_NOTIFICATIONS.name))
    (push,) = await drain(rabbit_url, PUSH_NOTIFICATIONS.name)
    (email,) = await drain(rabbit_url, EMAIL_NOTIFICATIONS.name)

    for message in (push, email):
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert message.content_type == "application/json"
    push_batch = PushJobsRequested.model_validate_json(push.body)
    email_batch = EmailJobsRequested.model_validate_json(email.body)
    (push_job,) = push_batch.jobs
    (email_job,) = email_batch.jobs
    assert push_job.notification_id == notification_id_for(
        message_id=event.message_id,
        recipient_id=alice.user_id,
        channel=Channel.PUSH,
        target=str(alice.devices[0].device_id),
    )
    assert email_job.notification_id == notification_id_for(
        message_id=event.message_id, recipient_id=alice.user_id, channel=Channel.EMAIL
    )
    assert push.message_id == str(push_batch.event_id)
    assert email.message_id == str(email_batch.event_id)
    assert push.routing_key == "notification.push.send"
    assert email.routing_key == "notification.email.send"


async def test_a_recipient_projected_late_is_notified_by_the_retry(
    service: RouterService, rabbit_url: str
) -> None:
    early = user_updated()
    late = user_updated(email="late@example.com")
    await publish(service, early)
    await wait_until(projected(service))
    event = message_created(recipient_ids=[early.user_id, late.user_id])

    await publish(service, event)

    async def decided() -> set[uuid.UUID]:
        async with service.engine.connect() as connection:
            rows = await connection.execute(
                select(notifications.c.recipient_id).where(
                    notifications.c.message_id == event.message_id
                )
            )
            return set(rows.scalars())

    await wait_until(decided)
    assert await decided() == {early.user_id}  # and a retry is waiting
    await publish(service, late)  # the user.updated that travelled on the other queue

    async def both_decided() -> bool:
        return await decided() == {early.user_id, late.user_id}

    await wait_until(both_decided)
    emails = await email_jobs(rabbit_url)
    assert {e.recipient_id for e in emails} == {early.user_id, late.user_id}
    assert await queue_depth(rabbit_url, "message_notifications.dlq") == 0


async def test_delivery_reports_on_every_report_key_update_the_ledger(
    service: RouterService,
) -> None:
    alice = user_updated(devices=2)
    await publish(service, alice)
    await wait_until(projected(service))
    event = message_created(recipient_ids=[alice.user_id])
    await publish(service, event)
    await wait_until(reaches(service, "herald_router_jobs_published_total", 1, channel="email"))
    first, second = (
        notification_id_for(
            message_id=event.message_id,
            recipient_id=alice.user_id,
            channel=Channel.PUSH,
            target=str(device.device_id),
        )
        for device in alice.devices
    )
    email = notification_id_for(
        message_id=event.message_id, recipient_id=alice.user_id, channel=Channel.EMAIL
    )
    reports = [
        (first, Channel.PUSH, DeliveryOutcome.DELIVERED),
        (second, Channel.PUSH, DeliveryOutcome.FAILED),
        (email, Channel.EMAIL, DeliveryOutcome.FAILED),
        (uuid.uuid4(), Channel.EMAIL, DeliveryOutcome.DELIVERED),  # unknown: ignored
    ]
    for notification_id, channel, outcome in reports:
        await publish(
            service,
            DeliveryReported(
                notification_id=notification_id,
                message_id=event.message_id,
                recipient_id=alice.user_id,
                channel=channel,
                outcome=outcome,
            ),
        )

    await wait_until(reports_counted(service, len(reports)))
    assert await delivery_statuses(service) == {
        first: "delivered",
        second: "failed",
        email: "failed",
    }


async def test_a_report_event_applies_pending_keeps_delivered_and_ignores_unknown(
    service: RouterService, rabbit_url: str
) -> None:
    alice = user_updated(devices=3)
    await publish(service, alice)
    await wait_until(projected(service))
    event = message_created(recipient_ids=[alice.user_id])
    await publish(service, event)
    await wait_until(reaches(service, "herald_router_jobs_published_total", 3, channel="push"))
    delivered, pending, other = await push_jobs(rabbit_url)

    def report(job: PushRequested, outcome: DeliveryOutcome) -> DeliveryReported:
        return DeliveryReported(
            notification_id=job.notification_id,
            message_id=job.message_id,
            recipient_id=job.recipient_id,
            channel=Channel.PUSH,
            outcome=outcome,
            reason=None if outcome is DeliveryOutcome.DELIVERED else "retries exhausted",
        )

    await publish(service, report(delivered, DeliveryOutcome.DELIVERED))
    await wait_until(reports_counted(service, 1))
    unknown = report(pending, DeliveryOutcome.FAILED).model_copy(
        update={"notification_id": uuid.uuid4()}
    )
    # What push-sender's dead-letter hook sends for a delivery out of retries: every job
    # failed, the one it had delivered included.
    failed = [report(job, DeliveryOutcome.FAILED) for job in (delivered, pending, other)]
    await publish(
        service,
        DeliveriesReported(
            channel=Channel.PUSH, outcome=DeliveryOutcome.FAILED, reports=[*failed, unknown]
        ),
    )

    await wait_until(reports_counted(service, 5))
    assert await delivery_statuses(service) == {
        delivered.notification_id: "delivered",
        pending.notification_id: "failed",
        other.notification_id: "failed",
        email_id(event.message_id, alice.user_id): "pending",
    }
    labels = {"channel": "push", "outcome": "failed"}
    family = "herald_router_delivery_reports_total"
    assert counter(service, family, **labels, result="applied") == 2
    assert counter(service, family, **labels, result="stale") == 1
    assert counter(service, family, **labels, result="unknown") == 1
    assert (
        counter(service, "herald_end_to_end_latency_seconds_count", channel="push", lane="normal")
        == 1
    )


async def test_a_redelivered_message_republishes_only_the_jobs_still_pending(
    service: RouterService, rabbit_url: str
) -> None:
    alice = user_updated(devices=2)
    await publish(service, alice)
    await wait_until(projected(service))
    event = message_created(recipient_ids=[alice.user_id])
    await publish(service, event)
    await wait_until(reaches(service, "herald_router_jobs_published_total", 1, channel="email"))
    done, still_pending = await push_jobs(rabbit_url)
    await email_jobs(rabbit_url)
    # One message's batch report, as a sender of the previous version sends it: still accepted.
    await publish(
        service,
        DeliveryBatchReported(
            message_id=event.message_id,
            channel=Channel.PUSH,
            outcome=DeliveryOutcome.DELIVERED,
            reports=[
                DeliveryReported(
                    notification_id=done.notification_id,
                    message_id=event.message_id,
                    recipient_id=alice.user_id,
                    channel=Channel.PUSH,
                    outcome=DeliveryOutcome.DELIVERED,
                )
            ],
        ),
    )
    await wait_until(reports_counted(service, 1))

    await publish(service, event)  # the copy RabbitMQ redelivers after a crash

    await wait_until(reaches(service, "herald_router_jobs_published_total", 2, channel="email"))
    await wait_until(reaches(service, "herald_router_jobs_published_total", 3, channel="push"))
    assert [job.notification_id for job in await push_jobs(rabbit_url)] == [
        still_pending.notification_id
    ]
    assert [job.notification_id for job in await email_jobs(rabbit_url)] == [
        email_id(event.message_id, alice.user_id)
    ]


async def test_migrations_on_postgresql_match_the_tables_and_rerun_cleanly(
    service: RouterService,
) -> None:
    await run_migrations(
        service.engine,
        script_location="notification_router:migrations",
        service_name="notification-router",
    )

    def differences(connection: Connection) -> list[object]:
        context = MigrationContext.configure(
            connection, opts={"version_table": "alembic_version_notification_router"}
        )
        return list(compare_metadata(context, metadata))

    async with service.engine.connect() as connection:
        assert await connection.run_sync(differences) == []
