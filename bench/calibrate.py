"""The run's calibration: three fixed measurements taken before the services start, so that
figures from different machines (or from one machine on a busier day) can be set side by side.

* a pure-Python loop of fixed work (dict updates, integer arithmetic, string formatting: what a
  service's handlers mostly do), its CPU time, best of three;
* a raw aio-pika loop on the run's own broker and vhost: persistent messages published one after
  the other, each awaiting its publisher confirm (as Herald publishes), into a quorum queue that a
  consumer on another channel drains and acks at the same time; messages/s from the first publish
  to the last ack;
* a PostgreSQL commit loop in one of the run's databases: one-row inserts into a logged table,
  each its own transaction, one after the other; commits/s. Each commit waits for its WAL to be
  flushed, as every transaction of Herald's does, so this follows the machine's disk and its
  PostgreSQL settings, which the other two do not see.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass
from typing import Any

import aio_pika
import asyncpg
from aio_pika.abc import AbstractIncomingMessage

PYTHON_LOOP_ITERATIONS = 300_000
PYTHON_LOOP_REPEATS = 3
AMQP_SECONDS = 2.0  # of publishing; a few hundred messages/s on a busy 2-core machine
AMQP_BODY = b'{"calibration": true, "padding": "' + b"x" * 200 + b'"}'
AMQP_QUEUE = "bench.calibration"
AMQP_TIMEOUT = 120.0
POSTGRES_SECONDS = 2.0
POSTGRES_CREATE = "CREATE TABLE bench_calibration (id bigint PRIMARY KEY, body text NOT NULL)"
POSTGRES_INSERT = "INSERT INTO bench_calibration (id, body) VALUES ($1, $2)"
POSTGRES_DROP = "DROP TABLE bench_calibration"


def python_loop(iterations: int = PYTHON_LOOP_ITERATIONS) -> int:
    """Fixed work: the same on every machine and every run."""
    table: dict[int, int] = {}
    total = 0
    for i in range(iterations):
        key = i & 1023
        table[key] = table.get(key, 0) + i
        total += len(f"{key}:{i}") + (i * 7) % 13
    return total + len(table)


def python_loop_ms(repeats: int = PYTHON_LOOP_REPEATS) -> float:
    """CPU milliseconds of `python_loop`, best of `repeats`."""
    best = float("inf")
    for _ in range(repeats):
        started = time.process_time()
        python_loop()
        best = min(best, time.process_time() - started)
    return round(best * 1000, 1)


async def amqp_messages_per_second(
    amqp_url: str, seconds: float = AMQP_SECONDS
) -> tuple[float, int]:
    """Publish persistent messages with confirms into a quorum queue for `seconds` while consuming
    them (prefetch 100, one ack each); (messages/s from the first publish to the last ack, how
    many messages)."""
    connection = await aio_pika.connect(amqp_url, timeout=10)
    try:
        publishing = await connection.channel(publisher_confirms=True)
        consuming = await connection.channel()
        await consuming.set_qos(prefetch_count=100)
        queue = await publishing.declare_queue(
            AMQP_QUEUE, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await queue.purge()
        received = 0
        count = 0
        published = False
        done = asyncio.Event()

        async def on_message(message: AbstractIncomingMessage) -> None:
            nonlocal received
            await message.ack()
            received += 1
            if published and received >= count:
                done.set()

        listening = await consuming.get_queue(AMQP_QUEUE)
        tag = await listening.consume(on_message)
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            await publishing.default_exchange.publish(
                aio_pika.Message(AMQP_BODY, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=AMQP_QUEUE,
            )
            count += 1
        published = True
        if received >= count:
            done.set()
        await asyncio.wait_for(done.wait(), AMQP_TIMEOUT)
        elapsed = time.monotonic() - started
        await listening.cancel(tag)
        await publishing.queue_delete(AMQP_QUEUE)
    finally:
        await connection.close()
    return round(count / elapsed, 1), count


async def postgres_commits_per_second(
    postgres_url: str, seconds: float = POSTGRES_SECONDS
) -> tuple[float, int]:
    """Commit one-row inserts, each its own transaction, for `seconds`; (commits/s, how many).
    The table is logged (a temporary or unlogged one writes no WAL, so its commits would not
    wait for the disk) and dropped afterwards."""
    connection = await asyncpg.connect(postgres_url, timeout=10)
    try:
        await connection.execute(POSTGRES_CREATE)
        body = AMQP_BODY.decode()
        count = 0
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            await connection.execute(POSTGRES_INSERT, count, body)
            count += 1
        elapsed = time.monotonic() - started
        await connection.execute(POSTGRES_DROP)
    finally:
        await connection.close()
    return round(count / elapsed, 1), count


@dataclass(frozen=True)
class Calibration:
    python_loop_ms: float  # CPU ms of the fixed loop, best of 3
    amqp_messages_per_s: float
    amqp_messages: int
    postgres_commits_per_s: float
    postgres_commits: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


async def calibrate(amqp_url: str, postgres_url: str) -> Calibration:
    """`postgres_url`: a plain `postgresql://` URL of a database the run owns."""
    loop_ms = python_loop_ms()
    rate, count = await amqp_messages_per_second(amqp_url)
    commit_rate, commits = await postgres_commits_per_second(postgres_url)
    return Calibration(
        python_loop_ms=loop_ms,
        amqp_messages_per_s=rate,
        amqp_messages=count,
        postgres_commits_per_s=commit_rate,
        postgres_commits=commits,
    )


def describe(calibration: dict[str, Any]) -> list[tuple[str, str]]:
    """The printed lines (label, value); the PostgreSQL one only if the run measured it (runs
    before it was added did not)."""
    lines = [
        (
            "calibration: Python loop",
            f"{calibration['python_loop_ms']:.1f} ms CPU "
            f"(fixed {PYTHON_LOOP_ITERATIONS:,}-iteration loop, best of {PYTHON_LOOP_REPEATS})",
        ),
        (
            "calibration: aio-pika loop",
            f"{calibration['amqp_messages_per_s']:,.0f} messages/s "
            f"({calibration['amqp_messages']:,} persistent in {AMQP_SECONDS:g} s, each publish "
            "awaiting its confirm, quorum queue, consumed and acked meanwhile)",
        ),
    ]
    if "postgres_commits_per_s" in calibration:
        lines.append(
            (
                "calibration: PostgreSQL loop",
                f"{calibration['postgres_commits_per_s']:,.0f} commits/s "
                f"({calibration['postgres_commits']:,} one-row inserts in {POSTGRES_SECONDS:g} s, "
                "each its own transaction)",
            )
        )
    return lines
