"""The presence projection: a newer word on a stream or a room always wins, whatever order the
events come in; a user is as online as their latest-expiring stream; streams that ended long ago
are forgotten."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from herald_shared.database import make_engine, run_migrations
from herald_shared.events import ConnectionPresence, PresenceChanged, RoomInView, RoomRead
from notification_router import repository
from notification_router.routing import Presence
from notification_router.tables import presence_connections
from tests.support.router_factories import NOW

USER = uuid.uuid4()
ROOM, OTHER_ROOM = uuid.uuid4(), uuid.uuid4()
PHONE, LAPTOP = uuid.uuid4(), uuid.uuid4()


@pytest.fixture
async def engine(sqlite_url: str) -> AsyncIterator[AsyncEngine]:
    engine = make_engine(sqlite_url)
    await run_migrations(
        engine, script_location="notification_router:migrations", service_name="router-test"
    )
    try:
        yield engine
    finally:
        await engine.dispose()


def stream(connection_id: uuid.UUID, *, expires_in: float, said: float) -> ConnectionPresence:
    return ConnectionPresence(
        user_id=USER,
        connection_id=connection_id,
        expires_at=NOW + timedelta(seconds=expires_in),
        at=NOW + timedelta(seconds=said),
    )


def room(room_id: uuid.UUID | None, *, said: float) -> RoomInView:
    return RoomInView(user_id=USER, room_id=room_id, at=NOW + timedelta(seconds=said))


async def presence(engine: AsyncEngine) -> Presence | None:
    return (await repository.load_presence(engine, [USER], since=NOW)).get(USER)


async def test_the_newest_word_wins_in_any_order(engine: AsyncEngine) -> None:
    renewed = PresenceChanged(connections=[stream(PHONE, expires_in=45, said=15)])
    ended = PresenceChanged(connections=[stream(PHONE, expires_in=20, said=20)])
    opened = PresenceChanged(
        connections=[stream(PHONE, expires_in=30, said=0)], rooms=[room(ROOM, said=0)]
    )
    moved = PresenceChanged(rooms=[room(OTHER_ROOM, said=10)])

    for event in (ended, moved, renewed, opened):  # late, early, all mixed up
        await repository.apply_presence(engine, event, now=NOW)

    assert await presence(engine) == Presence(
        online_until=NOW + timedelta(seconds=20), room_in_view=OTHER_ROOM
    )


async def test_a_user_is_online_until_their_last_stream_expires(engine: AsyncEngine) -> None:
    await repository.apply_presence(
        engine,
        PresenceChanged(
            connections=[
                stream(PHONE, expires_in=45, said=0),
                stream(LAPTOP, expires_in=5, said=5),  # closed at once
            ]
        ),
        now=NOW,
    )

    found = await presence(engine)

    assert found == Presence(online_until=NOW + timedelta(seconds=45), room_in_view=None)
    assert found.viewing(ROOM, now=NOW) is False
    assert found.recently_online(now=NOW, grace=timedelta(seconds=60)) is True


async def test_nobody_online_lately_has_no_presence(engine: AsyncEngine) -> None:
    await repository.apply_presence(
        engine, PresenceChanged(connections=[stream(PHONE, expires_in=-1, said=-1)]), now=NOW
    )

    assert await presence(engine) is None


async def test_streams_that_ended_long_ago_are_forgotten(engine: AsyncEngine) -> None:
    old = NOW - repository.PRESENCE_KEPT_FOR - timedelta(seconds=1)
    await repository.apply_presence(
        engine,
        PresenceChanged(
            connections=[
                ConnectionPresence(user_id=USER, connection_id=PHONE, expires_at=old, at=old)
            ]
        ),
        now=old,
    )

    await repository.apply_presence(
        engine, PresenceChanged(connections=[stream(LAPTOP, expires_in=45, said=0)]), now=NOW
    )

    async with engine.connect() as connection:
        left = await connection.scalar(select(func.count()).select_from(presence_connections))
    assert left == 1


async def test_a_read_marker_only_moves_forward(engine: AsyncEngine) -> None:
    def marker(seconds: float) -> RoomRead:
        return RoomRead(
            user_id=USER,
            room_id=ROOM,
            message_id=uuid.uuid4(),
            up_to=NOW + timedelta(seconds=seconds),
        )

    moved = [
        await repository.apply_read_marker(
            engine, marker(seconds), now=NOW, recall_linger=timedelta(0)
        )
        is not None
        for seconds in (5, 2, 9)
    ]
    markers = await repository.load_read_markers(engine, [USER], [ROOM, OTHER_ROOM])

    assert moved == [True, False, True]
    assert markers == {(USER, ROOM): NOW + timedelta(seconds=9)}
