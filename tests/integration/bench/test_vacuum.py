"""The benchmark's stand-in for autovacuum (bench.vacuum), on the machine's PostgreSQL."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from bench import vacuum
from tests.support.infra import wait_until

pytestmark = pytest.mark.integration


async def analysed(url: str) -> bool:
    connection = await asyncpg.connect(url)
    try:
        return bool(
            await connection.fetchval(
                "SELECT last_vacuum IS NOT NULL AND last_analyze IS NOT NULL"
                " FROM pg_stat_user_tables WHERE relname = 'ledger'"
            )
        )
    finally:
        await connection.close()


async def test_where_the_server_has_autovacuum_off_it_vacuums_and_analyses_each_naptime(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = pg_url.replace("+asyncpg", "")
    connection = await asyncpg.connect(url)
    try:
        await connection.execute("CREATE TABLE ledger (id int PRIMARY KEY)")
        await connection.execute("INSERT INTO ledger SELECT generate_series(1, 1000)")
        await connection.execute("DELETE FROM ledger WHERE id % 2 = 0")
    finally:
        await connection.close()
    monkeypatch.setattr(vacuum, "NAPTIME_S", 0.2)
    record = vacuum.StandIn(server_autovacuum=False, enabled=True)
    stop = asyncio.Event()
    running = asyncio.create_task(vacuum.stand_in(stop, [url], record))

    # The statistics collector reports a vacuum a moment after it ends.
    await wait_until(lambda: analysed(url), timeout=20)
    stop.set()
    await asyncio.wait_for(running, 20)

    figures = record.as_dict()
    assert figures["stand_in"] is True
    assert figures["passes"] >= 1
    assert figures["failures"] == 0
    assert "VACUUM (ANALYZE)" in vacuum.describe(figures)


async def test_a_pass_that_fails_is_counted_and_the_stand_in_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(vacuum, "NAPTIME_S", 0.05)
    record = vacuum.StandIn(server_autovacuum=False, enabled=True)
    stop = asyncio.Event()
    missing = "postgresql://postgres@127.0.0.1:5432/herald_no_such_database"
    running = asyncio.create_task(vacuum.stand_in(stop, [missing], record))

    async def failed_twice() -> bool:
        return record.failures >= 2

    await wait_until(failed_twice, timeout=20)
    stop.set()
    await asyncio.wait_for(running, 20)
    assert record.pass_seconds == []
    assert "failed" in vacuum.describe(record.as_dict())


@pytest.mark.parametrize(
    ("server_autovacuum", "enabled"), [(True, True), (True, False), (False, False)]
)
async def test_it_does_nothing_where_the_server_vacuums_or_when_turned_off(
    server_autovacuum: bool, enabled: bool
) -> None:
    record = vacuum.StandIn(server_autovacuum=server_autovacuum, enabled=enabled)
    # Returns at once: no naptime waited, `stop` never set.
    await asyncio.wait_for(vacuum.stand_in(asyncio.Event(), ["unused"], record), 5)
    assert record.as_dict()["passes"] == 0
    assert record.failures == 0  # it did not even try: "unused" is no database
    assert record.as_dict()["stand_in"] is False
