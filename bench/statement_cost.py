"""What one small statement costs the Python process that runs it, by how it is run: a
primary-key lookup, `--rounds` times each way, on a table of 100 rows.

    uv run python -m bench.statement_cost [--rounds 4000]

The ways the services run their statements (`herald_shared.database.autocommit` for a statement
that stands alone, `engine.begin()` for a transaction), a second statement on a connection
already checked out, and asyncpg alone on a connection it holds: the floor, without
SQLAlchemy's pool checkout and execution context. Only the Python CPU (`time.process_time`) is
counted, not PostgreSQL's. The database is created for the run and dropped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable

from sqlalchemy import Column, MetaData, String, Table, Uuid, bindparam, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from herald_shared.database import autocommit, make_engine
from tests.support import infra

ROWS = 100
WARM_UP = 200

metadata = MetaData()
probe = Table("probe", metadata, Column("id", Uuid, primary_key=True), Column("name", String))
LOOKUP = select(probe.c.id, probe.c.name).where(probe.c.id == bindparam("p_id"))

Way = Callable[[int], Awaitable[object]]


def _ways(engine: AsyncEngine, ids: list[uuid.UUID]) -> dict[str, Way]:
    async def standalone(n: int) -> object:
        async with autocommit(engine) as connection:
            return (await connection.execute(LOOKUP, {"p_id": ids[n % ROWS]})).one()

    async def in_a_transaction(n: int) -> object:
        async with engine.begin() as connection:
            return (await connection.execute(LOOKUP, {"p_id": ids[n % ROWS]})).one()

    return {
        "autocommit(engine), one statement per checkout": standalone,
        "engine.begin(), one statement per transaction": in_a_transaction,
    }


async def _per_statement(way: Way, rounds: int) -> float:
    for n in range(WARM_UP):
        await way(n)
    started = time.process_time()
    for n in range(rounds):
        await way(n)
    return (time.process_time() - started) / rounds


async def _on_one_connection(engine: AsyncEngine, ids: list[uuid.UUID], rounds: int) -> float:
    async with autocommit(engine) as connection:
        for n in range(WARM_UP):
            (await connection.execute(LOOKUP, {"p_id": ids[n % ROWS]})).one()
        started = time.process_time()
        for n in range(rounds):
            (await connection.execute(LOOKUP, {"p_id": ids[n % ROWS]})).one()
        return (time.process_time() - started) / rounds


async def _asyncpg_alone(engine: AsyncEngine, ids: list[uuid.UUID], rounds: int) -> float:
    sql = "SELECT probe.id, probe.name FROM probe WHERE probe.id = $1"
    async with engine.connect() as connection:
        driver = (await connection.get_raw_connection()).driver_connection
        if driver is None:
            raise RuntimeError("the pooled connection has no driver connection")
        for n in range(WARM_UP):
            await driver.fetchrow(sql, ids[n % ROWS])
        started = time.process_time()
        for n in range(rounds):
            await driver.fetchrow(sql, ids[n % ROWS])
        return (time.process_time() - started) / rounds


async def _main(rounds: int) -> None:
    url = await infra.create_database()
    engine = make_engine(url, pool_size=2)
    try:
        ids = [uuid.uuid4() for _ in range(ROWS)]
        async with engine.begin() as connection:
            await connection.run_sync(metadata.create_all)
            await connection.execute(insert(probe), [{"id": id_, "name": "x"} for id_ in ids])
        print(f"statement cost: a primary-key lookup, {rounds} times each way (Python CPU)")
        ways = _ways(engine, ids)
        results = {label: await _per_statement(way, rounds) for label, way in ways.items()}
        results["autocommit(engine), the next statement on it"] = await _on_one_connection(
            engine, ids, rounds
        )
        results["asyncpg alone, on a connection it holds"] = await _asyncpg_alone(
            engine, ids, rounds
        )
        for label, seconds in results.items():
            print(f"  {label:<50} {seconds * 1e6:6.0f} µs")
    finally:
        await engine.dispose()
        await infra.drop_database(url)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4000)
    asyncio.run(_main(parser.parse_args().rounds))


if __name__ == "__main__":
    main()
