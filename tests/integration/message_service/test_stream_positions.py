"""The real-time stream's reads of the outbox on the machine's PostgreSQL: a row never appears
behind one already read, even when the transaction that wrote it started first and committed
last (which a plain `seq > last` read would miss for good)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from herald_shared.database import make_engine, run_migrations
from message_service import repository
from message_service.repository import StreamPosition
from tests.unit.message_service.helpers import message_created


@pytest.fixture
async def engine(pg_url: str) -> AsyncIterator[AsyncEngine]:
    engine = make_engine(pg_url)
    await run_migrations(
        engine, script_location="message_service:migrations", service_name="message-service"
    )
    try:
        yield engine
    finally:
        await engine.dispose()


async def stage(engine: AsyncEngine, text: str) -> None:
    """One outbox row, committed on its own."""
    event = message_created(text)
    async with engine.begin() as connection:
        await connection.execute(
            repository._outbox.insert().values(**repository._outbox_values(event, event.type))
        )


def contents(rows: list[repository.StreamRow]) -> list[str]:
    return [row.payload.split('"message_content":"', 1)[1].split('"', 1)[0] for row in rows]


async def test_a_row_committed_late_is_read_before_the_later_ones_not_skipped(
    engine: AsyncEngine,
) -> None:
    head = await repository.stream_head(engine)
    slow = await engine.connect()
    slow_transaction = await slow.begin()
    try:
        # The slow transaction writes first (its id is the lower), then waits...
        event = message_created("slow")
        await slow.execute(
            repository._outbox.insert().values(**repository._outbox_values(event, event.type))
        )
        # ...while a later one commits.
        await stage(engine, "fast")

        while_slow_is_open = await repository.stream_rows(engine, after=head, limit=10)
        await slow_transaction.commit()
    finally:
        await slow.close()
    after_commit = await repository.stream_rows(engine, after=head, limit=10)

    assert while_slow_is_open == []  # "fast" waits: "slow" may still come before it
    assert contents(after_commit) == ["slow", "fast"]
    assert after_commit[0].position < after_commit[1].position


async def test_rows_come_in_pages_after_a_position_and_up_to_a_bound(engine: AsyncEngine) -> None:
    head = await repository.stream_head(engine)
    for index in range(5):
        await stage(engine, f"m{index}")

    first = await repository.stream_rows(engine, after=head, limit=2)
    rest = await repository.stream_rows(engine, after=first[-1].position, limit=10)
    bounded = await repository.stream_rows(engine, after=head, until=rest[1].position, limit=10)
    later_head = await repository.stream_head(engine)

    assert contents(first) + contents(rest) == ["m0", "m1", "m2", "m3", "m4"]
    assert contents(bounded) == ["m0", "m1", "m2", "m3"]
    # The head is past every committed row: a stream opened now starts after them.
    assert await repository.stream_rows(engine, after=later_head, limit=10) == []
    assert later_head > rest[-1].position


async def test_rows_written_before_the_column_existed_are_not_streamed(
    engine: AsyncEngine,
) -> None:
    event = message_created("old")
    async with engine.begin() as connection:
        await connection.execute(
            repository._outbox.insert().values(
                **repository._outbox_values(event, event.type), xid=None
            )
        )

    assert await repository.stream_rows(engine, after=StreamPosition(0, 0), limit=10) == []


async def test_the_relay_waiting_on_the_broker_holds_nothing_back(engine: AsyncEngine) -> None:
    await stage(engine, "published")
    head = await repository.stream_head(engine)
    relay = await engine.connect()
    relay_transaction = await relay.begin()
    try:
        # As the relay does: a transaction of its name that locks rows (it has a transaction id)
        # and only updates them, never writes a new one, while it waits for the broker.
        await relay.execute(
            text("SELECT set_config('application_name', :name, true)"),
            {"name": repository.RELAY_APPLICATION_NAME},
        )
        await relay.execute(text("UPDATE outbox SET attempts = attempts + 1"))
        await stage(engine, "while the relay waits")

        read = await repository.stream_rows(engine, after=head, limit=10)
    finally:
        await relay_transaction.rollback()
        await relay.close()

    assert contents(read) == ["while the relay waits"]


async def test_with_two_writers_open_the_head_stays_behind_them_and_after_the_history(
    engine: AsyncEngine,
) -> None:
    """The snapshot's xmax is the newest ended transaction's id plus one: a writer that started
    after another running one has an id above it. The head must stay between the history (a
    stream opened now does not replay it) and the oldest writer (whose row may still come)."""
    await stage(engine, "history")
    writers = [await engine.connect() for _ in range(2)]
    transactions = [await writer.begin() for writer in writers]
    try:
        for writer, name in zip(writers, ("first writer", "second writer"), strict=True):
            event = message_created(name)
            await writer.execute(
                repository._outbox.insert().values(**repository._outbox_values(event, event.type))
            )
        head = await repository.stream_head(engine)
        while_both_are_open = await repository.stream_rows(engine, after=head, limit=10)
        for transaction in reversed(transactions):  # the later one commits first
            await transaction.commit()
    finally:
        for writer in writers:
            await writer.close()
    after_both = await repository.stream_rows(engine, after=head, limit=10)

    assert while_both_are_open == []
    assert contents(after_both) == ["first writer", "second writer"]
