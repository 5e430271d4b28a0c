"""Isolated resources on the machine's real PostgreSQL and RabbitMQ, and condition waits.

Every test that needs a server gets its own PostgreSQL database and its own RabbitMQ virtual
host, so tests never see each other's rows or queues and can run in any order (and in parallel,
in several pytest-xdist workers: every name is random).

Virtual hosts are created and deleted through RabbitMQ's HTTP management API (a few milliseconds
each) instead of `rabbitmqctl`, which boots an Erlang VM per call (about 1.3 s, three calls per
test). `.ci/run` enables the management plugin; on a machine where it is not enabled, the first
test that needs a virtual host enables it (`rabbitmq-plugins enable rabbitmq_management`) and,
if that fails too, falls back to `rabbitmqctl` with a warning.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import threading
import time
import uuid
import warnings
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar
from urllib.parse import quote, unquote, urlsplit

import asyncpg
import httpx

PG_ADMIN_URL = os.environ.get(
    "HERALD_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
PG_BASE_URL = PG_ADMIN_URL.rsplit("/", 1)[0]
RABBIT_BASE_URL = os.environ.get("HERALD_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
RABBIT_MANAGEMENT_URL = os.environ.get(
    "HERALD_TEST_RABBITMQ_MANAGEMENT_URL", "http://127.0.0.1:15672"
)
# The machine's Redis (no persistence): the rate limits' shared counts. Tests never flush it:
# each uses keys of its own (`redis_key_prefix`), which expire with their window.
REDIS_URL = os.environ.get("HERALD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
RABBITMQCTL = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
RABBITMQ_PLUGINS = shutil.which("rabbitmq-plugins") or "/usr/sbin/rabbitmq-plugins"

T = TypeVar("T")


def redis_key_prefix() -> str:
    """A key prefix no other test uses: budgets of its own on the shared Redis."""
    return f"herald-test-{uuid.uuid4().hex}"


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


# --- RabbitMQ virtual hosts -------------------------------------------------------------------


def _rabbitmqctl(*args: str) -> None:
    subprocess.run([RABBITMQCTL, "-q", *args], check=True, capture_output=True, timeout=60)


class _Management:
    """The management API of the machine's broker, as the AMQP URL's user (guest)."""

    def __init__(self, amqp_url: str, api_url: str) -> None:
        parts = urlsplit(amqp_url)
        self._client = httpx.Client(
            base_url=api_url.rstrip("/") + "/api",
            auth=(unquote(parts.username or "guest"), unquote(parts.password or "guest")),
            timeout=60,
        )
        self.user = unquote(parts.username or "guest")

    def answers(self) -> bool:
        try:
            return self._client.get("/overview").status_code == 200
        except httpx.HTTPError:
            return False

    def add_vhost(self, vhost: str) -> None:
        name = quote(vhost, safe="")
        self._client.put(f"/vhosts/{name}").raise_for_status()
        self._client.put(
            f"/permissions/{name}/{quote(self.user, safe='')}",
            json={"configure": ".*", "write": ".*", "read": ".*"},
        ).raise_for_status()

    def set_policy(self, vhost: str, policy: Mapping[str, Any]) -> None:
        body = {key: policy[key] for key in ("pattern", "definition", "priority", "apply-to")}
        name = f"/policies/{quote(vhost, safe='')}/{quote(policy['name'], safe='')}"
        self._client.put(name, json=body).raise_for_status()

    def queue_policy(self, vhost: str, queue: str) -> str | None:
        response = self._client.get(f"/queues/{quote(vhost, safe='')}/{quote(queue, safe='')}")
        response.raise_for_status()
        policy: str | None = response.json().get("policy") or None
        return policy

    def delete_vhost(self, vhost: str) -> None:
        response = self._client.delete(f"/vhosts/{quote(vhost, safe='')}")
        if response.status_code != 404:
            response.raise_for_status()


_management_lock = threading.Lock()
# [] until the first virtual host is asked for; then [the API] or [None] (use rabbitmqctl).
_management: list[_Management | None] = []


def _enable_management_plugin(management: _Management, timeout: float = 90.0) -> bool:
    """`rabbitmq-plugins enable rabbitmq_management` (idempotent; as `.ci/run` does), then wait
    until the API answers."""
    try:
        subprocess.run(
            [RABBITMQ_PLUGINS, "-q", "enable", "rabbitmq_management"],
            check=True,
            capture_output=True,
            timeout=timeout,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if management.answers():
            return True
        time.sleep(0.2)
    return False


def _vhost_api() -> _Management | None:
    with _management_lock:
        if not _management:
            management = _Management(RABBIT_BASE_URL, RABBIT_MANAGEMENT_URL)
            if management.answers() or _enable_management_plugin(management):
                _management.append(management)
            else:
                _management.append(None)
                warnings.warn(
                    f"RabbitMQ's management API does not answer at {RABBIT_MANAGEMENT_URL} and "
                    "the plugin could not be enabled: virtual hosts are made with rabbitmqctl "
                    "(about 4 s per test)",
                    stacklevel=3,
                )
        return _management[0]


def create_vhost() -> str:
    """Create a RabbitMQ virtual host for one test and return an AMQP URL that points at it."""
    vhost = f"herald-test-{uuid.uuid4().hex[:12]}"
    api = _vhost_api()
    if api is not None:
        api.add_vhost(vhost)
    else:
        _rabbitmqctl("add_vhost", vhost)
        _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    return RABBIT_BASE_URL.rstrip("/") + "/" + quote(vhost, safe="")


def delete_vhost(url: str) -> None:
    vhost = unquote(url.rsplit("/", 1)[1])
    api = _vhost_api()
    if api is not None:
        api.delete_vhost(vhost)
    else:
        _rabbitmqctl("delete_vhost", vhost)


def set_policy(url: str, policy: Mapping[str, Any]) -> None:
    """Set a policy, as a definitions file's `policies` holds one (name, pattern, apply-to,
    definition, priority), on the virtual host of `url`; it goes with the virtual host. The
    broker validates it as an import of the definitions would."""
    vhost = unquote(url.rsplit("/", 1)[1])
    api = _vhost_api()
    if api is not None:
        api.set_policy(vhost, policy)
        return
    _rabbitmqctl(
        "set_policy", "-p", vhost, "--priority", str(policy["priority"]),
        "--apply-to", policy["apply-to"], policy["name"], policy["pattern"],
        json.dumps(policy["definition"]),
    )  # fmt: skip


def queue_policy(url: str, queue: str) -> str | None:
    """The name of the policy in effect on a queue of the virtual host of `url`, if any."""
    vhost = unquote(url.rsplit("/", 1)[1])
    api = _vhost_api()
    if api is not None:
        return api.queue_policy(vhost, queue)
    listed = subprocess.run(
        [RABBITMQCTL, "-q", "list_queues", "-p", vhost, "name", "policy", "--formatter", "json"],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip
    rows = {row["name"]: row["policy"] for row in json.loads(listed)}
    return rows.get(queue) or None


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


async def invitations_delivered(router_db: str) -> int | None:
    """How many invitations the router decided, once each of their deliveries is reported
    delivered (None before)."""
    connection = await asyncpg.connect(router_db.replace("+asyncpg", ""))
    try:
        row = await connection.fetchrow(
            "SELECT count(DISTINCT (n.message_id, n.recipient_id)) AS invitations,"
            " count(*) FILTER (WHERE d.status <> 'delivered') AS open"
            " FROM notifications n LEFT JOIN notification_deliveries d"
            " USING (message_id, recipient_id) WHERE n.trigger = 'invitation'"
        )
    finally:
        await connection.close()
    return None if row is None or row["open"] else int(row["invitations"])
