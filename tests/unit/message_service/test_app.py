"""Assembly: settings, start-up failures, operational endpoints, documentation, HTTP limits."""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

import httpx
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from fastapi.routing import APIRoute
from sqlalchemy import Connection

from message_service import app as app_module
from message_service.app import MessageService, StartupError, create_app, specification
from message_service.models import metadata
from message_service.settings import Settings
from tests.unit.message_service.helpers import (
    CLOSED_RABBITMQ_URL,
    client_for,
    make_settings,
    running_app,
)


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "PORT": "9000",
        "DATABASE_URL": "postgresql://u@db/messages",
        "OUTBOX_RELAY_INTERVAL": "2.5",
        "OUTBOX_BATCH_SIZE": "7",
        "OUTBOX_MAX_BACKOFF": "9",
        "OUTBOX_RETENTION": "60",
        "MAX_DEVICES_PER_USER": "3",
        "MAX_BODY_BYTES": "2048",
        "RABBITMQ_URL": "amqp://u:p@mq:5673/chat",
        "RABBITMQ_PUBLISH_TIMEOUT": "2",
    }.items():
        monkeypatch.setenv(name, value)

    settings = Settings()

    assert settings.port == 9000
    assert settings.database_url == "postgresql+asyncpg://u@db/messages"
    assert (settings.outbox_relay_interval, settings.outbox_batch_size) == (2.5, 7)
    assert (settings.outbox_max_backoff, settings.outbox_retention) == (9, 60)
    assert (settings.max_devices_per_user, settings.max_body_bytes) == (3, 2048)
    assert settings.rabbitmq.url == "amqp://u:p@mq:5673/chat"
    assert settings.rabbitmq.publish_timeout == 2


def test_settings_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PORT", "DATABASE_URL", "OUTBOX_RELAY_INTERVAL", "OUTBOX_BATCH_SIZE"):
        monkeypatch.delenv(name, raising=False)

    settings = Settings()

    assert settings.port == 8000
    assert settings.database_url == "sqlite+aiosqlite:///.herald/message-service.db"
    assert (settings.outbox_relay_interval, settings.outbox_batch_size) == (1.0, 100)


async def test_unreachable_rabbitmq_stops_start_up_with_one_clear_line(
    sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(make_settings(sqlite_url))

    with caplog.at_level(logging.ERROR), pytest.raises(StartupError) as raised:
        async with app.router.lifespan_context(app):
            pytest.fail("started without RabbitMQ")

    assert str(raised.value) == "RabbitMQ unreachable at 127.0.0.1:1"
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("message_service")]
    assert len(lines) == 1
    assert "rabbitmq_unreachable address=127.0.0.1:1" in lines[0]
    assert "secret-password" not in caplog.text


async def test_an_unavailable_database_stops_start_up_without_its_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = "postgresql+asyncpg://herald:db-secret@127.0.0.1:1/messages"
    app = create_app(make_settings(url))

    with caplog.at_level(logging.ERROR), pytest.raises(StartupError):
        async with app.router.lifespan_context(app):
            pytest.fail("started without a database")

    assert "database_unavailable database=postgresql+asyncpg://herald:***@127.0.0.1:1" in (
        caplog.text
    )
    assert "db-secret" not in caplog.text


def test_the_address_in_logs_never_has_credentials() -> None:
    assert app_module.rabbitmq_address("amqp://user:pw@mq.internal/vhost") == "mq.internal:5672"
    assert app_module.rabbitmq_address("amqps://user:pw@mq:5671/") == "mq:5671"


async def test_migrated_schema_matches_the_models(runtime: MessageService) -> None:
    async with runtime.engine.connect() as connection:
        differences = await connection.run_sync(_differences)

    assert differences == []


def _differences(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(
        connection, opts={"version_table": "alembic_version_message_service"}
    )
    return list(compare_metadata(context, metadata))


async def test_health_endpoints(client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    async def up(*args: Any, **kwargs: Any) -> bool:
        return True

    # The in-memory broker has no real consumers to inspect; tests/integration/shared/
    # test_readiness.py checks that part on a real RabbitMQ.
    monkeypatch.setattr(app_module, "consumers_ready", up)
    assert (await client.get("/health")).json() == {"status": "ok"}
    ready = await client.get("/health/ready")
    assert ready.status_code == 200
    assert ready.json() == {
        "status": "ready",
        "checks": {"database": True, "rabbitmq": True, "consumers": True},
    }
    assert (await client.get("/health/rabbitmq")).json() == {"status": "healthy"}


async def test_readiness_fails_when_a_dependency_is_down(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def down(*args: Any, **kwargs: Any) -> bool:
        return False

    async def up(*args: Any, **kwargs: Any) -> bool:
        return True

    monkeypatch.setattr(app_module, "consumers_ready", up)
    monkeypatch.setattr(app_module, "database_healthy", down)
    not_ready = await client.get("/health/ready")
    monkeypatch.setattr(app_module, "broker_healthy", down)
    rabbitmq = await client.get("/health/rabbitmq")

    assert not_ready.status_code == 503
    assert not_ready.json()["checks"] == {"database": False, "rabbitmq": True, "consumers": True}
    assert rabbitmq.status_code == 503
    assert rabbitmq.json() == {"status": "unhealthy"}


async def test_metrics_expose_the_outbox_and_the_broker(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    await runtime.relay.refresh_gauges()

    response = await client.get("/metrics")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    for name in (
        "herald_message_outbox_pending",
        "herald_message_outbox_oldest_pending_age_seconds",
        "herald_message_outbox_published_total",
        "herald_message_outbox_publish_failures_total",
    ):
        assert name in response.text
    # FastStream's middleware writes into the same registry.
    assert runtime.registry.get_sample_value("herald_message_outbox_pending") is not None


async def test_openapi_lists_the_api_only(client: httpx.AsyncClient) -> None:
    assert (await client.get("/docs")).status_code == 200
    paths = (await client.get("/openapi.json")).json()["paths"]

    assert set(paths) == {
        "/users",
        "/users/me",
        "/users/me/password",
        "/users/me/sessions",
        "/users/me/sessions/{session_id}",
        "/sessions",
        "/sessions/current",
        "/sessions/current/rotate",
        "/users/me/devices",
        "/users/me/devices/{device_id}",
        "/users/me/preferences",
        "/users/me/snooze",
        "/users/me/events",
        "/users/me/presence",
        "/users/me/notifications",
        "/users/me/notifications/read",
        "/users/me/notifications/{message_id}",
        "/rooms/{room_id}/read",
        "/users/me/blocked",
        "/users/me/blocked/{user_id}",
        "/rooms",
        "/rooms/{room_id}",
        "/rooms/{room_id}/members",
        "/rooms/{room_id}/messages",
        "/rooms/{room_id}/messages/{message_id}",
        "/rooms/{room_id}/notifications",
        "/rooms/{room_id}/join",
        "/rooms/{room_id}/leave",
        "/unsubscribe",
        "/verify-email",
        "/users/me/email/verification",
    }


async def test_asyncapi_page_without_try_it_out(client: httpx.AsyncClient) -> None:
    page = await client.get("/docs/asyncapi")
    document = await client.get("/docs/asyncapi.json")

    assert page.status_code == 200
    assert "AsyncApiStandalone" in page.text
    assert "TryItPlugin" not in page.text
    assert (await client.post("/docs/asyncapi/try", json={})).status_code in {404, 405}
    assert set(document.json()["channels"]) == {
        "notification.message.new:publish",
        "room.invitation.created:publish",
        "presence.changed:publish",
        "room.read:publish",
        "room.left:publish",
        "message.updated:publish",
        "message.deleted:publish",
        "user.updated:publish",
        "notification.email.verify:publish",
        "device_invalidations:consume",
        "inbox_updates:consume",
        "email_bounces:consume",
    }


def test_specification_describes_publishers_and_subscriber() -> None:
    settings = make_settings("sqlite+aiosqlite:///:memory:")

    document = specification(settings).to_specification().to_jsonable()

    assert document["info"]["title"] == "message-service"
    channels = document["channels"]
    assert channels["notification.message.new:publish"]["bindings"]["amqp"]["exchange"]["name"] == (
        "notifications"
    )
    schemas = set(document["components"]["schemas"])
    assert {
        "MessageCreated",
        "UserUpdated",
        "DeviceInvalidated",
        "EmailVerificationRequested",
        "EmailBounced",
    } <= schemas
    assert str(settings.rabbitmq.url) == CLOSED_RABBITMQ_URL
    assert "secret-password" not in str(document)


def test_no_route_runs_a_dependency_or_an_endpoint_in_the_thread_pool() -> None:
    """FastAPI runs a plain (non-async) dependency or endpoint in its thread pool: a thread hop
    per request (`POST /rooms/{id}/messages` had four)."""
    app = create_app(make_settings("sqlite+aiosqlite:///:memory:"))

    def api_routes(routes: Iterable[Any]) -> Iterator[APIRoute]:
        for route in routes:
            if isinstance(route, APIRoute):
                yield route
            elif hasattr(route, "original_router"):  # FastAPI's included router, unflattened
                yield from api_routes(route.original_router.routes)

    def calls(dependant: Any) -> Iterator[Any]:
        yield dependant.call
        for dependency in dependant.dependencies:
            yield from calls(dependency)

    def on_the_loop(call: Any) -> bool:
        function = call if inspect.isfunction(call) else type(call).__call__
        return inspect.iscoroutinefunction(function) or inspect.isasyncgenfunction(function)

    checked = {
        (method, route.path): route
        for route in api_routes(app.routes)
        for method in route.methods or ()
    }
    assert ("POST", "/rooms/{room_id}/messages") in checked
    in_thread_pool = {
        f"{method} {path}: {getattr(call, '__qualname__', call)}"
        for (method, path), route in checked.items()
        for call in calls(route.dependant)
        if call is not None and not on_the_loop(call)
    }
    assert in_thread_pool == set()


@pytest.fixture
async def small_body_client(sqlite_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with (
        running_app(make_settings(sqlite_url, max_body_bytes=1024)) as app,
        client_for(app) as client,
    ):
        yield client


async def test_a_body_over_the_limit_is_413(small_body_client: httpx.AsyncClient) -> None:
    big = {"username": "alice", "display_name": "A", "email": "a@example.test", "x": "y" * 2000}

    declared = await small_body_client.post("/users", json=big)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(3):
            yield b"x" * 600

    streamed = await small_body_client.post(
        "/users", content=chunks(), headers={"content-type": "application/json"}
    )

    assert declared.status_code == streamed.status_code == 413
    assert declared.json() == {"detail": "request body too large"}


async def test_readiness_fails_while_consumers_are_missing(client: httpx.AsyncClient) -> None:
    # Under the in-memory broker no consumer exists on a real channel: exactly the state of a
    # service whose connection was lost and is not recovered yet.
    not_ready = await client.get("/health/ready")
    assert not_ready.status_code == 503
    assert not_ready.json()["checks"]["consumers"] is False
