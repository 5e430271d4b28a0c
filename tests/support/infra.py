"""Isolated resources on the machine's real PostgreSQL and RabbitMQ, and condition waits.

Every test that needs a server gets its own PostgreSQL database and its own RabbitMQ virtual
host, so tests never see each other's rows or queues and can run in any order.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar
from urllib.parse import quote

import asyncpg

PG_ADMIN_URL = os.environ.get(
    "HERALD_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
PG_BASE_URL = PG_ADMIN_URL.rsplit("/", 1)[0]
RABBIT_BASE_URL = os.environ.get("HERALD_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
RABBITMQCTL = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"

T = TypeVar("T")


async def create_database() -> str:
    """Create an empty database and return its SQLAlchemy asyncpg URL."""
    name = f"herald_test_{uuid.uuid4().hex[:12]}"
    connection = await asyncpg.connect(PG_ADMIN_URL)
    try:
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    return f"{PG_BASE_URL.replace('postgresql://', 'postgresql+asyncpg://')}/{name}"


async def drop_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    connection = await asyncpg.connect(PG_ADMIN_URL)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await connection.close()


def _rabbitmqctl(*args: str) -> None:
    subprocess.run([RABBITMQCTL, "-q", *args], check=True, capture_output=True, timeout=60)


def create_vhost() -> str:
    """Create a RabbitMQ virtual host for one test and return an AMQP URL that points at it."""
    vhost = f"herald-test-{uuid.uuid4().hex[:12]}"
    _rabbitmqctl("add_vhost", vhost)
    _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    return RABBIT_BASE_URL.rstrip("/") + "/" + quote(vhost, safe="")


def delete_vhost(url: str) -> None:
    vhost = url.rsplit("/", 1)[1]
    _rabbitmqctl("delete_vhost", vhost)


async def wait_until(
    condition: Callable[[], Awaitable[T]], *, timeout: float = 10.0, interval: float = 0.05
) -> T:
    """Poll `condition` until it returns a truthy value; fail with TimeoutError otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        result = await condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)
