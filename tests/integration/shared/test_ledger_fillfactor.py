"""The delivery ledgers keep room on their pages for their rows' updates (`LEDGER_FILLFACTOR`),
whether the schema came from a service's migrations or from the table's definition."""

from __future__ import annotations

import pytest
from sqlalchemy import MetaData, text

from herald_shared.database import make_engine, run_migrations
from herald_shared.ledger import LEDGER_FILLFACTOR, delivery_ledger_table

_RELOPTIONS = text("SELECT reloptions FROM pg_class WHERE relname = :table AND relkind = 'r'")


async def _reloptions(url: str, table: str) -> list[str] | None:
    engine = make_engine(url, pool_size=1)
    try:
        async with engine.connect() as connection:
            options: list[str] | None = await connection.scalar(_RELOPTIONS, {"table": table})
            return options
    finally:
        await engine.dispose()


@pytest.mark.parametrize(
    ("service", "package", "table"),
    [
        ("notification-router", "notification_router", "notification_deliveries"),
        ("push-sender", "push_sender", "push_deliveries"),
        ("email-sender", "email_sender", "email_deliveries"),
    ],
)
async def test_each_services_migrations_leave_room_on_its_ledgers_pages(
    pg_url: str, service: str, package: str, table: str
) -> None:
    engine = make_engine(pg_url, pool_size=1)
    try:
        await run_migrations(engine, script_location=f"{package}:migrations", service_name=service)
    finally:
        await engine.dispose()

    assert await _reloptions(pg_url, table) == [f"fillfactor={LEDGER_FILLFACTOR}"]


async def test_a_ledger_table_created_from_its_definition_leaves_room_too(pg_url: str) -> None:
    metadata = MetaData()
    delivery_ledger_table("test_deliveries", metadata)
    engine = make_engine(pg_url, pool_size=1)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(metadata.create_all)
    finally:
        await engine.dispose()

    assert await _reloptions(pg_url, "test_deliveries") == [f"fillfactor={LEDGER_FILLFACTOR}"]
