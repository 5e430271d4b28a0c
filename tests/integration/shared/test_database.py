"""The engine every service uses, on the machine's PostgreSQL."""

from __future__ import annotations

import logging
import uuid

import pytest
import sqlalchemy.exc
from sqlalchemy import Column, Integer, MetaData, Table, Uuid, event, insert, select, text

from herald_shared.database import (
    AUTOVACUUM_OFF,
    AnyOf,
    PairsIn,
    make_engine,
    pairs_param,
    run_migrations,
)
from herald_shared.retry import is_deferred

pytestmark = pytest.mark.integration

SECRET = "alice.secret@example.com"


async def test_a_failing_statement_never_quotes_its_parameters(pg_url: str) -> None:
    """SQLAlchemy's error text leaves parameters out (hide_parameters). (asyncpg's own text can
    still quote a value it failed to convert to the column's type, which is why no error text is
    ever logged: see herald_shared.retry.describe_error and message-service's SafeErrors.)"""
    engine = make_engine(pg_url)
    insert = text("INSERT INTO t (address) VALUES (:address)")
    try:
        async with engine.begin() as connection:
            await connection.execute(text("CREATE TABLE t (address text UNIQUE)"))
            await connection.execute(insert, {"address": SECRET})
        with pytest.raises(sqlalchemy.exc.IntegrityError) as raised:
            async with engine.begin() as connection:
                await connection.execute(insert, {"address": SECRET})
    finally:
        await engine.dispose()
    assert "SQL parameters hidden" in str(raised.value)
    assert SECRET not in str(raised.value)


async def test_connections_that_died_with_the_server_are_replaced_without_a_pre_ping(
    pg_url: str,
) -> None:
    """Without pool_pre_ping, a pooled connection the server killed fails once, is invalidated
    (which the retry middleware treats as "dependency unavailable") and the next use succeeds."""
    engine = make_engine(pg_url, pool_size=1)
    try:
        async with engine.connect() as connection:
            pid = (await connection.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        killer = make_engine(pg_url)
        try:
            async with killer.begin() as connection:
                await connection.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        finally:
            await killer.dispose()
        with pytest.raises(sqlalchemy.exc.DBAPIError) as raised:
            async with engine.connect() as connection:
                await connection.execute(text("SELECT 1"))
        async with engine.connect() as connection:
            assert (await connection.execute(text("SELECT 1"))).scalar_one() == 1
    finally:
        await engine.dispose()
    assert is_deferred(raised.value)


@pytest.mark.parametrize("database", ["postgresql", "sqlite"])
async def test_lists_given_at_execution_select_the_same_rows_on_both_databases(
    database: str, pg_url: str, sqlite_url: str
) -> None:
    metadata = MetaData()
    pairs = Table(
        "pairs", metadata, Column("first", Uuid), Column("second", Uuid), Column("n", Integer)
    )
    by_first = select(pairs.c.n).where(AnyOf(pairs.c.first, "ids")).order_by(pairs.c.n)
    by_pair = select(pairs.c.n).where(PairsIn(pairs.c.first, pairs.c.second, "keys"))
    rows = [{"first": uuid.uuid4(), "second": uuid.uuid4(), "n": n} for n in range(6)]
    crossed = (rows[0]["first"], rows[1]["second"])  # each half is there, the pair is not
    statements: list[str] = []
    engine = make_engine(pg_url if database == "postgresql" else sqlite_url)
    event.listen(
        engine.sync_engine,
        "before_cursor_execute",
        lambda _c, _cur, statement, *_: statements.append(statement),
    )
    try:
        async with engine.begin() as connection:
            await connection.run_sync(metadata.create_all)
            await connection.execute(insert(pairs), rows)
            statements.clear()
            for wanted in ([], [0], [1, 3, 5]):
                found = await connection.scalars(
                    by_first, {"ids": [rows[n]["first"] for n in wanted]}
                )
                assert list(found) == wanted
                keys = [(rows[n]["first"], rows[n]["second"]) for n in wanted]
                found = await connection.scalars(
                    by_pair, pairs_param(connection, "keys", [*keys, crossed])
                )
                assert sorted(found) == wanted
    finally:
        await engine.dispose()

    if database == "postgresql":
        # One text per statement whatever the list's length: prepared once, planned once.
        assert len(set(statements)) == 2
        assert all("ANY" in s or "unnest" in s for s in statements)


async def test_migrations_warn_when_the_server_has_autovacuum_off(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Once per start, in the log an operator reads: the server's setting decides. (This
    machine's server, like many CI set-ups, has it off; elsewhere the test checks the
    silence.)"""
    engine = make_engine(pg_url)
    try:
        async with engine.connect() as connection:
            server_vacuums = await connection.scalar(text("SHOW autovacuum")) == "on"
        with caplog.at_level(logging.WARNING, logger="herald.database"):
            await run_migrations(
                engine, script_location="email_sender:migrations", service_name="email-sender"
            )
    finally:
        await engine.dispose()
    warned = [record for record in caplog.records if record.getMessage() == AUTOVACUUM_OFF]
    assert len(warned) == (0 if server_vacuums else 1)
