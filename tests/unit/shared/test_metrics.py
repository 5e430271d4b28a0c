"""Every shared series on `/metrics`, with its labels, after the action that feeds it: the
services' own app factories on the in-memory broker, scraped over ASGI."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from faststream import TestApp
from faststream.rabbit import RabbitBroker, RabbitQueue, TestRabbitBroker
from prometheus_client import CollectorRegistry

from herald_shared.events import (
    Channel,
    DeliveryOutcome,
    DeliveryReported,
    Event,
    PushJobsRequested,
    utc_now,
)
from herald_shared.metrics import EventLoopLag, herald_metrics, refresh_broker_gauges
from herald_shared.retry import PermanentError
from herald_shared.topology import (
    EXCHANGE,
    MESSAGE_NOTIFICATIONS,
    PUSH_SEND,
    RETRY_EXCHANGE,
    routing_key_for,
)
from notification_router.app import RouterService
from notification_router.app import build_service as build_router
from notification_router.settings import Settings as RouterSettings
from push_sender.app import PushService
from push_sender.app import build_service as build_push
from tests.support.router_factories import message_created, user_updated
from tests.unit.push_sender.support import RecordingProvider, push_job, unit_settings


async def scrape(app: Any) -> str:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/metrics")
    assert response.status_code == 200
    return response.text


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the sample `name{labels}` in an exposition, labels in any order."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        series, _, value = line.rpartition(" ")
        metric, _, label_text = series.partition("{")
        if metric != name:
            continue
        found = dict(
            part.split("=", 1) for part in label_text.rstrip("}").split(",") if "=" in part
        )
        if {key: value.strip('"') for key, value in found.items()} == labels:
            return float(value)
    return None


def park_retries_and_dead_letters(broker: RabbitBroker) -> dict[str, list[Any]]:
    """Stand-ins for the wait queue and the dead-letter queue of `message_notifications`: the
    in-memory broker routes only to subscribers, and the retry middleware's republish must land
    somewhere (on RabbitMQ they are queues without consumers)."""
    parked: dict[str, list[Any]] = {"wait": [], "dlq": []}
    wait_queue = MESSAGE_NOTIFICATIONS.wait_queue(1.0).name  # the first default tier

    @broker.subscriber(RabbitQueue(wait_queue, routing_key=wait_queue), RETRY_EXCHANGE)
    async def waiting(body: Any) -> None:
        parked["wait"].append(body)

    dead_letter_queue = MESSAGE_NOTIFICATIONS.dead_letter_queue.name

    @broker.subscriber(
        RabbitQueue(dead_letter_queue, routing_key=dead_letter_queue), RETRY_EXCHANGE
    )
    async def dead(body: Any) -> None:
        parked["dlq"].append(body)

    return parked


@pytest.fixture
async def router(sqlite_url: str) -> AsyncIterator[tuple[RouterService, dict[str, list[Any]]]]:
    service = build_router(RouterSettings(database_url=sqlite_url))
    parked = park_retries_and_dead_letters(service.broker)
    async with TestRabbitBroker(service.broker), TestApp(service.app):
        yield service, parked


async def publish(broker: RabbitBroker, event: Event) -> None:
    await broker.publish(event, exchange=EXCHANGE, routing_key=routing_key_for(event))


async def test_a_routed_message_is_counted_processed_published_and_timed(
    router: tuple[RouterService, dict[str, list[Any]]],
) -> None:
    service, _ = router
    alice = user_updated(devices=1)
    await publish(service.broker, alice)
    await publish(service.broker, message_created(recipient_ids=[alice.user_id]))

    text = await scrape(service.app)

    processed = "herald_messages_processed_total"
    assert sample(text, processed, queue="message_notifications", outcome="success") == 1.0
    assert sample(text, processed, queue="recipient_updates", outcome="success") == 1.0
    published = "herald_messages_published_total"
    assert sample(text, published, routing_key="notification.push.send", result="ok") == 1.0
    assert sample(text, published, routing_key="notification.email.send", result="ok") == 1.0
    assert (
        sample(text, "herald_message_processing_seconds_count", queue="message_notifications")
        == 1.0
    )
    # The retry middleware published nothing: retries at 0 (present, so a rate answers 0), no
    # dead-letter series yet; nor did any publish fail.
    assert sample(text, "herald_message_retries_total", queue="message_notifications") == 0.0
    assert sample(text, "herald_message_deferrals_total", queue="message_notifications") == 0.0
    assert sample(text, processed, queue="message_notifications", outcome="error") == 0.0
    assert sample(text, published, routing_key="notification.push.send", result="error") == 0.0
    assert (
        sample(text, "herald_messages_dead_lettered_total", queue="message_notifications") is None
    )
    # This process's consumers are reported per queue (the in-memory broker has no channel, so
    # they are not "alive"; the real broker's case is in ops' readiness tests).
    for queue in ("message_notifications", "recipient_updates", "delivery_reports"):
        assert sample(text, "herald_consumers", queue=queue) is not None


async def test_a_failed_handler_counts_an_error_of_its_class_and_a_retry(
    router: tuple[RouterService, dict[str, list[Any]]],
) -> None:
    service, parked = router
    # No projection of the recipient yet: the router raises RetryableError.
    await publish(service.broker, message_created(recipient_ids=[uuid.uuid4()]))

    assert len(parked["wait"]) == 1
    text = await scrape(service.app)
    queue = "message_notifications"
    assert sample(text, "herald_messages_processed_total", queue=queue, outcome="error") == 1.0
    assert (
        sample(text, "herald_message_errors_total", queue=queue, error_type="RetryableError") == 1.0
    )
    assert sample(text, "herald_message_retries_total", queue=queue) == 1.0


async def test_a_permanent_failure_counts_a_dead_letter_by_reason(
    router: tuple[RouterService, dict[str, list[Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    service, parked = router

    async def refuse(*args: Any, **kwargs: Any) -> None:
        raise PermanentError("refused for the test")

    # The batch that takes the message fails: each of its messages is dead-lettered.
    monkeypatch.setattr("notification_router.repository.load_recipients", refuse)
    await publish(service.broker, message_created(recipient_ids=[uuid.uuid4()]))

    assert len(parked["dlq"]) == 1
    text = await scrape(service.app)
    dead = "herald_messages_dead_lettered_total"
    assert sample(text, dead, queue="message_notifications", reason="permanent") == 1.0


async def test_the_first_delivered_report_observes_end_to_end_latency_once(
    router: tuple[RouterService, dict[str, list[Any]]],
) -> None:
    service, _ = router
    alice = user_updated(devices=1)
    await publish(service.broker, alice)
    event = message_created(recipient_ids=[alice.user_id])
    await publish(service.broker, event)
    job = PushJobsRequested.model_validate(
        service.deps.publishers[PUSH_SEND].mock.call_args.args[0]
    ).jobs[0]
    report = DeliveryReported(
        notification_id=job.notification_id,
        message_id=job.message_id,
        recipient_id=job.recipient_id,
        channel=Channel.PUSH,
        outcome=DeliveryOutcome.DELIVERED,
    )

    await publish(service.broker, report)
    await publish(service.broker, report)  # a redelivery: already delivered, not observed again

    text = await scrape(service.app)
    e2e = "herald_end_to_end_latency_seconds"
    assert sample(text, f"{e2e}_count", channel="push", lane="normal") == 1.0
    latency = sample(text, f"{e2e}_sum", channel="push", lane="normal")
    assert latency is not None
    assert 0.0 <= latency <= (utc_now() - event.timestamp).total_seconds()
    assert sample(text, f"{e2e}_count", channel="email", lane="normal") is None


class FakeProbe:
    def __init__(
        self, depths: dict[str, tuple[int, int]], every_queue: tuple[int, int] | None = None
    ) -> None:
        self.depths = depths
        self.every_queue = every_queue  # the answer for a queue not in `depths`, if any
        self.asked: list[str] = []
        self.answering = asyncio.Event()
        self.answering.set()

    async def inspect(self, queue: str) -> tuple[int, int]:
        self.asked.append(queue)
        await self.answering.wait()
        if queue in self.depths:
            return self.depths[queue]
        if self.every_queue is None:
            raise ConnectionError("no such queue")
        return self.every_queue


async def test_queue_depth_and_consumers_come_from_rabbitmq_and_vanish_when_it_cannot_answer(
    sqlite_url: str,
) -> None:
    registry = CollectorRegistry()
    service = build_router(RouterSettings(database_url=sqlite_url))
    metrics = herald_metrics(service.registry)
    assert metrics is herald_metrics(service.registry)  # one set of series per registry
    assert herald_metrics(registry) is not metrics
    probe = FakeProbe(
        {
            "message_notifications": (7, 2),
            "message_notifications.dlq": (1, 0),
            "recipient_updates": (0, 2),
            "recipient_updates.dlq": (0, 0),
            "presence_updates": (0, 2),
            "presence_updates.dlq": (0, 0),
            "read_markers": (0, 2),
            "read_markers.dlq": (0, 0),
            "message_changes": (0, 2),
            "message_changes.dlq": (0, 0),
            "delivery_reports": (3, 0),
            "delivery_reports.dlq": (0, 0),
            # The queues the router's jobs feed (push-sender's and email-sender's).
            "push_notifications": (5, 0),
            "push_notifications.dlq": (0, 0),
            "push_notifications_urgent": (0, 1),
            "push_notifications_urgent.dlq": (0, 0),
            "email_notifications": (0, 1),
            "email_notifications.dlq": (0, 0),
            "email_notifications_urgent": (0, 1),
            "email_notifications_urgent.dlq": (0, 0),
            "inbox_updates": (0, 1),
            "inbox_updates.dlq": (0, 0),
        }
    )

    await refresh_broker_gauges(service.broker, metrics, probe=probe)

    value = service.registry.get_sample_value
    assert value("herald_queue_depth", {"queue": "message_notifications"}) == 7
    assert value("herald_queue_depth", {"queue": "message_notifications.dlq"}) == 1
    assert value("herald_queue_depth", {"queue": "delivery_reports"}) == 3
    assert value("herald_queue_consumers", {"queue": "message_notifications"}) == 2
    assert value("herald_queue_consumers", {"queue": "delivery_reports"}) == 0
    # A fed queue's consumers too: push-sender gone shows as 0 here, not as no series.
    assert value("herald_queue_consumers", {"queue": "push_notifications"}) == 0
    assert value("herald_queue_depth", {"queue": "push_notifications"}) == 5
    # This process's own consumers are only of what it consumes.
    assert value("herald_consumers", {"queue": "push_notifications"}) is None
    # RabbitMQ's consumer count is for work queues; a .dlq has none by design.
    assert value("herald_queue_consumers", {"queue": "message_notifications.dlq"}) is None
    assert value("herald_consumers", {"queue": "message_notifications"}) == 0  # not started

    del probe.depths["delivery_reports.dlq"]
    await refresh_broker_gauges(service.broker, metrics, probe=probe)

    assert value("herald_queue_depth", {"queue": "message_notifications"}) is None
    assert value("herald_queue_consumers", {"queue": "message_notifications"}) is None


async def test_a_scrape_that_rabbitmq_answers_late_answers_without_depths_and_cancels_nothing(
    sqlite_url: str,
) -> None:
    """aiormq closes the channel of a cancelled call, and the clean-up can outlast the deadline:
    so a late probe is left to finish, and scrapes in the meantime do not ask again."""
    service = build_router(RouterSettings(database_url=sqlite_url))
    metrics = herald_metrics(service.registry)
    probe = FakeProbe({}, every_queue=(7, 2))  # 7 ready, 2 consumers
    probe.answering.clear()

    await refresh_broker_gauges(service.broker, metrics, probe=probe, timeout=0.01)
    await refresh_broker_gauges(service.broker, metrics, probe=probe, timeout=0.01)

    (first,) = probe.asked  # the first call waits on its first queue; the second did not ask
    value = service.registry.get_sample_value
    assert value("herald_queue_depth", {"queue": first}) is None
    probe.answering.set()
    await refresh_broker_gauges(service.broker, metrics, probe=probe, timeout=5)

    # The late call was not cancelled: it went on, and its answer is the one used.
    assert probe.asked.count(first) == 1
    assert len(probe.asked) > 1
    assert value("herald_queue_depth", {"queue": first}) == 7


@pytest.fixture
async def push(sqlite_url: str, tmp_path: Path) -> AsyncIterator[PushService]:
    service = build_push(unit_settings(tmp_path, sqlite_url), provider=RecordingProvider())
    async with TestRabbitBroker(service.broker), TestApp(service.app):
        yield service


async def test_push_sender_reports_its_breakers_and_what_it_publishes(push: PushService) -> None:
    await push.broker.publish(push_job(), exchange=EXCHANGE, routing_key="notification.push.send")

    text = await scrape(push.app)

    assert sample(text, "herald_push_breaker_state", provider="recording") == 0.0
    assert (
        sample(
            text, "herald_messages_processed_total", queue="push_notifications", outcome="success"
        )
        == 1.0
    )
    published = "herald_messages_published_total"
    assert sample(text, published, routing_key="notification.push.delivered", result="ok") == 1.0


async def test_the_event_loop_lag_is_how_long_other_work_held_the_loop() -> None:
    registry = CollectorRegistry()
    lag = EventLoopLag(herald_metrics(registry).event_loop_lag, interval=0.01)

    def count(le: str = "+Inf") -> float:
        bucket = {"le": le}
        return registry.get_sample_value("herald_event_loop_lag_seconds_bucket", bucket) or 0.0

    async def until(condition: Callable[[], bool]) -> None:
        async with asyncio.timeout(5):
            while not condition():  # noqa: ASYNC110 - a counter to poll, nothing to wait on
                await asyncio.sleep(0.01)

    lag.start()
    await until(lambda: count() >= 3)
    # The rule under test: a handler holding the loop, as CPU work does.
    time.sleep(0.3)  # noqa: ASYNC251
    await until(lambda: count("0.1") < count())
    await lag.stop()
    assert (registry.get_sample_value("herald_event_loop_lag_seconds_sum") or 0.0) >= 0.25
