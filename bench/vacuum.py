"""Autovacuum's stand-in, for a PostgreSQL server that has it turned off.

Some test servers turn autovacuum off (the one this project's CI runs on does); production never
should. Without it nothing analyses a table: a statement's cached generic plan, made while its
table was empty, stays a sequential scan for good, and the rows that the inbox relay and the
outbox leave dead are never reclaimed, so every statement on those tables reads more pages each
minute. A long run then measures a server nobody runs: `./scripts/bench --count 8000` on such a
server spent 1.66 ms of PostgreSQL CPU per notification, and the statement it was busy with most
(pg_stat_activity) was the router's delivery-report UPDATE, scanning all of
`notification_deliveries` each time (auto_explain showed the plan). So the benchmark does what
the server's default autovacuum would: `VACUUM (ANALYZE)` of each of the run's databases when the
load starts (the tables then hold the set-up's rows, as a running deployment's hold its history
and their statistics) and then once a minute. It runs on the run's databases, so its CPU counts
among the run's PostgreSQL backends, as autovacuum's workers (connected to those databases)
would. `--no-vacuum` leaves it out."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import asyncpg

# PostgreSQL's default `autovacuum_naptime`: how often autovacuum looks at each database.
NAPTIME_S = 60.0


@dataclass
class StandIn:
    """What the stand-in did: whether the server had autovacuum off, and its passes' durations."""

    server_autovacuum: bool
    enabled: bool
    pass_seconds: list[float] = field(default_factory=list)
    failures: int = 0

    @property
    def running(self) -> bool:
        return self.enabled and not self.server_autovacuum

    def as_dict(self) -> dict[str, Any]:
        return {
            "server_autovacuum": self.server_autovacuum,
            "stand_in": self.running,
            "passes": len(self.pass_seconds),
            "seconds": round(sum(self.pass_seconds), 3),
            "failures": self.failures,
        }


def describe(figures: dict[str, Any]) -> str:
    """The report's line on autovacuum."""
    if figures["server_autovacuum"]:
        return "on (the server's own)"
    if not figures["stand_in"]:
        return "off on this server, and the benchmark's stand-in off (--no-vacuum)"
    text = (
        f"off on this server: VACUUM (ANALYZE) of the run's databases at the start and every "
        f"{NAPTIME_S:g} s in its place, {figures['passes']} passes, {figures['seconds']:.1f} s"
    )
    if figures["failures"]:
        text += f", {figures['failures']} failed"
    return text


async def server_autovacuum(admin: asyncpg.Connection) -> bool:
    return bool(await admin.fetchval("SHOW autovacuum") == "on")


async def stand_in(stop: asyncio.Event, database_urls: list[str], record: StandIn) -> None:
    """Until `stop` is set: at once, then every NAPTIME_S, VACUUM (ANALYZE) of each database,
    one at a time (autovacuum's default is three workers, but a run has four small databases).
    A pass that fails is counted, not raised: the run goes on, as it would with autovacuum's."""
    if not record.running:
        return
    while not stop.is_set():
        started = time.monotonic()
        try:
            for url in database_urls:
                connection = await asyncpg.connect(url)
                try:
                    await connection.execute("VACUUM (ANALYZE)")
                finally:
                    await connection.close()
        except (OSError, asyncpg.PostgresError):
            record.failures += 1
        else:
            record.pass_seconds.append(time.monotonic() - started)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), NAPTIME_S)
