"""Tracing is on only with an OTLP endpoint; without one nothing is installed or started."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import pytest
from faststream.rabbit import TestRabbitBroker
from faststream.rabbit.annotations import RabbitMessage
from faststream.rabbit.opentelemetry import RabbitTelemetryMiddleware
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from herald_shared import tracing
from herald_shared.broker import RabbitSettings, make_broker
from herald_shared.events import DeviceInvalidated
from herald_shared.publishing import event_publisher, publish_event
from herald_shared.topology import DEVICE_INVALIDATED, DEVICE_INVALIDATIONS, EXCHANGE

OTEL_VARIABLES = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_SDK_DISABLED",
    "OTEL_TRACES_EXPORTER",
    "OTEL_SERVICE_NAME",
)


@pytest.fixture
def no_otel_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def spans() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


@pytest.mark.parametrize(
    ("environ", "enabled"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": ""}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_SERVICE_NAME": "x"}, False),
    ],
)
def test_tracing_is_enabled_by_an_endpoint_only(environ: dict[str, str], enabled: bool) -> None:
    assert tracing.tracing_enabled(environ) is enabled


@pytest.mark.usefixtures("no_otel_environment")
def test_without_an_endpoint_nothing_is_installed_or_started() -> None:
    threads_before = set(threading.enumerate())
    assert tracing.build_tracer_provider("push-sender") is None
    assert tracing.configure_tracing("push-sender") is None
    # The global provider is still the API's no-op proxy, and no exporter thread runs.
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    assert tracing.configured_tracer_provider() is None
    assert set(threading.enumerate()) == threads_before
    # …so brokers leave the tracing middleware out.
    broker = make_broker(RabbitSettings(), service_name="push-sender")
    assert not any(
        isinstance(middleware, RabbitTelemetryMiddleware) for middleware in broker.middlewares
    )


def test_with_an_endpoint_spans_are_batched_to_it_over_otlp_http(
    monkeypatch: pytest.MonkeyPatch, no_otel_environment: None
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    provider = tracing.build_tracer_provider("push-sender")
    assert provider is not None
    try:
        assert provider.resource.attributes["service.name"] == "push-sender"
        processors = provider._active_span_processor._span_processors
        assert isinstance(processors[0], tracing.RedactQueryStrings)
        [batch] = [item for item in processors if isinstance(item, BatchSpanProcessor)]
        exporter = batch._batch_processor._exporter
        assert isinstance(exporter, OTLPSpanExporter)
        assert exporter._endpoint == "http://127.0.0.1:4318/v1/traces"
    finally:
        provider.shutdown()


def test_otel_service_name_wins(monkeypatch: pytest.MonkeyPatch, no_otel_environment: None) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "herald-push-eu")
    provider = tracing.build_tracer_provider("push-sender")
    assert provider is not None
    try:
        assert provider.resource.attributes["service.name"] == "herald-push-eu"
    finally:
        provider.shutdown()


def test_query_string_values_are_redacted_before_export() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(tracing.RedactQueryStrings())
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    provider.get_tracer("test").start_span(
        "GET /unsubscribe", attributes={"url.query": "token=secret-token&lang=en"}
    ).end()
    [span] = exporter.get_finished_spans()
    assert span.attributes is not None
    assert span.attributes["url.query"] == "token=REDACTED&lang=REDACTED"


def test_a_stored_traceparent_continues_its_trace(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = spans
    tracer = provider.get_tracer("test")
    assert tracing.current_traceparent() is None  # outside any span
    with tracer.start_as_current_span("request") as request:
        traceparent = tracing.current_traceparent()
    assert traceparent is not None
    with tracing.continued_trace(traceparent), tracer.start_as_current_span("relay publish"):
        pass
    with tracing.continued_trace(None), tracer.start_as_current_span("unrelated"):
        pass
    finished = {span.name: span for span in exporter.get_finished_spans()}
    relay = finished["relay publish"]
    assert relay.context.trace_id == request.get_span_context().trace_id
    assert relay.parent is not None
    assert relay.parent.span_id == request.get_span_context().span_id
    assert finished["unrelated"].context.trace_id != request.get_span_context().trace_id


async def test_a_traced_broker_sends_the_trace_context_and_an_untraced_one_does_not(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, _ = spans
    headers: list[dict[str, object]] = []
    for tracer_provider in (provider, None):
        broker = make_broker(
            RabbitSettings(), service_name="message-service", tracer_provider=tracer_provider
        )
        publisher = event_publisher(
            broker, DeviceInvalidated, DEVICE_INVALIDATED, description="test"
        )

        @broker.subscriber(DEVICE_INVALIDATIONS.queue, EXCHANGE)
        async def handle(event: DeviceInvalidated, message: RabbitMessage) -> None:
            headers.append(dict(message.headers))

        event = DeviceInvalidated(user_id=uuid.uuid4(), device_id=uuid.uuid4(), reason="test")
        async with TestRabbitBroker(broker):
            await publish_event(publisher, event, timeout=5)
    traced, untraced = headers
    assert "traceparent" in traced
    assert "traceparent" not in untraced
