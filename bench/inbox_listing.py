"""What listing a big inbox costs: one user with `--items` inbox items (100,000 by default) in
message-service's schema on the machine's PostgreSQL, then the first page and pages deep in
the inbox (through the cursor, as a client pages), each `--rounds` times, timed around the
repository's query (the database's work and the rows' mapping; the HTTP layer adds a few ms).

    uv run python -m bench.inbox_listing [--items 100000] [--rounds 200]

The database is created for the run and dropped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid

import asyncpg

from herald_shared.database import make_engine, run_migrations
from message_service import repository
from tests.support import infra

PAGE = 50


def _plain(url: str) -> str:
    return url.replace("+asyncpg", "")


async def _populate(url: str, items: int) -> uuid.UUID:
    """Two users in one room, `items` messages from one to the other, each an inbox item of
    the other (half of them read), in set-based SQL."""
    alice, bob, room = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    connection = await asyncpg.connect(_plain(url))
    try:
        await connection.execute(
            "INSERT INTO users (id, username, display_name, email, version, created_at, updated_at)"
            " VALUES ($1, 'alice', 'Alice', 'alice@example.test', 1, now(), now()),"
            " ($2, 'bob', 'Bob', 'bob@example.test', 1, now(), now())",
            alice,
            bob,
        )
        await connection.execute("INSERT INTO preferences (user_id) VALUES ($1), ($2)", alice, bob)
        await connection.execute(
            "INSERT INTO rooms (id, name, kind, created_by, created_at)"
            " VALUES ($1, 'big', 'group', $2, now())",
            room,
            alice,
        )
        await connection.execute(
            "INSERT INTO room_members (room_id, user_id, joined_at, state)"
            " VALUES ($1, $2, now(), 'member'), ($1, $3, now(), 'member')",
            room,
            alice,
            bob,
        )
        await connection.execute(
            "INSERT INTO messages (id, room_id, sender_id, content, created_at)"
            " SELECT gen_random_uuid(), $1, $2, 'message ' || n,"
            "   now() - interval '1 second' * ($3 - n)"
            " FROM generate_series(1, $3) AS n",
            room,
            alice,
            items,
        )
        await connection.execute(
            "INSERT INTO inbox_items (user_id, message_id, room_id, trigger, message_created_at,"
            " decided_at, deliveries, version)"
            " SELECT $1, id, room_id, 'message', created_at, created_at,"
            ' \'[{"channel": "push", "state": "sent", "decided_at": "2026-12-02T00:00:00Z"}]\', 1'
            " FROM messages",
            bob,
        )
        middle = await connection.fetchrow(
            "SELECT id, created_at FROM messages ORDER BY created_at LIMIT 1 OFFSET $1",
            items // 2,
        )
        if middle is None:
            raise RuntimeError("no message to read up to")
        await connection.execute(
            "UPDATE room_members SET read_message_id = $1, read_up_to = $2 WHERE user_id = $3",
            middle["id"],
            middle["created_at"],
            bob,
        )
        await connection.execute("ANALYZE")
    finally:
        await connection.close()
    return bob


def _summary(label: str, seconds: list[float]) -> str:
    ms = sorted(value * 1000 for value in seconds)
    p99 = ms[min(len(ms) - 1, round(0.99 * len(ms)) - 1)]
    return f"  {label:<38} p50 {statistics.median(ms):6.2f} ms  p99 {p99:6.2f} ms  (n={len(ms)})"


async def _main(items: int, rounds: int) -> None:
    url = await infra.create_database()
    engine = make_engine(url)
    try:
        await run_migrations(
            engine, script_location="message_service:migrations", service_name="message-service"
        )
        started = time.perf_counter()
        bob = await _populate(url, items)
        setup = time.perf_counter() - started
        print(f"inbox listing: {items:,} items for one user, set up in {setup:.1f} s")
        pages: dict[str, list[float]] = {
            "first page": [],
            "a page halfway": [],
            "unread only, first page": [],
        }
        cursors = []
        position = None
        for _ in range(items // PAGE // 2):  # walk to the middle once: the cursors of the way
            rows = await repository.inbox_page(
                engine, user_id=bob, limit=PAGE, before=position, unread_only=False
            )
            position = (rows[-1].message_created_at, rows[-1].message_id)
            cursors.append(position)
        middle = cursors[-1]
        for _ in range(rounds):
            for label, before, unread in (
                ("first page", None, False),
                ("a page halfway", middle, False),
                ("unread only, first page", None, True),
            ):
                begun = time.perf_counter()
                rows = await repository.inbox_page(
                    engine, user_id=bob, limit=PAGE, before=before, unread_only=unread
                )
                pages[label].append(time.perf_counter() - begun)
                if len(rows) != PAGE:
                    raise RuntimeError(f"{label}: {len(rows)} items, not a full page")
        for label, seconds in pages.items():
            print(_summary(f"{label} ({PAGE} items)", seconds))
    finally:
        await engine.dispose()
        await infra.drop_database(url)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=200)
    arguments = parser.parse_args()
    asyncio.run(_main(arguments.items, arguments.rounds))


if __name__ == "__main__":
    main()
