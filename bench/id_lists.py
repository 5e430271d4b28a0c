"""What a list of ids given at execution costs on PostgreSQL: SQLAlchemy's expanding IN (a
parameter per value, a statement text per list length) against `AnyOf` / `PairsIn` (one array
per column, one text), for single ids and for pairs, on a table of 40,000 rows, `--rounds`
lookups of about `--size` keys each (the length varies, as a batch's does).

    uv run python -m bench.id_lists [--size 500] [--rounds 60]

Per lookup: the wall time around `execute` and the Python CPU it took (the rest is the
database's and the socket's). The database is created for the run and dropped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import Column, Integer, MetaData, Table, Uuid, bindparam, insert, select, tuple_
from sqlalchemy.ext.asyncio import AsyncConnection

from herald_shared.database import AnyOf, PairsIn, make_engine, pairs_param
from tests.support import infra

ROWS = 40_000

metadata = MetaData()
pairs = Table(
    "pairs",
    metadata,
    Column("first", Uuid, primary_key=True),
    Column("second", Uuid, primary_key=True),
    Column("n", Integer),
)

Params = Callable[[AsyncConnection, list[tuple[uuid.UUID, uuid.UUID]]], dict[str, Any]]

FORMS: dict[str, tuple[Any, Params]] = {
    "ids, expanding IN": (
        select(pairs.c.n).where(pairs.c.first.in_(bindparam("ids", expanding=True))),
        lambda _, keys: {"ids": [first for first, _ in keys]},
    ),
    "ids, AnyOf": (
        select(pairs.c.n).where(AnyOf(pairs.c.first, "ids")),
        lambda _, keys: {"ids": [first for first, _ in keys]},
    ),
    "pairs, expanding IN": (
        select(pairs.c.n).where(
            tuple_(pairs.c.first, pairs.c.second).in_(bindparam("keys", expanding=True))
        ),
        lambda _, keys: {"keys": keys},
    ),
    "pairs, PairsIn": (
        select(pairs.c.n).where(PairsIn(pairs.c.first, pairs.c.second, "keys")),
        lambda connection, keys: pairs_param(connection, "keys", keys),
    ),
}


async def _main(size: int, rounds: int) -> None:
    url = await infra.create_database()
    engine = make_engine(url)
    try:
        keys = [(uuid.uuid4(), uuid.uuid4()) for _ in range(ROWS)]
        rows = [
            {"first": first, "second": second, "n": n} for n, (first, second) in enumerate(keys)
        ]
        async with engine.begin() as connection:
            await connection.run_sync(metadata.create_all)
            await connection.execute(insert(pairs), rows)
        lookups = [keys[i * size : (i + 1) * size - i % 7] for i in range(rounds)]
        print(f"id lists: {rounds} lookups of {size - 6}-{size} keys in {ROWS:,} rows")
        for label, (statement, params) in FORMS.items():
            # A fresh connection each: every form starts with no statement prepared.
            async with engine.connect() as connection:
                walls, cpus = [], []
                for keys in lookups:
                    wall, cpu = time.perf_counter(), time.process_time()
                    found = (await connection.execute(statement, params(connection, keys))).all()
                    walls.append(time.perf_counter() - wall)
                    cpus.append(time.process_time() - cpu)
                    if len(found) != len(keys):
                        raise RuntimeError(f"{label}: {len(found)} rows for {len(keys)} keys")
            print(
                f"  {label:<22} wall p50 {statistics.median(walls) * 1000:6.2f} ms"
                f"  Python CPU mean {statistics.fmean(cpus) * 1000:5.2f} ms"
            )
    finally:
        await engine.dispose()
        await infra.drop_database(url)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=60)
    arguments = parser.parse_args()
    if arguments.size * arguments.rounds > ROWS:
        parser.error(f"size times rounds must stay within the table's {ROWS:,} rows")
    asyncio.run(_main(arguments.size, arguments.rounds))


if __name__ == "__main__":
    main()
