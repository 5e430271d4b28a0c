"""What the benchmark samples while it runs: CPU time per process (from /proc, no extra
dependency) and the depth of every consumer queue (a passive declare through aio-pika, which
answers with the queue's ready-message count: cheaper than running rabbitmqctl)."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process, or None if it is gone (or not ours to read)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces; the fields after it are fixed.
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


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


class CpuMonitor:
    """Groups of pids sampled together; `groups` is called at each sample (pids may change)."""

    def __init__(self) -> None:
        self.accounts: dict[str, CpuAccount] = {}
        self.machine_start = machine_cpu()
        self.machine_end = self.machine_start
        self.started = time.monotonic()
        self.ended = self.started

    def sample(self, groups: dict[str, list[int]]) -> None:
        for name, pids in groups.items():
            self.accounts.setdefault(name, CpuAccount()).sample(pids)
        self.machine_end = machine_cpu()
        self.ended = time.monotonic()

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
