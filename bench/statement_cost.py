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

Call = Callable[[int], Awaitable[object]]


async def _cpu_per_call(call: Call, rounds: int) -> float:
    """The Python CPU of one `call`, averaged over `rounds` after a warm-up."""
    for n in range(WARM_UP):
        await call(n)
    started = time.process_time()
    for n in range(rounds):
        await call(n)
    return (time.process_time() - started) / rounds


async def _costs(engine: AsyncEngine, ids: list[uuid.UUID], rounds: int) -> dict[str, float]:
    def params(n: int) -> dict[str, uuid.UUID]:
        return {"p_id": ids[n % ROWS]}

    async def standalone(n: int) -> object:
        async with autocommit(engine) as connection:
            return (await connection.execute(LOOKUP, params(n))).one()

    async def in_a_transaction(n: int) -> object:
        async with engine.begin() as connection:
            return (await connection.execute(LOOKUP, params(n))).one()

    costs = {
        "autocommit(engine), one statement per checkout": await _cpu_per_call(standalone, rounds),
        "engine.begin(), one statement per transaction": await _cpu_per_call(
            in_a_transaction, rounds
        ),
    }
    async with autocommit(engine) as connection:

        async def next_on_it(n: int) -> object:
            return (await connection.execute(LOOKUP, params(n))).one()

        costs["autocommit(engine), the next statement on it"] = await _cpu_per_call(
            next_on_it, rounds
        )
    async with engine.connect() as connection:
        driver = (await connection.get_raw_connection()).driver_connection
        if driver is None:
            raise RuntimeError("the pooled connection has no driver connection")
        sql = str(LOOKUP.compile(dialect=engine.dialect))  # the same statement, as asyncpg takes it

        async def driver_alone(n: int) -> object:
            return await driver.fetchrow(sql, ids[n % ROWS])

        costs["asyncpg alone, on a connection it holds"] = await _cpu_per_call(driver_alone, rounds)
    return costs


async def _main(rounds: int) -> None:
    url = await infra.create_database()
    engine = make_engine(url, pool_size=2)
    try:
        ids = [uuid.uuid4() for _ in range(ROWS)]
        async with engine.begin() as connection:
            await connection.run_sync(metadata.create_all)
            await connection.execute(insert(probe), [{"id": id_, "name": "x"} for id_ in ids])
        print(f"statement cost: a primary-key lookup, {rounds} times each way (Python CPU)")
        for label, seconds in (await _costs(engine, ids, rounds)).items():
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
