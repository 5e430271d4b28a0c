"""Engines and migrations. Each service owns its own database; this is only the plumbing."""

from __future__ import annotations

import contextlib
import logging
import zlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import (
    ARRAY,
    Boolean,
    ColumnElement,
    Connection,
    any_,
    bindparam,
    event,
    func,
    select,
    text,
    tuple_,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.visitors import InternalTraversal

logger = logging.getLogger("herald.database")


def make_engine(url: str, *, pool_size: int = 20) -> AsyncEngine:
    """An async engine; PostgreSQL gets a pool at least as big as the consumer's prefetch.

    Errors never quote statement parameters: they may hold addresses, tokens or message text.
    """
    if url.startswith("sqlite"):
        database = url.split(":///", 1)[1]
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, connect_args={"timeout": 30}, hide_parameters=True)

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            # WAL lets readers proceed while a writer commits; foreign keys are off by default.
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()
            # Let SQLAlchemy's "begin" event below open transactions instead of the driver.
            dbapi_connection.isolation_level = None

        @event.listens_for(engine.sync_engine, "begin")
        def _begin_immediate(connection: Connection) -> None:
            # Take the write lock when a transaction begins: a read-then-write transaction that
            # upgrades later fails at once ("database is locked") if another one wrote meanwhile.
            # An AUTOCOMMIT connection wants no transaction: each statement commits on its own.
            if connection.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
                return
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    # No pool_pre_ping: it costs a round trip (BEGIN; SELECT 1; ROLLBACK) on every checkout, the
    # largest single cost of a push in the benchmark. A connection that died with its server
    # fails its next statement instead; SQLAlchemy invalidates it and the retry middleware
    # defers the message without spending an attempt (herald_shared.retry).
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_recycle=1800,
        hide_parameters=True,
    )


@contextlib.asynccontextmanager
async def autocommit(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A connection on which each statement commits on its own, without BEGIN and COMMIT (or
    ROLLBACK, for a read): one round trip per statement instead of three, on the paths every
    notification takes. Only for work whose statements each stand alone (a read, or a
    compare-and-set that a later statement re-checks); anything that must be all-or-nothing
    takes `engine.begin()`."""
    async with engine.connect() as connection:
        yield await connection.execution_options(isolation_level="AUTOCOMMIT")


def _upgrade(connection: Connection, script_location: str, version_table: str) -> None:
    config = Config()
    config.set_main_option("script_location", script_location)
    config.attributes["connection"] = connection
    config.attributes["version_table"] = version_table
    command.upgrade(config, "head")


async def run_migrations(engine: AsyncEngine, *, script_location: str, service_name: str) -> None:
    """Bring the schema to the newest revision. Replicas starting together serialise on a
    PostgreSQL advisory lock, so only one of them migrates."""
    version_table = f"alembic_version_{service_name.replace('-', '_')}"
    async with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            lock_key = zlib.crc32(service_name.encode())
            await connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": lock_key})
            autovacuum = await connection.scalar(text("SHOW autovacuum"))
            if autovacuum != "on":
                logger.warning(AUTOVACUUM_OFF)
        await connection.run_sync(_upgrade, script_location, version_table)


# Said once per start: the cost it describes grows slowly, and only an operator can fix it.
AUTOVACUUM_OFF = (
    "herald.database.autovacuum_off: PostgreSQL's autovacuum is off on this server. Herald's "
    "ledgers and queue tables then keep their dead rows and are never analysed, so statements "
    "keep plans made while the tables were empty (sequential scans) and cost more as history "
    "grows (docs/operations.md). Turn autovacuum on (PostgreSQL's default) or run VACUUM "
    "(ANALYZE) on a schedule."
)


async def database_healthy(engine: AsyncEngine) -> bool:
    try:
        async with engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
        return True
    except Exception:  # an unreachable database is an answer for a health check
        return False


# --- lists of values given at execution ---------------------------------------------------------


class _ListCondition(ColumnElement[bool]):
    """A condition on a list of values given at execution, written two ways: `portable` (an
    expanding IN, one parameter per value) and `postgres` (array parameters: the statement's
    text is the same whatever the list's length, so asyncpg prepares it once per connection and
    nothing renders a parameter per value; an expanding IN of 500 values costs about five times
    as much to build, send and plan: measured in docs/performance.md)."""

    inherit_cache = True
    type = Boolean()
    _is_implicitly_boolean = True  # a condition as it is, not `… = 1` where booleans are ints
    _traverse_internals = [  # noqa: RUF012 (SQLAlchemy's own declaration style)
        ("portable", InternalTraversal.dp_clauseelement),
        ("postgres", InternalTraversal.dp_clauseelement),
    ]
    portable: ColumnElement[bool]
    postgres: ColumnElement[bool]


@compiles(_ListCondition)
def _portable(element: _ListCondition, compiler: SQLCompiler, **kw: Any) -> str:
    return compiler.process(element.portable, **kw)


@compiles(_ListCondition, "postgresql")
def _postgres(element: _ListCondition, compiler: SQLCompiler, **kw: Any) -> str:
    return compiler.process(element.postgres, **kw)


class AnyOf(_ListCondition):
    """`column IN (:name)`, the list given at execution as `name`; on PostgreSQL `column =
    ANY(:name)`, one array parameter."""

    inherit_cache = True

    def __init__(self, column: ColumnElement[Any], name: str) -> None:
        self.portable = column.in_(bindparam(name, expanding=True))
        self.postgres = column == any_(bindparam(name, type_=ARRAY(column.type)))


class PairsIn(_ListCondition):
    """`(first, second) IN (:name)`, the pairs given at execution through `pairs_param`; on
    PostgreSQL the pairs travel as two arrays (`IN (SELECT unnest(…), unnest(…))`)."""

    inherit_cache = True

    def __init__(self, first: ColumnElement[Any], second: ColumnElement[Any], name: str) -> None:
        self.portable = tuple_(first, second).in_(bindparam(name, expanding=True))
        self.postgres = tuple_(first, second).in_(
            select(
                func.unnest(bindparam(f"{name}_first", type_=ARRAY(first.type))),
                func.unnest(bindparam(f"{name}_second", type_=ARRAY(second.type))),
            )
        )


def pairs_param(
    connection: AsyncConnection, name: str, pairs: Sequence[tuple[Any, Any]]
) -> dict[str, Any]:
    """The execution parameters of a `PairsIn` named `name` on this connection's database."""
    if connection.dialect.name == "postgresql":
        return {
            f"{name}_first": [first for first, _ in pairs],
            f"{name}_second": [second for _, second in pairs],
        }
    return {name: list(pairs)}
