"""The calibration's PostgreSQL commit loop on the machine's server: it commits, and leaves
nothing behind in the run's database."""

from __future__ import annotations

import asyncpg
import pytest

from bench.calibrate import describe, postgres_commits_per_second
from tests.support.infra import wait_until

pytestmark = pytest.mark.integration


async def test_the_commit_loop_commits_for_its_time_and_drops_its_table(pg_url: str) -> None:
    url = pg_url.replace("postgresql+asyncpg://", "postgresql://")

    rate, commits = await postgres_commits_per_second(url, seconds=0.3)

    assert commits > 0
    assert 0 < rate <= commits / 0.3
    connection = await asyncpg.connect(url)
    try:
        # The database was empty: whatever the loop created, it dropped.
        tables = "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        assert await connection.fetchval(tables) == 0

        # Each insert was a transaction of its own: as many commits as inserts, at least. A
        # backend reports its counts when it ends, which may be after the client has closed.
        async def counted() -> bool:
            committed = await connection.fetchval(
                "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
            )
            return bool(committed >= commits)

        await wait_until(counted, timeout=10)
    finally:
        await connection.close()


def test_a_run_from_before_the_commit_loop_prints_without_it() -> None:
    older = {"python_loop_ms": 80.0, "amqp_messages_per_s": 900.0, "amqp_messages": 1800}
    newer = {**older, "postgres_commits_per_s": 450.0, "postgres_commits": 900}

    assert [label for label, _ in describe(older)] == [
        "calibration: Python loop",
        "calibration: aio-pika loop",
    ]
    assert dict(describe(newer))["calibration: PostgreSQL loop"].startswith("450 commits/s")
