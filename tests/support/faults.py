"""Fault injection for Herald: a private RabbitMQ node and private PostgreSQL clusters on spare
loopback ports, the four services as processes on them, a chat workload, and a checker of
Herald's guarantees (nothing lost, nothing twice, what was dead-lettered and where).

The machine's own RabbitMQ (5672) and PostgreSQL (5432) are never touched: every server here is
started by the test from its own temporary directory, with its own ports, node name, Erlang
cookie and data, and removed afterwards (see `tests/fault/__init__.py` for the whole picture).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import itertools
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, unquote

import aio_pika
import asyncpg
import httpx
import pytest
from starlette.requests import Request
from starlette.responses import Response

from herald_shared.events import Channel, notification_id_for
from herald_shared.topology import CONSUMER_QUEUES
from tests.fakes.fcm import FakeFcm
from tests.fakes.smtp import FakeSmtp
from tests.support import infra
from tests.support.infra import wait_until
from tests.support.processes import ServiceProcess, free_port, local_ports, peer_ports

RABBITMQ_BIN = Path(os.environ.get("HERALD_FAULT_RABBITMQ_BIN", "/usr/lib/rabbitmq/bin"))
WORK_QUEUES = tuple(queue.name for queue in CONSUMER_QUEUES)
DEAD_LETTER_QUEUES = tuple(queue.dead_letter_queue.name for queue in CONSUMER_QUEUES)


def _postgres_bin() -> Path:
    configured = os.environ.get("HERALD_FAULT_PG_BIN")
    if configured:
        return Path(configured)
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda path: int(path.parent.parent.name) if path.parent.parent.name.isdigit() else 0,
    )
    return found[-1].parent if found else Path("/usr/lib/postgresql/15/bin")


POSTGRES_BIN = _postgres_bin()


class _Closeable(Protocol):
    def cleanup(self) -> None: ...


# Last resort: servers still alive when the interpreter exits (a test run interrupted between a
# fixture's setup and its finaliser) are stopped and their directories removed.
_LIVE: dict[int, _Closeable] = {}


@atexit.register
def _cleanup_leftovers() -> None:
    for server in list(_LIVE.values()):
        with contextlib.suppress(Exception):
            server.cleanup()


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


# --- RabbitMQ ---------------------------------------------------------------------------------


class RabbitNode:
    """A RabbitMQ node of its own: `rabbitmq-server` from the Debian package, started with its
    own environment (node name, AMQP and distribution ports, data and log directories, config
    file, enabled-plugins file, Erlang cookie) so nothing is shared with the machine's node but
    the epmd daemon, where it only registers its unique name.

    `stop()`/`start()` keep the data directory: durable queues and persistent messages survive.
    """

    def __init__(
        self, root: Path, *, cookie: str | None = None, config: Sequence[str] = ()
    ) -> None:
        self.root = root
        self.config = tuple(config)  # more rabbitmq.conf lines
        self.name = f"herald-fault-{secrets.token_hex(4)}@localhost"
        self.port = 0
        self.dist_port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.boot_seconds: list[float] = []
        _LIVE[id(self)] = self
        home = root / "home"
        home.mkdir(parents=True)
        cookie_file = home / ".erlang.cookie"
        # The nodes of one cluster share theirs (`RabbitCluster`); else the node's own.
        cookie_file.write_text(cookie or secrets.token_hex(20).upper())
        cookie_file.chmod(0o400)
        # An env file of our own, so that /etc/rabbitmq/rabbitmq-env.conf (the machine node's
        # NODENAME and flags) is not read.
        (root / "rabbitmq-env.conf").write_text("")
        (root / "enabled_plugins").write_text("[].\n")
        (root / "logs").mkdir()
        (root / "data").mkdir()

    # -- lifecycle ---------------------------------------------------------------------------

    def _write_config(self) -> None:
        # listeners.tcp here, because the machine's /etc/rabbitmq/rabbitmq.conf (5672) must not
        # apply; nothing else is needed (no management plugin, default limits) but what the
        # node was given (`config`: a cluster's nodes get `CLUSTER_CONFIG`).
        lines = [
            f"listeners.tcp.1 = 127.0.0.1:{self.port}",
            "log.console = false",
            "log.file.level = info",
            *self.config,
        ]
        (self.root / "rabbitmq.conf").write_text("".join(f"{line}\n" for line in lines))

    def env(self) -> dict[str, str]:
        """The environment of the server and of every `rabbitmqctl` aimed at it."""
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("RABBITMQ_", "ERL_"))
        }
        env.update(
            HOME=str(self.root / "home"),  # the node's own Erlang cookie
            RABBITMQ_CONF_ENV_FILE=str(self.root / "rabbitmq-env.conf"),
            RABBITMQ_CONFIG_FILE=str(self.root / "rabbitmq.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.root / "enabled_plugins"),
            RABBITMQ_NODENAME=self.name,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(self.root / "data"),
            RABBITMQ_LOG_BASE=str(self.root / "logs"),
            RABBITMQ_PID_FILE=str(self.root / "node.pid"),
            # Erlang distribution on loopback only.
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
            ERL_EPMD_ADDRESS="127.0.0.1",
        )
        return env

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 120.0) -> float:
        """Boot the node (on its existing data, if any) and wait until RabbitMQ runs; returns the
        seconds it took. The first start picks the ports (again, if they were taken meanwhile)."""
        first = not self.port
        for attempt in itertools.count(1):
            if first:
                self.port, self.dist_port = free_port(), free_port()
            self._write_config()
            try:
                seconds = self._boot(timeout)
            except RuntimeError:
                if not first or attempt == 3:
                    raise
                continue
            self.boot_seconds.append(seconds)
            return seconds
        raise AssertionError("unreachable")

    def _boot(self, timeout: float) -> float:
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        pid_file = self.root / "node.pid"
        pid_file.unlink(missing_ok=True)
        started = time.monotonic()
        with (self.root / "server.out").open("ab") as out:
            self.process = subprocess.Popen(
                [str(RABBITMQ_BIN / "rabbitmq-server")],
                env=self.env(),
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: kill() reaches beam.smp too
            )
        # `rabbitmqctl wait` waits for the pid file, the distribution, then the applications.
        waiter = subprocess.Popen(
            [
                self._ctl_path,
                "-n",
                self.name,
                "wait",
                str(pid_file),
                "--timeout",
                str(int(timeout)),
            ],
            env=self.env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        deadline = started + timeout + 10
        while waiter.poll() is None:
            if self.process.poll() is not None or time.monotonic() > deadline:
                waiter.kill()
                waiter.wait()
                self._reap()
                raise RuntimeError(f"{self.name} did not start:\n{self.log()}")
            time.sleep(0.05)
        output = waiter.stdout.read().decode(errors="replace") if waiter.stdout else ""
        if waiter.returncode != 0:
            self._reap()
            raise RuntimeError(f"{self.name} did not start: {output}\n{self.log()}")
        return time.monotonic() - started

    def stop(self, timeout: float = 60.0) -> None:
        """A clean shutdown (`rabbitmqctl stop`); the data stays for the next `start()`."""
        if not self.running:
            return
        try:
            self.ctl("stop", timeout=timeout)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            self.kill()
            return
        self._wait_exit(timeout)

    def kill(self) -> None:
        """SIGKILL the whole node (a crash); the data stays for the next `start()`."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self._wait_exit(30)

    def _wait_exit(self, timeout: float) -> None:
        if self.process is None:
            return
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self._reap()

    def _reap(self) -> None:
        # Anything left in the node's process group (erl_child_setup, inet_gethost).
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(10)

    def cleanup(self) -> None:
        try:
            if self.running:
                self.kill()
            else:
                self._reap()
        finally:
            _LIVE.pop(id(self), None)
            shutil.rmtree(self.root, ignore_errors=True)

    def log(self) -> str:
        return _tail(self.root / "server.out") + _tail(self.root / "logs" / f"{self.name}.log")

    # -- rabbitmqctl -------------------------------------------------------------------------

    @property
    def _ctl_path(self) -> str:
        return str(RABBITMQ_BIN / "rabbitmqctl")

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        completed = subprocess.run(
            [self._ctl_path, "-n", self.name, "-q", *args],
            env=self.env(),
            capture_output=True,
            check=False,
            timeout=timeout,
        )
        if completed.returncode != 0:
            raise subprocess.CalledProcessError(
                completed.returncode, ["rabbitmqctl", *args], completed.stdout, completed.stderr
            )
        return completed.stdout.decode(errors="replace")

    def listening(self) -> bool:
        """Does the node accept AMQP connections (a paused node closes its listener)?"""
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=2).close()
        except OSError:
            return False
        return True

    def close_all_connections(self, explanation: str = "herald fault test") -> None:
        """Close every client connection of the node (without `--global`, rabbitmqctl would
        close only those of the default virtual host)."""
        self.ctl("close_all_connections", "--global", explanation)

    def add_vhost(self) -> str:
        """A fresh virtual host; returns its AMQP URL."""
        vhost = f"herald-fault-{uuid.uuid4().hex[:12]}"
        self.ctl("add_vhost", vhost)
        self.ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        return self.url(vhost)

    def delete_vhost(self, url: str) -> None:
        self.ctl("delete_vhost", url.rsplit("/", 1)[1])

    def url(self, vhost: str = "/") -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/{quote(vhost, safe='')}"

    def queues(self, url: str) -> dict[str, QueueState]:
        """Every queue of the virtual host of `url`, by name."""
        vhost = url.rsplit("/", 1)[1]
        output = self.ctl(
            "list_queues",
            "-p",
            vhost,
            "--no-table-headers",
            "name",
            "messages_ready",
            "messages_unacknowledged",
            "consumers",
        )
        states: dict[str, QueueState] = {}
        for line in output.splitlines():
            parts = line.split("\t")
            if len(parts) != 4 or not parts[1].strip().isdigit():
                continue
            states[parts[0]] = QueueState(int(parts[1]), int(parts[2]), int(parts[3]))
        return states

    def consumer_channels(self, url: str) -> dict[str, set[str]]:
        """The channel (an Erlang pid) of every consumer, by queue."""
        vhost = url.rsplit("/", 1)[1]
        output = self.ctl(
            "list_consumers", "-p", vhost, "--no-table-headers", "queue_name", "channel_pid"
        )
        channels: dict[str, set[str]] = {}
        for line in output.splitlines():
            parts = line.split("\t")
            if len(parts) == 2 and parts[1].startswith("<"):
                channels.setdefault(parts[0], set()).add(parts[1])
        return channels


# What the private cluster's nodes add to their configuration: a node that sees no majority of
# the cluster pauses itself (closes its clients' connections and listeners, stops its queues)
# until it sees one again, instead of serving a partition of its own (the default, `ignore`).
CLUSTER_CONFIG = ("cluster_partition_handling = pause_minority",)


class RabbitCluster:
    """`size` `RabbitNode`s clustered with RabbitMQ's own clustering: one shared Erlang cookie,
    the first node booted, the others booted and joined to it (`join_cluster`), each with
    `CLUSTER_CONFIG`. Quorum queues declared once every node has joined get a replica on each
    (their default initial group size is the cluster's)."""

    def __init__(self, root: Path, size: int = 3) -> None:
        cookie = secrets.token_hex(20).upper()
        self.root = root
        self.nodes = [
            RabbitNode(root / f"node{n}", cookie=cookie, config=CLUSTER_CONFIG)
            for n in range(1, size + 1)
        ]
        self.form_seconds = 0.0

    def start(self) -> float:
        """Boot and join every node; returns the seconds it took."""
        started = time.monotonic()
        first, *others = self.nodes
        first.start()
        for node in others:
            node.start()
            node.ctl("stop_app")
            node.ctl("join_cluster", first.name)
            node.ctl("start_app")
        self.form_seconds = time.monotonic() - started
        return self.form_seconds

    def running_nodes(self, via: RabbitNode | None = None) -> set[str]:
        """The nodes the cluster (as `via`, else the first running node, sees it) runs."""
        asking = via or next(node for node in self.nodes if node.running)
        status = json.loads(asking.ctl("cluster_status", "--formatter", "json"))
        return set(status["running_nodes"])

    def partitions(self, via: RabbitNode | None = None) -> dict[str, list[str]]:
        """The partitions the cluster recorded (each node's list of nodes it was cut from and
        met again without pausing): empty unless the cluster split."""
        asking = via or next(node for node in self.nodes if node.running)
        status = json.loads(asking.ctl("cluster_status", "--formatter", "json"))
        return dict(status["partitions"])

    def urls(self, vhost: str, first: RabbitNode | None = None) -> list[str]:
        """Every node's address for `vhost`, in the cluster's order from `first` on (by default
        the first node), round the list."""
        start = self.nodes.index(first) if first is not None else 0
        return [node.url(vhost) for node in self.nodes[start:] + self.nodes[:start]]

    def node_named(self, name: str) -> RabbitNode:
        return next(node for node in self.nodes if node.name == name)

    def leaders(self, vhost: str, via: RabbitNode | None = None) -> Counter[str]:
        """Quorum queues of `vhost` whose leader each node is, by node name."""
        asking = via or next(node for node in self.nodes if node.running)
        output = asking.ctl(
            "list_queues", "-p", vhost, "name", "type", "leader", "--formatter", "json"
        )
        return Counter(queue["leader"] for queue in json.loads(output) if queue["type"] == "quorum")

    def cut_off(self, node: RabbitNode) -> None:
        """A network partition between `node` and the others: `node` keeps a wrong Erlang cookie
        for each of them, so the distribution connections it drops now are refused both ways
        from then on (its own default cookie stays: `rabbitmqctl` still reaches it). Each side
        sees the other down at once; with `pause_minority`, `node` pauses itself."""
        others = ", ".join(f"'{other.name}'" for other in self.nodes if other is not node)
        node.ctl(
            "eval",
            f"[erlang:set_cookie(N, herald_cut_off) || N <- [{others}]],"
            " [erlang:disconnect_node(N) || N <- nodes()], ok.",
        )

    def heal(self, node: RabbitNode) -> None:
        """Ends `cut_off(node)`: the right cookie again for the others (a paused node, which pings
        them every second, then sees the majority and starts again)."""
        others = ", ".join(f"'{other.name}'" for other in self.nodes if other is not node)
        node.ctl("eval", f"[erlang:set_cookie(N, erlang:get_cookie()) || N <- [{others}]], ok.")

    def cleanup(self) -> None:
        try:
            for node in self.nodes:
                node.cleanup()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@dataclass(frozen=True)
class QueueState:
    ready: int
    unacked: int
    consumers: int

    @property
    def messages(self) -> int:
        return self.ready + self.unacked


# --- PostgreSQL -------------------------------------------------------------------------------


class PostgresCluster:
    """A PostgreSQL cluster of its own: `initdb` into a temporary directory (as `postgres` when
    the tests run as root, since initdb refuses root), `pg_ctl` on a spare loopback port with its
    socket in that directory and trust authentication.

    `fsync=off` (a process crash keeps what the OS was given; only an OS crash would not) and
    room for the four services' pools; `synchronous_commit` stays on, so an immediate stop
    loses no committed transaction.
    """

    def __init__(self, name: str = "pg") -> None:
        self.root = Path(tempfile.mkdtemp(prefix=f"herald-fault-{name}-"))
        self.data = self.root / "data"
        self.port = 0
        self.initdb_seconds: list[float] = []
        self.boot_seconds: list[float] = []
        if os.geteuid() == 0:
            # initdb and postgres refuse to run as root; the directory must be theirs.
            shutil.chown(self.root, "postgres", "postgres")
        _LIVE[id(self)] = self

    def _run(self, *argv: str, timeout: float = 120.0) -> str:
        command = [str(POSTGRES_BIN / argv[0]), *argv[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        completed = subprocess.run(
            command, cwd=self.root, capture_output=True, check=False, timeout=timeout
        )
        if completed.returncode != 0:
            raise RuntimeError(
                f"{argv[0]} failed ({completed.returncode}): "
                f"{completed.stdout.decode(errors='replace')}"
                f"{completed.stderr.decode(errors='replace')}\n{_tail(self.root / 'server.log')}"
            )
        return completed.stdout.decode(errors="replace")

    def init(self) -> float:
        started = time.monotonic()
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        )
        seconds = time.monotonic() - started
        self.initdb_seconds.append(seconds)
        return seconds

    def start(self) -> float:
        """Start (or restart) the cluster and wait until it accepts connections."""
        first = not self.port
        for attempt in itertools.count(1):
            if first:
                self.port = free_port()
            started = time.monotonic()
            options = " ".join(
                (
                    f"-p {self.port}",
                    f"-k {self.root}",
                    "-c listen_addresses=127.0.0.1",
                    "-c fsync=off",
                    "-c full_page_writes=off",
                    "-c max_connections=400",
                )
            )
            try:
                self._run(
                    "pg_ctl",
                    "-D",
                    str(self.data),
                    "-l",
                    str(self.root / "server.log"),
                    "-w",
                    "-t",
                    "60",
                    "-o",
                    options,
                    "start",
                )
            except RuntimeError:
                if not first or attempt == 3:
                    raise
                continue
            seconds = time.monotonic() - started
            self.boot_seconds.append(seconds)
            return seconds
        raise AssertionError("unreachable")

    def stop(self, mode: str = "fast") -> None:
        """`fast`: a clean shutdown; `immediate`: every backend dies at once, like a crash (the
        next start recovers from the WAL)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    @property
    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def cleanup(self) -> None:
        try:
            if self.running:
                try:
                    self.stop("immediate")
                except (RuntimeError, subprocess.TimeoutExpired):
                    pid = int((self.data / "postmaster.pid").read_text().split()[0])
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        finally:
            _LIVE.pop(id(self), None)
            shutil.rmtree(self.root, ignore_errors=True)

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    async def create_database(self) -> str:
        """A fresh database; returns its SQLAlchemy (asyncpg) URL."""
        name = f"herald_fault_{uuid.uuid4().hex[:12]}"
        connection = await asyncpg.connect(self.admin_url)
        try:
            await connection.execute(f'CREATE DATABASE "{name}"')
        finally:
            await connection.close()
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{name}"

    async def drop_database(self, url: str) -> None:
        name = url.rsplit("/", 1)[1]
        connection = await asyncpg.connect(self.admin_url)
        try:
            await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await connection.close()


def plain_url(url: str) -> str:
    """An SQLAlchemy asyncpg URL as asyncpg itself takes it."""
    return url.replace("postgresql+asyncpg://", "postgresql://")


# --- the services -----------------------------------------------------------------------------


class RecordingFcm(FakeFcm):
    """FakeFcm that also records every `messages:send` request's time and device token, whatever
    the answer (FakeFcm keeps only the accepted ones)."""

    def __init__(self) -> None:
        super().__init__()
        self.attempts: list[tuple[float, str]] = []
        self.clients: list[tuple[str, int]] = []  # (device token, client's port) per request
        # (monotonic time, notification id, client's port) of every accepted push.
        self.accepted_calls: list[tuple[float, uuid.UUID, int]] = []
        self._on_accept: dict[str, Callable[[int], None]] = {}

    def on_accept(self, device_token: str, action: Callable[[], None]) -> None:
        """Run `action` once, the next time a push to `device_token` is accepted: after it is
        recorded in `accepted`, before the answer leaves (to crash a sender in between)."""
        self.on_accept_from(device_token, lambda _port: action())

    def on_accept_from(self, device_token: str, action: Callable[[int], None]) -> None:
        """`on_accept`, with the local port of the client's connection handed to `action` (to
        find which process sent it: `Herald.kill_owner_of`)."""
        with self._lock:
            self._on_accept[device_token] = action

    async def _send(self, request: Request) -> Response:
        token = ""
        notification_id: uuid.UUID | None = None
        with contextlib.suppress(ValueError, KeyError, TypeError):
            body = json.loads(await request.body())
            token = str(body["message"]["token"])
            notification_id = push_notification_id(body)
        port = request.client.port if request.client is not None else 0
        with self._lock:
            self.attempts.append((time.monotonic(), token))
            self.clients.append((token, port))
        response = await super()._send(request)
        if response.status_code == 200:
            with self._lock:
                if notification_id is not None:
                    self.accepted_calls.append((time.monotonic(), notification_id, port))
                action = self._on_accept.pop(token, None)
            if action is not None:
                action(port)
        return response

    def forget(self) -> None:
        super().forget()
        with self._lock:
            self.attempts.clear()
            self.clients.clear()
            self.accepted_calls.clear()

    def attempts_for(self, device_token: str) -> list[float]:
        with self._lock:
            return [at for at, token in self.attempts if token == device_token]


class RecordingSmtp(FakeSmtp):
    """FakeSmtp that can act right after it accepted a message for an address: once the message
    is recorded in `received`, before the 250 leaves (to crash the e-mail sender in between)."""

    def __init__(self) -> None:
        super().__init__()
        self.clients: list[tuple[str, int]] = []  # (Message-ID, client's port) per message
        # (monotonic time, Message-ID, client's port) of every message.
        self.received_calls: list[tuple[float, str, int]] = []
        self._on_accept: dict[str, Callable[[int], None]] = {}

    def forget(self) -> None:
        super().forget()
        with self._lock:
            self.clients.clear()
            self.received_calls.clear()

    def on_accept(self, address: str, action: Callable[[], None]) -> None:
        self.on_accept_from(address, lambda _port: action())

    def on_accept_from(self, address: str, action: Callable[[int], None]) -> None:
        """`on_accept`, with the local port of the client's connection handed to `action`."""
        with self._lock:
            self._on_accept[address.lower()] = action

    def _record(
        self, message: EmailMessage, mail_from: str, recipients: list[str], *, peer: Any = None
    ) -> None:
        super()._record(message, mail_from, recipients, peer=peer)
        port = int(peer[1]) if isinstance(peer, tuple | list) and len(peer) > 1 else 0
        with self._lock:
            self.clients.append((str(message["Message-ID"]), port))
            self.received_calls.append((time.monotonic(), str(message["Message-ID"]), port))
            actions = [self._on_accept.pop(to.lower(), None) for to in recipients]
        for action in actions:
            if action is not None:
                action(port)


@dataclass
class Herald:
    """The four services as processes on a private node's virtual host and private databases."""

    node: RabbitNode
    rabbit_url: str
    services: dict[str, ServiceProcess]
    databases: dict[str, str]
    fcm: RecordingFcm
    smtp: FakeSmtp
    log_dir: Path
    incarnations: Counter[str] = field(default_factory=Counter)

    @property
    def api(self) -> str:
        return self.services["message-service"].base_url

    def start(self, name: str) -> None:
        service = self.services[name]
        self.incarnations[name] += 1
        # A log per incarnation: ServiceProcess truncates its log when it starts.
        service.log_path = self.log_dir / f"{name}.{self.incarnations[name]}.log"
        service.start()

    async def start_all(self, timeout: float = 90.0) -> None:
        for name in self.services:
            self.start(name)
        await asyncio.gather(
            *(asyncio.to_thread(service.wait_ready, timeout) for service in self.services.values())
        )

    def kill(self, name: str) -> None:
        """SIGKILL: no drain, no ack, no clean-up."""
        process = self.services[name].process
        assert process is not None
        process.kill()
        process.wait(30)

    def kill_owner_of(self, port: int, among: Iterable[str]) -> tuple[str, set[int]]:
        """SIGKILL the one of the services `among` (replicas, by their names in `services`)
        whose process holds a connection from local `port`; returns its name and the local
        ports it held (to tell which requests a server got came from it).

        The victim is stopped (SIGSTOP) before its ports are read: still running, it could open
        another connection, and send a request on it, between the read and the kill (seen in
        CI: 4 of 7 requests a sender had in flight came from ports the read had not seen)."""
        for name in among:
            process = self.services[name].process
            if process is None or process.poll() is not None:
                continue
            if port in local_ports(process.pid):
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGSTOP)
                ports = local_ports(process.pid)
                self.kill(name)
                return name, ports
        raise LookupError(f"none of {sorted(among)} holds local port {port}")

    def replicas(self, service: str) -> list[str]:
        """The names in `services` of `service`'s replicas (the first one is `service`)."""
        return [name for name, process in self.services.items() if process.name == service]

    async def restart(self, name: str, timeout: float = 90.0) -> None:
        self.start(name)
        await asyncio.to_thread(self.services[name].wait_ready, timeout)

    def crashed(self) -> dict[str, int | None]:
        """Services whose process is not running, with their exit code."""
        return {
            name: service.process.returncode if service.process is not None else None
            for name, service in self.services.items()
            if service.process is None or service.process.poll() is not None
        }

    def logs(self) -> dict[str, str]:
        """Every log of every incarnation, by file name."""
        return {
            path.name: path.read_text(errors="replace")
            for path in sorted(self.log_dir.glob("*.log"))
        }

    def unhandled_errors(self) -> list[str]:
        """message-service's log lines for requests that answered 500 (each names the error's
        class and where it was raised, never its message): what a test that met a 500 says."""
        return [
            f"{name}: {line}"
            for name, text in self.logs().items()
            if name.startswith("message-service")
            for line in text.splitlines()
            if "message_service.http.unhandled" in line
        ]

    def client_errors(self) -> list[str]:
        """The ERROR (and worse) lines that RabbitMQ's clients (aio-pika, aiormq) and FastStream
        logged, in every process: a lost connection that is restored is only warnings
        (`herald_shared.logs.ConnectionLossAsWarning`)."""
        errors = []
        for name, text in self.logs().items():
            for line in text.splitlines():
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if record.get("level") in ("ERROR", "CRITICAL") and str(
                        record.get("logger")
                    ).startswith(("aio_pika", "aiormq", "faststream")):
                        errors.append(f"{name}: {record['logger']} {record['message'][:200]}")
        return errors

    async def ready(self) -> dict[str, bool]:
        async with httpx.AsyncClient(timeout=5) as client:

            async def one(name: str) -> bool:
                try:
                    response = await client.get(f"{self.services[name].base_url}/health/ready")
                except httpx.HTTPError:
                    return False
                return response.status_code == 200

            results = await asyncio.gather(*(one(name) for name in self.services))
        return dict(zip(self.services, results, strict=True))

    def queues(self) -> dict[str, QueueState]:
        return self.node.queues(self.rabbit_url)

    def observe_through(self, node: RabbitNode) -> None:
        """Ask `node` (another node of the cluster the services use) from now on."""
        self.rabbit_url = node.url(unquote(self.rabbit_url.rsplit("/", 1)[1]))
        self.node = node

    def connected_nodes(self, nodes: Iterable[RabbitNode]) -> dict[str, set[str]]:
        """Which of `nodes` each running process (by its name in `services`) holds an
        established TCP connection to, on its AMQP port (seen from the process's side)."""
        by_port = {node.port: node.name for node in nodes}
        return {
            name: {by_port[port] for port in peer_ports(service.process.pid) if port in by_port}
            for name, service in self.services.items()
            if service.process is not None and service.process.poll() is None
        }


# A sender's job in flight when its connection drops is cancelled mid-handler (its lease is
# dropped on the way out, once its provider call ends), or dies with its process, and then its
# redelivered copy is "busy" until the dead attempt's lease runs out (`DELIVERY_LEASE`, 5 s,
# no longer renewed), waiting on the tiers without spending attempts. These settings bound the
# provider calls a cancelled handler waits for (1 s per FCM request, 2 s per SMTP exchange),
# so that such tests recover sooner.
SHORT_LEASES = {"FCM_TIMEOUT": "1", "SMTP_TIMEOUT": "2"}

# The fixtures' callables: `start_herald(overrides=…, router_cluster=…)`, `fault_report(**figures)`.
HeraldFactory = Callable[..., Awaitable[Herald]]
Report = Callable[..., None]


# --- workload ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    id: uuid.UUID
    username: str
    email: str
    api_token: str
    device_ids: tuple[uuid.UUID, ...]
    device_tokens: tuple[str, ...]

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_token}"}


@dataclass(frozen=True)
class Room:
    id: uuid.UUID
    member_ids: tuple[uuid.UUID, ...]


@dataclass
class Population:
    members: dict[uuid.UUID, Member]
    rooms: list[Room]

    def member(self, member_id: uuid.UUID) -> Member:
        return self.members[member_id]


async def register(
    client: httpx.AsyncClient, username: str, *, devices: int = 1, tag: str = ""
) -> Member:
    response = await client.post(
        "/users",
        json={
            "username": username,
            "display_name": username.title(),
            "email": f"{username}@example.test",
            "password": "correct horse battery",
        },
    )
    assert response.status_code == 201, response.text
    user = response.json()
    auth = {"Authorization": f"Bearer {user['token']}"}
    # Every message notifies (a new user's default is DMs and mentions only), e-mail at once
    # (not after a new user's two minutes).
    levels = await client.put(
        "/users/me/preferences",
        json={"push": "all", "email": "all", "email_delay": 0},
        headers=auth,
    )
    assert levels.status_code == 200, levels.text
    device_ids: list[uuid.UUID] = []
    device_tokens: list[str] = []
    for index in range(devices):
        device_token = f"device-{username}-{index}-{tag or uuid.uuid4().hex[:8]}"
        device = await client.post(
            "/users/me/devices", json={"platform": "fcm", "token": device_token}, headers=auth
        )
        assert device.status_code == 201, device.text
        device_ids.append(uuid.UUID(device.json()["id"]))
        device_tokens.append(device_token)
    return Member(
        id=uuid.UUID(user["id"]),
        username=username,
        email=f"{username}@example.test",
        api_token=user["token"],
        device_ids=tuple(device_ids),
        device_tokens=tuple(device_tokens),
    )


async def populate(
    client: httpx.AsyncClient,
    *,
    users: int,
    room_sizes: Sequence[int],
    rng: random.Random,
    max_devices: int = 2,
) -> Population:
    """`users` users with 1..max_devices devices each, and one room per entry of `room_sizes`
    (members, the creator included) drawn at random."""
    suffix = uuid.uuid4().hex[:6]
    members = [
        await register(client, f"u{index}_{suffix}", devices=rng.randint(1, max_devices))
        for index in range(users)
    ]
    by_id = {member.id: member for member in members}
    rooms = []
    for number, size in enumerate(room_sizes):
        chosen = rng.sample(members, size)
        creator, others = chosen[0], chosen[1:]
        response = await client.post(
            "/rooms",
            json={"name": f"room {number}", "member_ids": [str(member.id) for member in others]},
            headers=creator.auth,
        )
        assert response.status_code == 201, response.text
        room_id = uuid.UUID(response.json()["id"])
        for member in others:  # invited by the creator: members once they join
            joined = await client.post(f"/rooms/{room_id}/join", headers=member.auth)
            assert joined.status_code == 200, joined.text
        rooms.append(Room(room_id, tuple(member.id for member in chosen)))
    return Population(by_id, rooms)


async def projection_complete(router_db: str, population: Population) -> bool:
    """Has the router seen every member with all their devices? (A message to a recipient it does
    not know yet is retried, then dead-lettered: the workload must not start before.)"""
    connection = await asyncpg.connect(plain_url(router_db))
    try:
        rows = await connection.fetch("SELECT user_id, devices::text AS devices FROM recipients")
    finally:
        await connection.close()
    seen = {row["user_id"]: len(json.loads(row["devices"])) for row in rows}
    return all(
        seen.get(member.id) == len(member.device_ids) for member in population.members.values()
    )


async def projected_devices(router_db: str, user_id: uuid.UUID) -> int | None:
    """How many devices the router's projection has for a user (None: unknown user)."""
    connection = await asyncpg.connect(plain_url(router_db))
    try:
        devices = await connection.fetchval(
            "SELECT devices::text FROM recipients WHERE user_id = $1", user_id
        )
    finally:
        await connection.close()
    return None if devices is None else len(json.loads(devices))


async def populated(
    herald: Herald,
    client: httpx.AsyncClient,
    *,
    users: int,
    room_sizes: Sequence[int],
    rng: random.Random,
    max_devices: int = 2,
) -> Population:
    """`populate`, then wait until the router knows everyone and every member's invitation
    went out, and forget those: a fault the test brings, and what it counts, are the
    workload's only."""
    population = await populate(
        client, users=users, room_sizes=room_sizes, rng=rng, max_devices=max_devices
    )

    async def projected() -> bool:
        return await projection_complete(herald.databases["notification-router"], population)

    invitations = sum(len(room.member_ids) - 1 for room in population.rooms)

    async def invited() -> bool:
        router_db = herald.databases["notification-router"]
        return await infra.invitations_delivered(router_db) == invitations

    await wait_until(projected, timeout=60, interval=0.2)
    await wait_until(invited, timeout=60, interval=0.2)
    herald.fcm.forget()
    herald.smtp.forget()
    return population


@dataclass
class Accepted:
    """What the API accepted (message id → its recipients), and every POST's status and time."""

    messages: dict[uuid.UUID, frozenset[uuid.UUID]] = field(default_factory=dict)
    answers: list[tuple[float, int]] = field(default_factory=list)  # (monotonic, status)
    seconds: list[float] = field(default_factory=list)  # how long each POST took
    errors: list[str] = field(default_factory=list)
    # POSTs sent again, with their Idempotency-Key, after the connection failed under them.
    resent: list[str] = field(default_factory=list)

    @property
    def statuses(self) -> Counter[int]:
        return Counter(status for _, status in self.answers)

    def merge(self, other: Accepted) -> None:
        self.messages.update(other.messages)
        self.answers.extend(other.answers)
        self.seconds.extend(other.seconds)
        self.errors.extend(other.errors)
        self.resent.extend(other.resent)


async def post_one(
    client: httpx.AsyncClient,
    population: Population,
    accepted: Accepted,
    rng: random.Random,
    number: int,
    *,
    room: Room | None = None,
    sender: Member | None = None,
) -> None:
    """Post one message (to a random room from a random member, unless given)."""
    room = room or rng.choice(population.rooms)
    sender = sender or population.member(rng.choice(room.member_ids))
    started = time.monotonic()
    # As a chat client does: a key per message, and one more try when the connection fails
    # under the request (a kept-alive connection the server closed as the request went out):
    # the key makes the second try answer with the first one's message if it got through.
    headers = {**sender.auth, "Idempotency-Key": f"fault-{number}-{uuid.uuid4().hex}"}
    body = {"content": f"fault message {number} in {room.id}"}
    try:
        try:
            response = await client.post(f"/rooms/{room.id}/messages", json=body, headers=headers)
        except httpx.TransportError as exc:
            accepted.resent.append(type(exc).__name__)
            response = await client.post(f"/rooms/{room.id}/messages", json=body, headers=headers)
    except httpx.HTTPError as exc:
        accepted.errors.append(f"{type(exc).__name__}: {exc}")
        accepted.answers.append((time.monotonic(), 0))
        return
    accepted.answers.append((time.monotonic(), response.status_code))
    accepted.seconds.append(time.monotonic() - started)
    if response.status_code == 201:
        recipients = frozenset(member for member in room.member_ids if member != sender.id)
        accepted.messages[uuid.UUID(response.json()["id"])] = recipients
    else:
        accepted.errors.append(f"{response.status_code}: {response.text[:200]}")


async def post_burst(
    client: httpx.AsyncClient,
    population: Population,
    count: int,
    *,
    rng: random.Random,
    concurrency: int = 16,
) -> Accepted:
    """`count` messages as fast as `concurrency` clients can post them."""
    accepted = Accepted()
    numbers = iter(range(count))

    async def worker() -> None:
        for number in numbers:
            await post_one(client, population, accepted, rng, number)

    async with asyncio.TaskGroup() as group:
        for _ in range(concurrency):
            group.create_task(worker())
    return accepted


@contextlib.asynccontextmanager
async def steady_traffic(
    client: httpx.AsyncClient,
    population: Population,
    *,
    per_second: float,
    rng: random.Random,
    count: int | None = None,
) -> AsyncIterator[Accepted]:
    """Post messages at a steady pace (each in its own task, so a slow answer never slows the
    pace) until the block ends, or `count` of them; yields what was accepted so far (and every
    answer: `Accepted.answers`)."""
    accepted = Accepted()
    tasks: set[asyncio.Task[None]] = set()

    async def pace() -> None:
        for number in itertools.count() if count is None else range(count):
            task = asyncio.create_task(post_one(client, population, accepted, rng, number))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            await asyncio.sleep(1 / per_second)

    pacer = asyncio.create_task(pace())
    try:
        yield accepted
    finally:
        pacer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pacer
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


# --- the checker ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expectation:
    """What Herald owes for what the API accepted: one ledger row per (message, recipient), one
    push per recipient device and one e-mail per recipient (every preference is on)."""

    ledger: frozenset[tuple[uuid.UUID, uuid.UUID]]
    pushes: frozenset[uuid.UUID]
    emails: frozenset[uuid.UUID]
    messages: int

    @classmethod
    def of(cls, population: Population, accepted: Accepted) -> Expectation:
        ledger = frozenset(
            (message_id, recipient)
            for message_id, recipients in accepted.messages.items()
            for recipient in recipients
        )
        pushes = frozenset(
            notification_id_for(
                message_id=message_id,
                recipient_id=recipient,
                channel=Channel.PUSH,
                target=str(device_id),
            )
            for message_id, recipient in ledger
            for device_id in population.member(recipient).device_ids
        )
        emails = frozenset(
            notification_id_for(
                message_id=message_id, recipient_id=recipient, channel=Channel.EMAIL
            )
            for message_id, recipient in ledger
        )
        return cls(ledger, pushes, emails, len(accepted.messages))

    def without(self, pushes: Iterable[uuid.UUID] = ()) -> Expectation:
        return Expectation(self.ledger, self.pushes - frozenset(pushes), self.emails, self.messages)


def push_notification_id(body: Mapping[str, Any]) -> uuid.UUID:
    """The notification id of an accepted FCM request, from its data payload (Android's tag is
    the room: a room's pushes replace one another on the device)."""
    return uuid.UUID(body["message"]["data"]["notification_id"])


def email_notification_id(message_id_header: str) -> uuid.UUID:
    """`<notification_id@domain>` → the notification id."""
    return uuid.UUID(message_id_header.strip().lstrip("<").split("@", 1)[0])


@dataclass(frozen=True)
class Figures:
    messages: int
    ledger_rows: int
    pushes: int
    emails: int
    lost_ledger: int
    lost_pushes: int
    lost_emails: int
    not_delivered_in_ledger: int  # delivery rows whose status is not `delivered`
    duplicate_ledger_rows: int
    duplicate_pushes: int
    duplicate_emails: int
    unexpected: int  # rows, pushes or e-mails for nothing the API accepted
    dead_letters: dict[str, int]
    most_copies: int  # the most pushes or e-mails one notification got (1: no duplicate)

    @property
    def events(self) -> int:
        return self.messages + self.ledger_rows + self.pushes + self.emails

    @property
    def lost(self) -> int:
        return self.lost_ledger + self.lost_pushes + self.lost_emails

    @property
    def duplicates(self) -> int:
        return self.duplicate_ledger_rows + self.duplicate_pushes + self.duplicate_emails

    def fields(self) -> dict[str, object]:
        dead = {name: count for name, count in self.dead_letters.items() if count}
        return {
            "messages": self.messages,
            "events": self.events,
            "lost": self.lost,
            "lost_ledger": self.lost_ledger,
            "lost_pushes": self.lost_pushes,
            "lost_emails": self.lost_emails,
            "dup_ledger": self.duplicate_ledger_rows,
            "dup_pushes": self.duplicate_pushes,
            "dup_emails": self.duplicate_emails,
            "most_copies": self.most_copies,
            "undelivered_in_ledger": self.not_delivered_in_ledger,
            "dead_letters": ",".join(f"{name}:{count}" for name, count in dead.items()) or "0",
        }


@dataclass(frozen=True)
class Observed:
    ledger: Counter[tuple[uuid.UUID, uuid.UUID]]
    delivery_status: dict[uuid.UUID, str]
    pushes: Counter[uuid.UUID]
    emails: Counter[uuid.UUID]


async def observe(herald: Herald) -> Observed:
    connection = await asyncpg.connect(plain_url(herald.databases["notification-router"]))
    try:
        # The population's invitations (one per member; `populate`) are the setup's, not the
        # workload's: left out of every count.
        ledger_rows = await connection.fetch(
            "SELECT message_id, recipient_id, count(*) AS n FROM notifications"
            " WHERE trigger IS DISTINCT FROM 'invitation' GROUP BY 1, 2"
        )
        delivery_rows = await connection.fetch(
            "SELECT d.notification_id, d.status, n.trigger = 'invitation' AS setup"
            " FROM notification_deliveries d JOIN notifications n USING (message_id, recipient_id)"
        )
    finally:
        await connection.close()
    setup = {row["notification_id"] for row in delivery_rows if row["setup"]}
    with herald.fcm._lock:
        accepted_pushes = list(herald.fcm.accepted)
    with herald.smtp._lock:
        received = list(herald.smtp.received)
    pushes = Counter(push_notification_id(body) for body in accepted_pushes)
    emails = Counter(email_notification_id(str(mail["Message-ID"])) for mail in received)
    return Observed(
        ledger=Counter(
            {(row["message_id"], row["recipient_id"]): int(row["n"]) for row in ledger_rows}
        ),
        delivery_status={
            row["notification_id"]: row["status"] for row in delivery_rows if not row["setup"]
        },
        pushes=Counter({key: n for key, n in pushes.items() if key not in setup}),
        emails=Counter({key: n for key, n in emails.items() if key not in setup}),
    )


def figures(expected: Expectation, observed: Observed, depths: Mapping[str, int]) -> Figures:
    expected_deliveries = expected.pushes | expected.emails
    return Figures(
        messages=expected.messages,
        ledger_rows=len(expected.ledger),
        pushes=len(expected.pushes),
        emails=len(expected.emails),
        lost_ledger=len(expected.ledger - observed.ledger.keys()),
        lost_pushes=len(expected.pushes - observed.pushes.keys()),
        lost_emails=len(expected.emails - observed.emails.keys()),
        not_delivered_in_ledger=sum(
            1
            for notification_id in expected_deliveries
            if observed.delivery_status.get(notification_id) != "delivered"
        ),
        duplicate_ledger_rows=sum(count - 1 for count in observed.ledger.values() if count > 1),
        duplicate_pushes=sum(count - 1 for count in observed.pushes.values() if count > 1),
        duplicate_emails=sum(count - 1 for count in observed.emails.values() if count > 1),
        unexpected=len(observed.ledger.keys() - expected.ledger)
        + len(observed.pushes.keys() - expected.pushes)
        + len(observed.emails.keys() - expected.emails),
        dead_letters={name: depths.get(name, 0) for name in DEAD_LETTER_QUEUES},
        most_copies=max([*observed.pushes.values(), *observed.emails.values(), 0]),
    )


async def outbox_pending(message_db: str) -> int:
    connection = await asyncpg.connect(plain_url(message_db))
    try:
        count = await connection.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL")
    finally:
        await connection.close()
    return int(count)


async def queue_depths(url: str, names: Iterable[str]) -> dict[str, int]:
    """Messages ready in each queue, as the queue counts them now (a passive declare):
    `rabbitmqctl list_queues` shows a quorum queue's figures as of its last tick, up to 5 s old."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        depths = {}
        for name in names:
            declared = await channel.declare_queue(name, passive=True)
            depths[name] = declared.declaration_result.message_count or 0
    return depths


async def settle(
    herald: Herald,
    expected: Expectation,
    *,
    timeout: float = 120.0,
    quiet: float = 1.5,
    until_dead_letter: bool = False,
) -> Figures:
    """Wait until everything expected arrived and the pipeline is idle, then take the figures.

    Idle: the outbox is published, no work, wait or retry queue holds a message, and nothing has
    changed for `quiet` seconds (a message being handled is in no queue's ready count, so
    "nothing moves for a while" stands in for "nothing is being handled"). With
    `until_dead_letter`, an idle pipeline with something dead-lettered is done too (what was not
    delivered by then never will be). On timeout, the figures so far are in the error."""
    names = sorted(await asyncio.to_thread(herald.queues))
    last: list[Figures] = []
    quiet_since: list[float] = []

    async def done() -> Figures | None:
        depths = await queue_depths(herald.rabbit_url, names)
        current = figures(expected, await observe(herald), depths)
        changed = not last or current != last[0]
        last[:] = [current]
        dead_lettered = until_dead_letter and any(current.dead_letters.values())
        incomplete = (current.lost or current.not_delivered_in_ledger) and not dead_lettered
        busy = any(depth for name, depth in depths.items() if not name.endswith(".dlq"))
        if incomplete or busy or await outbox_pending(herald.databases["message-service"]):
            quiet_since.clear()
            return None
        if changed or not quiet_since:
            quiet_since[:] = [time.monotonic()]
            return None
        return current if time.monotonic() - quiet_since[0] >= quiet else None

    try:
        settled = await wait_until(done, timeout=timeout, interval=0.25)
    except TimeoutError as exc:
        depths = await queue_depths(herald.rabbit_url, names)
        raise TimeoutError(
            f"not settled within {timeout} s: {last[0].fields() if last else 'no figures'}; "
            f"busy queues: { {name: depth for name, depth in depths.items() if depth} }; "
            f"dead letters: {dict(await dead_letter_reasons(herald.rabbit_url))}; "
            f"crashed: {herald.crashed()}"
        ) from exc
    assert settled is not None
    return settled


async def consumers_back(herald: Herald) -> dict[str, int] | None:
    """Consumers per work queue if every one has some again (`list_consumers` asks the queues
    now; `list_queues` would show a quorum queue's consumers as of its last tick), else None."""
    channels = await asyncio.to_thread(herald.node.consumer_channels, herald.rabbit_url)
    consumers = {name: len(channels.get(name, ())) for name in WORK_QUEUES}
    return consumers if all(consumers.values()) else None


async def waiting_for_locks(database: str) -> int:
    """Backends of this database waiting for a lock another transaction holds."""
    connection = await asyncpg.connect(plain_url(database))
    try:
        count = await connection.fetchval(
            "SELECT count(*) FROM pg_locks JOIN pg_stat_activity USING (pid)"
            " WHERE NOT pg_locks.granted AND pg_stat_activity.datname = current_database()"
        )
    finally:
        await connection.close()
    return int(count)


async def ledger_rows(router_db: str) -> int:
    connection = await asyncpg.connect(plain_url(router_db))
    try:
        count = await connection.fetchval("SELECT count(*) FROM notifications")
    finally:
        await connection.close()
    return int(count)


# --- poison -----------------------------------------------------------------------------------

# The `type` each consumer queue's events carry.
EVENT_TYPES = {
    "message_notifications": "new_message",
    "recipient_updates": "user_updated",
    "presence_updates": "presence_changed",
    "read_markers": "room_read",
    "message_changes": "message_edited",
    "delivery_reports": "delivery_reported",
    "push_notifications": "push_requested",
    "push_notifications_urgent": "push_requested",
    "email_notifications": "email_requested",
    "email_notifications_urgent": "email_requested",
    "email_verifications": "email_verification_requested",
    "device_invalidations": "device_invalidated",
    "inbox_updates": "inbox_items_updated",
    "email_bounces": "email_bounced",
}
POISON_KINDS = (
    "invalid-json",
    "wrong-content-type",
    "unknown-type",
    "missing-fields",
    "several-mb",
    "invalid-utf8",
)
POISON_BYTES = 5 * 1024 * 1024


@dataclass(frozen=True)
class Planted:
    """Values planted in poison that must never show up in a log: an e-mail address, a device
    token, message text (each with a random part, so a hit cannot be a coincidence)."""

    email: str
    token: str
    text: str

    @classmethod
    def new(cls) -> Planted:
        return cls(
            email=f"planted.{secrets.token_hex(6)}@example.test",
            token=f"planted-token-{secrets.token_hex(6)}",
            text=f"planted text {secrets.token_hex(6)}",
        )

    @property
    def values(self) -> tuple[str, ...]:
        return (self.email, self.token, self.text)

    def found_in(self, logs: Mapping[str, str]) -> dict[str, list[str]]:
        """Which planted values each log contains."""
        hits = {
            name: [value for value in self.values if value in text] for name, text in logs.items()
        }
        return {name: values for name, values in hits.items() if values}


def poison(queue: str, kind: str, planted: Planted) -> tuple[bytes, str | None]:
    """A body and content type that `queue`'s consumer cannot process, as `kind` says."""
    fields = {
        "event_id": str(uuid.uuid4()),
        "type": EVENT_TYPES[queue],
        "email": planted.email,
        "to_address": planted.email,
        "token": planted.token,
        "message_content": planted.text,
        "display_name": planted.text,
    }
    if kind == "invalid-json":
        return json.dumps(fields).encode()[:-20], "application/json"
    if kind == "wrong-content-type":
        markup = "".join(f"<{key}>{value}</{key}>" for key, value in fields.items())
        return f"<event>{markup}</event>".encode(), "application/xml"
    if kind == "unknown-type":
        return json.dumps({**fields, "type": "no_such_event"}).encode(), "application/json"
    if kind == "missing-fields":
        return json.dumps(fields).encode(), "application/json"
    if kind == "several-mb":
        padding = (planted.text + " ") * (POISON_BYTES // (len(planted.text) + 1))
        return json.dumps({**fields, "padding": padding}).encode(), "application/json"
    if kind == "invalid-utf8":
        body = json.dumps(fields).encode()
        return body.replace(planted.text.encode(), planted.text.encode() + b"\xff\xfe\xc3"), (
            "application/json"
        )
    raise ValueError(kind)


# --- raw AMQP ---------------------------------------------------------------------------------


async def publish_raw(
    url: str,
    routing_key: str,
    body: bytes,
    *,
    content_type: str | None,
    message_id: str,
    exchange: str = "notifications",
) -> None:
    """Publish bytes as any client on the bus could (persistent, confirmed)."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        target = await channel.get_exchange(exchange, ensure=False)
        await target.publish(
            aio_pika.Message(
                body,
                content_type=content_type,
                message_id=message_id,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=routing_key,
        )


async def peek_queue(url: str, queue_name: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Every message in a queue, left in it (taken without ack, then the channel closes)."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(queue_name, ensure=False)
        messages = []
        while (message := await queue.get(no_ack=False, fail=False)) is not None:
            messages.append(message)
        return messages


# The user property (and the key of a worker's output) that carries `FAULT …` lines from a
# pytest-xdist worker to the controller, which prints them (tests/conftest.py).
FAULT_LINES = "herald_fault_lines"


def emit(config: pytest.Config, line: str, item: pytest.Item | None = None) -> None:
    """Write a line to the terminal past pytest's capture, so that it shows in CI's default
    output (`FAULT …` lines are collected from there). In a pytest-xdist worker, whose output
    never reaches the terminal, the line goes to the controller instead: with the report of
    `item`, or with the worker's last words if there is no item (session fixtures)."""
    workeroutput: dict[str, Any] | None = getattr(config, "workeroutput", None)
    if workeroutput is not None:
        if item is not None:
            item.user_properties.append((FAULT_LINES, line))
        else:
            workeroutput.setdefault(FAULT_LINES, []).append(line)
        return
    capture: Any = config.pluginmanager.getplugin("capturemanager")
    disabled = capture.global_and_fixture_disabled() if capture else contextlib.nullcontext()
    with disabled:
        sys.stdout.write(f"\n{line}\n")
        sys.stdout.flush()


def fault_line(name: str, fields: Mapping[str, object]) -> str:
    return " ".join(["FAULT", name, *(f"{key}={value}" for key, value in fields.items())])


async def dead_letter_reasons(url: str) -> Counter[str]:
    """`<dlq> <reason> <last error>` of every dead letter of the virtual host, counted."""
    reasons: Counter[str] = Counter()
    for queue_name in DEAD_LETTER_QUEUES:
        for message in await peek_queue(url, queue_name):
            headers = message.headers or {}
            reason = headers.get("x-herald-dead-letter-reason") or _x_death_reason(headers)
            error = headers.get("x-herald-error", "-")
            reasons[f"{queue_name} {_text(reason)} {_text(error)}"] += 1
    return reasons


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _x_death_reason(headers: Mapping[str, Any]) -> str:
    """The reason RabbitMQ itself gave when it dead-lettered a message (`x-death`)."""
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], Mapping):
        return f"x-death:{_text(deaths[0].get('reason'))}"
    return "none"


def elapsed(since: float) -> float:
    return round(time.monotonic() - since, 2)


def duration_text(seconds: Sequence[float]) -> str:
    return "/".join(f"{value:.2f}" for value in seconds)
