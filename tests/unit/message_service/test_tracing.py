"""The trace of an API request reaches the relay's publish, which runs later in its own task,
through the `traceparent` stored with the outbox row."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from fastapi import FastAPI
from faststream.rabbit import TestRabbitBroker
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from message_service.app import create_app, service_of
from tests.support.infra import wait_until
from tests.unit.message_service.helpers import client_for, make_settings, outbox_rows, register


@pytest.fixture
def spans() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


@pytest.fixture
async def traced_app(
    sqlite_url: str, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> AsyncIterator[FastAPI]:
    app = create_app(make_settings(sqlite_url), tracer_provider=spans[0])
    async with TestRabbitBroker(service_of(app).broker), app.router.lifespan_context(app):
        yield app


async def test_the_relay_publishes_within_the_trace_of_the_request(
    traced_app: FastAPI, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    _, exporter = spans
    traced_runtime = service_of(traced_app)
    async with client_for(traced_app) as client:
        await register(client, "ann")
        assert (await client.get("/health")).status_code == 200

    [server] = [span for span in exporter.get_finished_spans() if span.kind is SpanKind.SERVER]
    assert server.name == "POST /users"  # probes are not traced
    trace_id = server.context.trace_id
    # Its user's snapshot and the verification e-mail of their address, both in its trace.
    rows = await outbox_rows(traced_runtime)
    assert sorted(row.event_type for row in rows) == [
        "email_verification_requested",
        "user_updated",
    ]
    for row in rows:
        assert row.traceparent is not None
        assert row.traceparent.split("-")[1] == format(trace_id, "032x")

    async def relayed() -> bool:
        return all(row.published_at is not None for row in await outbox_rows(traced_runtime))

    await wait_until(relayed, timeout=10)
    publishes = [
        span
        for span in exporter.get_finished_spans()
        if span.kind is SpanKind.PRODUCER and span.name == "notifications.user.updated publish"
    ]
    assert publishes
    assert {span.context.trace_id for span in publishes} == {trace_id}


async def test_without_a_tracer_no_traceparent_is_stored(sqlite_url: str) -> None:
    app = create_app(make_settings(sqlite_url))
    runtime = service_of(app)
    async with (
        TestRabbitBroker(runtime.broker),
        app.router.lifespan_context(app),
        client_for(app) as client,
    ):
        await register(client, "bob")
        rows = await outbox_rows(runtime)
    assert rows
    assert all(row.traceparent is None for row in rows)
