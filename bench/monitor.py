"""What the benchmark samples while it runs: CPU time and resident memory per process (from /proc,
no extra dependency), the depth of every consumer queue (a passive declare through aio-pika, which
answers with the queue's ready-message count: cheaper than running rabbitmqctl), and, when the
drain asks whether the pipeline has settled, every queue of the run's vhost with its unacknowledged
messages (rabbitmqctl, which only it can tell; `-n <node>` for a private cluster's node)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection

from tests.support.infra import RABBITMQCTL
from tests.support.processes import local_ports

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
RABBITMQCTL_TIMEOUT = 60.0


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process, or None if it is gone (or not ours to read)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces; the fields after it are fixed.
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_bytes(pid: int) -> int | None:
    """Resident set size of a process, or None if it is gone."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return None


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, over all cores."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # without guest time, which is already counted in user
    return (total - idle) / CLOCK_TICKS, total / CLOCK_TICKS


def pids_named(command: str) -> list[int]:
    """Processes whose /proc/<pid>/comm is `command` (e.g. RabbitMQ's `beam.smp`)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == command:
                    found.append(int(entry.name))
    return found


def rabbitmq_node_pids(amqp_ports: Collection[int]) -> list[int]:
    """The `beam.smp` of the RabbitMQ nodes that listen on `amqp_ports`: not a `rabbitmqctl` that
    happens to run (also a beam.smp, with a CLI's start-up cost that is no part of the broker's),
    nor another node of this machine (a fault test's private one). If no node's sockets can be
    read (another user's processes, without root), every node's `beam.smp`."""
    beams = pids_named("beam.smp")
    listening = [pid for pid in beams if local_ports(pid) & set(amqp_ports)]
    if listening:
        return listening
    nodes = []
    for pid in beams:
        with contextlib.suppress(OSError):
            arguments = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"rabbit" in arguments and b"boot" in arguments:
                nodes.append(pid)
    return nodes or beams


@dataclass
class CpuAccount:
    """CPU time of a group of processes between the first and the last sample of each pid (pids
    may come and go, like PostgreSQL backends)."""

    first: dict[int, float] = field(default_factory=dict)
    last: dict[int, float] = field(default_factory=dict)

    def sample(self, pids: list[int]) -> None:
        for pid in pids:
            seconds = cpu_seconds(pid)
            if seconds is not None:
                self.first.setdefault(pid, seconds)
                self.last[pid] = seconds

    @property
    def seconds(self) -> float:
        return sum(self.last[pid] - self.first[pid] for pid in self.last)


@dataclass
class RssAccount:
    """Resident memory of a group of processes (summed over its pids at each sample), and the
    largest of each process (the replicas of a service, the nodes of a cluster: a bound per
    process stays checkable)."""

    first: int = 0
    last: int = 0
    max: int = 0
    max_by_pid: dict[int, int] = field(default_factory=dict)

    def sample(self, pids: list[int]) -> None:
        sizes = {pid: size for pid in pids if (size := rss_bytes(pid)) is not None}
        if not sizes:
            return
        total = sum(sizes.values())
        self.first = self.first or total
        self.last = total
        self.max = max(self.max, total)
        for pid, size in sizes.items():
            self.max_by_pid[pid] = max(self.max_by_pid.get(pid, 0), size)

    @property
    def processes(self) -> int:
        return len(self.max_by_pid)

    @property
    def max_per_process(self) -> int:
        """The largest resident size any one process of the group reached."""
        return max(self.max_by_pid.values(), default=0)


class CpuMonitor:
    """Groups of pids sampled together; `groups` is called at each sample (pids may change).
    Also the resident memory of the groups named in `rss_groups`."""

    def __init__(self, rss_groups: tuple[str, ...] = ()) -> None:
        self.accounts: dict[str, CpuAccount] = {}
        self.rss: dict[str, RssAccount] = {name: RssAccount() for name in rss_groups}
        self.machine_start = machine_cpu()
        self.machine_end = self.machine_start
        self.started = time.monotonic()
        self.ended = self.started
        # At each sample: notifications completed so far, and each group's CPU seconds so far.
        self.progress: list[tuple[int, dict[str, float]]] = []

    def sample(self, groups: dict[str, list[int]], completed: int = 0) -> None:
        for name, pids in groups.items():
            self.accounts.setdefault(name, CpuAccount()).sample(pids)
            if name in self.rss:
                self.rss[name].sample(pids)
        self.machine_end = machine_cpu()
        self.ended = time.monotonic()
        self.progress.append(
            (completed, {name: account.seconds for name, account in self.accounts.items()})
        )

    @property
    def wall(self) -> float:
        return self.ended - self.started

    @property
    def machine_busy(self) -> float:
        """CPU seconds the whole machine spent busy (all cores) between the samples."""
        return self.machine_end[0] - self.machine_start[0]


@dataclass
class QueueDepths:
    queues: tuple[str, ...]
    # (time.time(), {queue: ready messages})
    samples: list[tuple[float, dict[str, int]]] = field(default_factory=list)

    def max(self) -> dict[str, int]:
        return {
            queue: max((depths.get(queue, 0) for _, depths in self.samples), default=0)
            for queue in self.queues
        }


class QueueMonitor:
    def __init__(self, amqp_url: str, queues: tuple[str, ...]) -> None:
        self.amqp_url = amqp_url
        self.depths = QueueDepths(queues)
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None

    async def sample(self) -> None:
        # A plain connection: a robust channel answers a passive declare from its cache.
        if self._connection is None or self._connection.is_closed:
            self._connection = await aio_pika.connect(self.amqp_url, timeout=5)
        depths: dict[str, int] = {}
        for name in self.depths.queues:
            if self._channel is None or self._channel.is_closed:
                self._channel = await self._connection.channel()
            try:
                queue = await self._channel.declare_queue(name, passive=True, timeout=5)
            except aiormq.exceptions.ChannelNotFoundEntity:
                continue  # not declared (yet): the failed declare closed the channel
            result = queue.declaration_result
            depths[name] = int(result.message_count or 0)
        self.depths.samples.append((time.time(), depths))

    async def close(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()


@dataclass(frozen=True)
class VhostQueue:
    name: str
    ready: int
    unacknowledged: int

    @property
    def dead_letter(self) -> bool:
        return self.name.endswith(".dlq")


@dataclass(frozen=True)
class Rabbitmqctl:
    """How to run rabbitmqctl against the run's broker: the machine's node by default; a private
    node (`tests.support.faults.RabbitNode`) with `-n <its name>` and its environment (its Erlang
    cookie, its own config files)."""

    executable: str = RABBITMQCTL
    node: str | None = None
    env: Mapping[str, str] | None = None

    def argv(self, *args: str) -> list[str]:
        return [self.executable, *(("-n", self.node) if self.node else ()), *args]


async def vhost_queues(amqp_url: str, ctl: Rabbitmqctl | None = None) -> list[VhostQueue]:
    """Every queue of the vhost of `amqp_url`, ready and unacknowledged messages included (the
    AMQP passive declare tells ready messages only), as `ctl`'s node tells them (any node of a
    cluster tells every queue). About a second of a CLI's CPU: call it rarely."""
    vhost = unquote(amqp_url.rsplit("/", 1)[1]) or "/"
    process = await asyncio.create_subprocess_exec(
        *(ctl or Rabbitmqctl()).argv(
            "-q",
            "list_queues",
            "--vhost",
            vhost,
            "--no-table-headers",
            "name",
            "messages_ready",
            "messages_unacknowledged",
        ),
        env=None if ctl is None or ctl.env is None else dict(ctl.env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), RABBITMQCTL_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    if process.returncode != 0:
        raise RuntimeError(f"rabbitmqctl list_queues: {err.decode(errors='replace')[:300]}")
    queues = []
    for line in out.decode().splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            queues.append(VhostQueue(parts[0], int(parts[1]), int(parts[2])))
    return queues
