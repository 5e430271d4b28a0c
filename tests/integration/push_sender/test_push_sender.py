"""push-sender on the machine's real RabbitMQ and PostgreSQL, pushing to the fake FCM server:
exactly-once delivery of duplicated jobs and deliveries, reports on their routing keys, retries
of a delivery with backoff (only its unfinished jobs sent again) and dead letters, which the
in-memory broker cannot show."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aio_pika
import pytest
from faststream import TestApp

from herald_shared.broker import RabbitSettings
from herald_shared.events import (
    DeliveriesReported,
    DeviceInvalidated,
    Event,
    PushJobsRequested,
    PushRequested,
)
from herald_shared.ledger import DeliveryStatus
from herald_shared.retry import ATTEMPT_HEADER, REASON_HEADER
from herald_shared.topology import (
    DELIVERY_REPORTS,
    DEVICE_INVALIDATIONS,
    EXCHANGE,
    PUSH_DELIVERED,
    PUSH_FAILED,
    PUSH_NOTIFICATIONS,
    PUSH_SEND,
)
from push_sender.app import PushService, build_service
from tests.fakes.fcm import FakeFcm
from tests.support.infra import wait_until
from tests.unit.push_sender.support import (
    DEVICE_TOKEN,
    batch_of,
    fcm_settings,
    jobs_event,
    push_job,
    push_jobs,
)

RETRY_DELAYS = (0.2, 0.4, 0.8)


@pytest.fixture
async def service(
    pg_url: str, rabbit_url: str, fcm: FakeFcm, credentials: Path, tmp_path: Path
) -> AsyncIterator[PushService]:
    settings = fcm_settings(
        tmp_path,
        pg_url,
        credentials=credentials,
        base_url=fcm.base_url,
        rabbitmq=RabbitSettings(url=rabbit_url, retry_delays=RETRY_DELAYS, prefetch=10),
    )
    service = build_service(settings)
    # The real start-up (migrations, connection, topology) and the real shutdown.
    async with TestApp(service.app):
        yield service


async def publish(service: PushService, job: Event) -> None:
    await service.broker.publish(
        job, exchange=EXCHANGE, routing_key=PUSH_SEND, persist=True, message_id=str(job.event_id)
    )


def notifications(message: aio_pika.abc.AbstractIncomingMessage) -> set[uuid.UUID]:
    """The notifications a report event on the broker reports."""
    report = DeliveriesReported.model_validate_json(message.body)
    return {item.notification_id for item in report.reports}


def ids(*jobs: PushRequested) -> set[uuid.UUID]:
    return {job.notification_id for job in jobs}


def counter(service: PushService, outcome: str) -> float:
    labels = {"provider": "fcm", "outcome": outcome}
    return service.registry.get_sample_value("herald_pushes_total", labels) or 0.0


def reaches(service: PushService, outcome: str, target: float) -> Callable[[], Awaitable[bool]]:
    async def condition() -> bool:
        return counter(service, outcome) >= target

    return condition


async def queue_depth(rabbit_url: str, queue_name: str) -> int:
    connection = await aio_pika.connect(rabbit_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, passive=True)
        return int(queue.declaration_result.message_count or 0)


def depth_reaches(rabbit_url: str, queue_name: str, target: int) -> Callable[[], Awaitable[bool]]:
    async def condition() -> bool:
        return await queue_depth(rabbit_url, queue_name) >= target

    return condition


async def drain(rabbit_url: str, queue_name: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    connection = await aio_pika.connect(rabbit_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(queue_name)
        messages = []
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            messages.append(message)
        return messages


async def test_a_job_published_twice_is_pushed_once_and_reported_once(
    service: PushService, fcm: FakeFcm, rabbit_url: str
) -> None:
    job = push_job()

    # Two copies at once, prefetch 10: two handlers race for the same notification.
    await asyncio.gather(publish(service, job), publish(service, job))

    await wait_until(reaches(service, "delivered", 1), timeout=20)
    await wait_until(reaches(service, "duplicate", 1), timeout=20)
    await wait_until(depth_reaches(rabbit_url, DELIVERY_REPORTS.name, 1), timeout=20)
    assert len(fcm.accepted) == 1
    assert fcm.accepted[0]["message"]["data"]["notification_id"] == str(job.notification_id)
    reports = await drain(rabbit_url, DELIVERY_REPORTS.name)
    assert [message.routing_key for message in reports] == [PUSH_DELIVERED]
    report = DeliveriesReported.model_validate_json(reports[0].body)
    assert report.outcome == "delivered"
    assert notifications(reports[0]) == ids(job)
    assert reports[0].delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    entry = await service.sender.ledger.get(job.notification_id)
    assert entry is not None
    assert (entry.status, entry.attempts, entry.reported) == (DeliveryStatus.DELIVERED, 1, True)
    for name in (PUSH_NOTIFICATIONS.name, f"{PUSH_NOTIFICATIONS.name}.dlq"):
        assert await queue_depth(rabbit_url, name) == 0


async def test_a_token_failing_twice_with_503_is_delivered_after_retries(
    service: PushService, fcm: FakeFcm, rabbit_url: str
) -> None:
    fcm.fail(DEVICE_TOKEN, 503, "UNAVAILABLE", times=2)
    job = push_job()

    await publish(service, job)

    await wait_until(reaches(service, "delivered", 1), timeout=20)
    assert counter(service, "retry") == 2
    assert fcm.send_requests == 3
    assert len(fcm.accepted) == 1
    entry = await service.sender.ledger.get(job.notification_id)
    assert entry is not None
    assert (entry.status, entry.attempts) == (DeliveryStatus.DELIVERED, 3)
    await wait_until(depth_reaches(rabbit_url, DELIVERY_REPORTS.name, 1), timeout=20)
    [report] = await drain(rabbit_url, DELIVERY_REPORTS.name)
    assert report.routing_key == PUSH_DELIVERED
    assert await queue_depth(rabbit_url, f"{PUSH_NOTIFICATIONS.name}.dlq") == 0


async def test_a_dead_token_invalidates_the_device_without_retrying(
    service: PushService, fcm: FakeFcm, rabbit_url: str
) -> None:
    fcm.fail(DEVICE_TOKEN, 404, "UNREGISTERED")
    job = push_job()

    await publish(service, job)

    await wait_until(depth_reaches(rabbit_url, DEVICE_INVALIDATIONS.name, 1), timeout=20)
    await wait_until(depth_reaches(rabbit_url, DELIVERY_REPORTS.name, 1), timeout=20)
    [invalidation] = await drain(rabbit_url, DEVICE_INVALIDATIONS.name)
    event = DeviceInvalidated.model_validate_json(invalidation.body)
    assert (event.user_id, event.device_id) == (job.recipient_id, job.device_id)
    [report] = await drain(rabbit_url, DELIVERY_REPORTS.name)
    assert report.routing_key == PUSH_FAILED
    assert fcm.send_requests == 1
    assert counter(service, "retry") == 0
    assert await queue_depth(rabbit_url, f"{PUSH_NOTIFICATIONS.name}.dlq") == 0


async def test_a_refused_push_is_reported_and_dead_lettered(
    service: PushService, fcm: FakeFcm, rabbit_url: str
) -> None:
    fcm.fail(DEVICE_TOKEN, 400, "INVALID_ARGUMENT")
    job = push_job()

    await publish(service, job)

    dead_letters = f"{PUSH_NOTIFICATIONS.name}.dlq"
    await wait_until(depth_reaches(rabbit_url, dead_letters, 1), timeout=20)
    [parked] = await drain(rabbit_url, dead_letters)
    assert json.loads(parked.body)["notification_id"] == str(job.notification_id)
    assert parked.headers[REASON_HEADER] == "permanent"
    assert parked.headers[ATTEMPT_HEADER] == 1
    [report] = await drain(rabbit_url, DELIVERY_REPORTS.name)
    assert report.routing_key == PUSH_FAILED
    [item] = DeliveriesReported.model_validate_json(report.body).reports
    assert item.reason == "fcm 400 INVALID_ARGUMENT"
    assert fcm.send_requests == 1


async def test_a_batch_published_twice_at_once_is_pushed_once_and_reported_once(
    service: PushService, fcm: FakeFcm, rabbit_url: str
) -> None:
    """`PushBatchRequested`, as a router of the previous version publishes it: still accepted."""
    jobs = push_jobs(5)
    batch = batch_of(*jobs)

    await asyncio.gather(publish(service, batch), publish(service, batch))

    await wait_until(reaches(service, "delivered", 5), timeout=20)
    # The copy that lost the race waits (`Busy`), then finds every job final and reported.
    await wait_until(reaches(service, "duplicate", 5), timeout=20)
    assert len(fcm.accepted) == 5
    reports = await drain(rabbit_url, DELIVERY_REPORTS.name)
    assert {message.routing_key for message in reports} == {PUSH_DELIVERED}
    reported = [notifications(message) for message in reports]
    assert sorted(id_ for batch_ids in reported for id_ in batch_ids) == sorted(ids(*jobs))
    for job in jobs:
        entry = await service.sender.ledger.get(job.notification_id)
        assert entry is not None
        assert (entry.status, entry.attempts, entry.reported) == (DeliveryStatus.DELIVERED, 1, True)
    assert await queue_depth(rabbit_url, f"{PUSH_NOTIFICATIONS.name}.dlq") == 0


async def test_a_delivery_with_mixed_outcomes_is_retried_for_its_transient_job_only(
    service: PushService, fcm: FakeFcm, rabbit_url: str
) -> None:
    # Jobs of two messages in one event, as the router publishes them now.
    accepted = push_job(token=f"{DEVICE_TOKEN}-accepted")
    dead = push_job(token=f"{DEVICE_TOKEN}-dead")
    flaky = push_job(message_id=dead.message_id, token=f"{DEVICE_TOKEN}-flaky")
    fcm.fail(dead.token, 404, "UNREGISTERED")
    fcm.fail(flaky.token, 503, "UNAVAILABLE", times=1)

    await publish(service, jobs_event(accepted, dead, flaky))

    await wait_until(reaches(service, "delivered", 2), timeout=20)
    await wait_until(depth_reaches(rabbit_url, DELIVERY_REPORTS.name, 3), timeout=20)
    reports = await drain(rabbit_url, DELIVERY_REPORTS.name)
    by_key = [(message.routing_key, notifications(message)) for message in reports]
    # The first attempt's two reports are published together, in either order.
    assert sorted(by_key[:2], key=lambda item: str(item[0])) == [
        (PUSH_DELIVERED, ids(accepted)),
        (PUSH_FAILED, ids(dead)),
    ]
    assert by_key[2:] == [(PUSH_DELIVERED, ids(flaky))]  # after the delivery's retry
    [invalidation] = await drain(rabbit_url, DEVICE_INVALIDATIONS.name)
    assert DeviceInvalidated.model_validate_json(invalidation.body).device_id == dead.device_id
    assert fcm.send_requests == 4  # three, then the flaky one alone
    assert [len(fcm.messages_to(job.token)) for job in (accepted, dead, flaky)] == [1, 0, 1]
    entry = await service.sender.ledger.get(flaky.notification_id)
    assert entry is not None
    assert (entry.status, entry.attempts) == (DeliveryStatus.DELIVERED, 2)
    assert counter(service, "retry") == 1
    assert await queue_depth(rabbit_url, f"{PUSH_NOTIFICATIONS.name}.dlq") == 0


async def test_a_delivery_out_of_retries_is_dead_lettered_and_reported_failed_in_one_event(
    service: PushService, fcm: FakeFcm, rabbit_url: str
) -> None:
    accepted = push_job(token=f"{DEVICE_TOKEN}-accepted")
    down = push_job(token=f"{DEVICE_TOKEN}-down")  # another message's
    fcm.fail(down.token, 503, "UNAVAILABLE")  # for ever

    await publish(service, jobs_event(accepted, down))

    dead_letters = f"{PUSH_NOTIFICATIONS.name}.dlq"
    await wait_until(depth_reaches(rabbit_url, dead_letters, 1), timeout=30)
    await wait_until(depth_reaches(rabbit_url, DELIVERY_REPORTS.name, 2), timeout=20)
    [parked] = await drain(rabbit_url, dead_letters)
    assert parked.headers[REASON_HEADER] == "retries-exhausted"
    assert PushJobsRequested.model_validate_json(parked.body).jobs == [accepted, down]
    delivered, failed = await drain(rabbit_url, DELIVERY_REPORTS.name)
    assert (delivered.routing_key, notifications(delivered)) == (PUSH_DELIVERED, ids(accepted))
    # Every job of the delivery: the router keeps the delivered one delivered.
    assert (failed.routing_key, notifications(failed)) == (PUSH_FAILED, ids(accepted, down))
    report = DeliveriesReported.model_validate_json(failed.body)
    assert {item.reason for item in report.reports} == {"retries exhausted"}
    assert len(fcm.messages_to(accepted.token)) == 1
    assert fcm.send_requests == 2 + 3  # both, then the one that keeps failing on each retry
