"""The engine every service uses, on the machine's PostgreSQL."""

from __future__ import annotations

import pytest
import sqlalchemy.exc
from sqlalchemy import text

from herald_shared.database import make_engine
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
