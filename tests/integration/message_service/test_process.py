"""The `message-service` console script as a process: it serves, shuts down cleanly on SIGTERM,
and refuses to start without RabbitMQ, saying where it looked."""

from __future__ import annotations

import asyncio
import socket
import subprocess
from pathlib import Path

import httpx
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection

from herald_shared.database import run_migrations
from message_service.app import create_app, service_of
from message_service.models import metadata
from tests.integration.message_service.helpers import settings_for
from tests.support.processes import ServiceProcess, free_port


async def test_the_service_serves_and_stops_cleanly(
    pg_url: str, rabbit_url: str, tmp_path: Path
) -> None:
    service = ServiceProcess(
        name="message-service",
        port=free_port(),
        env={"DATABASE_URL": pg_url, "RABBITMQ_URL": rabbit_url},
        log_path=tmp_path / "message-service.log",
    )
    service.start()
    try:
        await asyncio.to_thread(service.wait_ready)
        async with httpx.AsyncClient(base_url=service.base_url, timeout=10) as client:
            registered = await client.post(
                "/users",
                json={
                    "username": "alice",
                    "display_name": "Alice",
                    "email": "a@example.test",
                    "password": "correct horse battery",
                },
            )
            assert registered.status_code == 201
            assert (await client.get("/health/rabbitmq")).json() == {"status": "healthy"}
            assert (await client.get("/docs/asyncapi")).status_code == 200
    finally:
        code = service.stop()
    log = service.log()
    assert code == 0, log[-3000:]
    assert "a@example.test" not in log
    assert registered.json()["token"] not in log


async def test_a_service_whose_port_was_taken_meanwhile_starts_again_on_another(
    pg_url: str, rabbit_url: str, tmp_path: Path
) -> None:
    """The test harness's side of a race no reservation can close: between `free_port` and the
    service's bind, another process (an outgoing connection's source port) takes the port."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        service = ServiceProcess(
            name="message-service",
            port=taken,
            env={"DATABASE_URL": pg_url, "RABBITMQ_URL": rabbit_url},
            log_path=tmp_path / "message-service.log",
        )
        service.start()
        try:
            await asyncio.to_thread(service.wait_ready)
            assert service.port != taken
            async with httpx.AsyncClient(base_url=service.base_url, timeout=10) as client:
                assert (await client.get("/health/ready")).status_code == 200
        finally:
            code = service.stop()
    assert code == 0, service.log()[-3000:]


def test_without_rabbitmq_it_exits_non_zero_with_one_clear_line(tmp_path: Path) -> None:
    closed_port = free_port()
    service = ServiceProcess(
        name="message-service",
        port=free_port(),
        env={
            "DATABASE_URL": f"sqlite:///{tmp_path / 'messages.db'}",
            "RABBITMQ_URL": f"amqp://herald:mq-secret@127.0.0.1:{closed_port}/",
        },
        log_path=tmp_path / "message-service.log",
    )
    service.start()
    assert service.process is not None
    try:
        code = service.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        service.stop()
        raise
    log = service.log()
    assert code != 0, log
    clear = [line for line in log.splitlines() if "rabbitmq_unreachable" in line]
    assert len(clear) == 1, log
    assert f"address=127.0.0.1:{closed_port}" in clear[0]
    assert "mq-secret" not in log


async def test_migrated_postgres_schema_matches_the_models(pg_url: str, rabbit_url: str) -> None:
    runtime = service_of(create_app(settings_for(pg_url, rabbit_url)))
    await run_migrations(
        runtime.engine, script_location="message_service:migrations", service_name="message-service"
    )
    try:
        async with runtime.engine.connect() as connection:
            differences = await connection.run_sync(_differences)
    finally:
        await runtime.engine.dispose()

    assert differences == []


def _differences(connection: Connection) -> list[object]:
    context = MigrationContext.configure(
        connection, opts={"version_table": "alembic_version_message_service"}
    )
    return list(compare_metadata(context, metadata))
