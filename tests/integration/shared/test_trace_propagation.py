"""One trace across two hops on a real RabbitMQ: a publish, a consumer that publishes again (as the
router does) in one service, and a second consumer (as a sender) in another."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from faststream.rabbit.annotations import RabbitMessage
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from herald_shared.broker import RabbitSettings, make_broker
from herald_shared.events import MessageCreated, Platform, PushRequested, SenderInfo
from herald_shared.logs import JsonFormatter
from herald_shared.publishing import event_publisher, publish_event
from herald_shared.topology import (
    EXCHANGE,
    MESSAGE_NEW,
    MESSAGE_NOTIFICATIONS,
    PUSH_NOTIFICATIONS,
    PUSH_SEND,
    declare_topology,
)
from tests.support.infra import wait_until

PLANTED_TOKEN = "planted-device-token-5f1c"
PLANTED_TEXT = "planted message text 9a2e"


@pytest.fixture
def spans() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """What the sender's logger writes, as JSON lines."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter("push-sender"))
    logger = logging.getLogger("trace_test.sender")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield out
    logger.removeHandler(handler)


def _message_created() -> MessageCreated:
    sender = uuid.uuid4()
    return MessageCreated(
        message_id=uuid.uuid4(),
        room_id=uuid.uuid4(),
        sender_id=sender,
        recipient_ids=[uuid.uuid4()],
        message_content=PLANTED_TEXT,
        sender_info=SenderInfo(user_id=sender, username="ann", display_name="Ann"),
        timestamp=datetime.now(UTC),
    )


def _push_for(message: MessageCreated) -> PushRequested:
    return PushRequested(
        notification_id=uuid.uuid4(),
        message_id=message.message_id,
        room_id=message.room_id,
        recipient_id=message.recipient_ids[0],
        device_id=uuid.uuid4(),
        platform=Platform.FCM,
        token=PLANTED_TOKEN,
        title="Ann",
        body=PLANTED_TEXT,
    )


async def test_one_trace_from_the_first_publish_to_the_second_consumer(
    rabbit_url: str,
    spans: tuple[TracerProvider, InMemorySpanExporter],
    json_lines: io.StringIO,
) -> None:
    provider, exporter = spans
    settings = RabbitSettings(url=rabbit_url, retry_delays=(0.5,))
    router = make_broker(settings, service_name="router", tracer_provider=provider)
    sender = make_broker(settings, service_name="sender", tracer_provider=provider)
    new_message = event_publisher(router, MessageCreated, MESSAGE_NEW, description="test")
    push_send = event_publisher(router, PushRequested, PUSH_SEND, description="test")
    pushes: dict[str, PushRequested] = {}
    seen_by_sender: asyncio.Future[tuple[int, str]] = asyncio.get_running_loop().create_future()

    @router.subscriber(MESSAGE_NOTIFICATIONS.queue, EXCHANGE)
    async def route(event: MessageCreated) -> None:
        push = _push_for(event)
        pushes["sent"] = push
        await publish_event(push_send, push, timeout=5)

    @sender.subscriber(PUSH_NOTIFICATIONS.queue, EXCHANGE)
    async def send(event: PushRequested) -> None:
        logging.getLogger("trace_test.sender").info(
            "push.delivered notification_id=%s", event.notification_id
        )
        span_context = trace.get_current_span().get_span_context()
        seen_by_sender.set_result((span_context.trace_id, str(event.notification_id)))

    await declare_topology(router, retry_delays=settings.retry_delays)
    await router.start()
    await sender.start()
    try:
        created = _message_created()
        with provider.get_tracer("test").start_as_current_span("POST /messages") as request:
            await publish_event(new_message, created, timeout=5)
        trace_id = request.get_span_context().trace_id
        sender_trace_id, notification_id = await asyncio.wait_for(seen_by_sender, timeout=10)
    finally:
        await sender.stop()
        await router.stop()

    assert sender_trace_id == trace_id
    assert notification_id == str(pushes["sent"].notification_id)
    finished = exporter.get_finished_spans()
    consumers = [span for span in finished if span.kind is SpanKind.CONSUMER]
    producers = [span for span in finished if span.kind is SpanKind.PRODUCER]
    # A process span per consumer, and the publishes of both hops, all in the request's trace.
    assert {span.name for span in consumers} >= {
        f"notifications.{MESSAGE_NEW} process",
        f"notifications.{PUSH_SEND} process",
    }
    assert {span.name for span in producers} >= {
        f"notifications.{MESSAGE_NEW} publish",
        f"notifications.{PUSH_SEND} publish",
    }
    assert {span.context.trace_id for span in finished} == {trace_id}

    # The sender's log line: JSON, with the trace, the ids of the message being consumed, the
    # correlation id carried over from the first event, and nothing from the body.
    [line] = [json.loads(text) for text in json_lines.getvalue().splitlines()]
    assert line["trace_id"] == format(trace_id, "032x")
    assert line["notification_id"] == notification_id
    assert line["message_id"] == str(created.message_id)
    assert line["event_id"] == str(pushes["sent"].event_id)
    assert line["correlation_id"] == str(created.event_id)
    assert PLANTED_TOKEN not in json_lines.getvalue()
    assert PLANTED_TEXT not in json_lines.getvalue()


async def test_without_a_provider_no_trace_context_travels(rabbit_url: str) -> None:
    """Without a provider the brokers carry no trace context at all (nothing is invented)."""
    settings = RabbitSettings(url=rabbit_url, retry_delays=(0.5,))
    router = make_broker(settings, service_name="router")
    new_message = event_publisher(router, MessageCreated, MESSAGE_NEW, description="test")
    headers: list[dict[str, object]] = []

    @router.subscriber(MESSAGE_NOTIFICATIONS.queue, EXCHANGE)
    async def route(event: MessageCreated, message: RabbitMessage) -> None:
        headers.append(dict(message.headers))

    await declare_topology(router, retry_delays=settings.retry_delays)
    await router.start()
    try:
        await publish_event(new_message, _message_created(), timeout=5)

        async def consumed() -> bool:
            return bool(headers)

        await wait_until(consumed, timeout=10)
    finally:
        await router.stop()
    assert "traceparent" not in headers[0]
