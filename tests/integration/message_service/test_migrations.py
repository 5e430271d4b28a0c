"""Revision 0005 on data written before it: on/off preferences become levels (nobody's
notifications change with the upgrade), rooms muted before stay muted with no end; and back."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, text

from herald_shared.database import make_engine

VERSION_TABLE = "alembic_version_message_service"
LEVELS = ("push_level", "email_level")
# The tables as revision 0004 left them (the models describe the newest revision).
TIMESTAMP = sa.DateTime(timezone=True)
USERS = sa.table(
    "users",
    *(sa.column(name, sa.Uuid()) for name in ("id",)),
    *(sa.column(name) for name in ("username", "display_name", "email", "version")),
    *(sa.column(name, TIMESTAMP) for name in ("created_at", "updated_at")),
)
PREFERENCES = sa.table(
    "preferences",
    sa.column("user_id", sa.Uuid()),
    *(sa.column(name, sa.Boolean()) for name in ("push_enabled", "email_enabled", "push_preview")),
)
ROOMS = sa.table(
    "rooms",
    sa.column("id", sa.Uuid()),
    sa.column("name"),
    sa.column("created_by", sa.Uuid()),
    sa.column("created_at", TIMESTAMP),
)
MUTED_ROOMS = sa.table(
    "muted_rooms", sa.column("user_id", sa.Uuid()), sa.column("room_id", sa.Uuid())
)


def migrate(connection: Connection, revision: str, *, down: bool = False) -> None:
    config = Config()
    config.set_main_option("script_location", "message_service:migrations")
    config.attributes["connection"] = connection
    config.attributes["version_table"] = VERSION_TABLE
    (command.downgrade if down else command.upgrade)(config, revision)


@pytest.mark.parametrize("database", ["postgresql", "sqlite"])
async def test_levels_replace_the_booleans_and_mutes_last_forever(
    database: str, pg_url: str, sqlite_url: str
) -> None:
    engine = make_engine(pg_url if database == "postgresql" else sqlite_url)
    quiet, loud, room = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    now = datetime.now(UTC)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(migrate, "0004")
            for user, on in ((quiet, False), (loud, True)):
                await connection.execute(
                    USERS.insert().values(
                        id=user,
                        username=f"u{user.hex[:8]}",
                        display_name="U",
                        email=f"{user}@x.test",
                        version=1,
                        created_at=now,
                        updated_at=now,
                    )
                )
                await connection.execute(
                    PREFERENCES.insert().values(
                        user_id=user, push_enabled=on, email_enabled=on, push_preview=True
                    )
                )
            await connection.execute(
                ROOMS.insert().values(id=room, name="r", created_by=quiet, created_at=now)
            )
            await connection.execute(MUTED_ROOMS.insert().values(user_id=quiet, room_id=room))

            await connection.run_sync(migrate, "0005")

            levels = sa.table(
                "preferences", sa.column("user_id", sa.Uuid()), *map(sa.column, LEVELS)
            )
            rows = (await connection.execute(sa.select(levels))).all()
            assert {row[0]: (row[1], row[2]) for row in rows} == {
                quiet: ("none", "none"),
                loud: ("all", "all"),
            }
            settings = sa.table(
                "room_settings",
                sa.column("user_id", sa.Uuid()),
                sa.column("room_id", sa.Uuid()),
                *map(sa.column, LEVELS),
                sa.column("muted_until", TIMESTAMP),
            )
            muted = (await connection.execute(sa.select(settings))).all()
            assert len(muted) == 1
            assert tuple(muted[0][:4]) == (quiet, room, None, None)
            forever = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)
            assert muted[0][4].replace(tzinfo=UTC) == forever  # SQLite's come back naive

            await connection.run_sync(migrate, "0004", down=True)

            back = (
                await connection.execute(
                    sa.select(PREFERENCES.c.push_enabled, PREFERENCES.c.email_enabled).where(
                        PREFERENCES.c.user_id == quiet
                    )
                )
            ).one()
            assert tuple(bool(value) for value in back) == (False, False)
            still_muted = (await connection.execute(text("SELECT count(*) FROM muted_rooms"))).one()
            assert still_muted[0] == 1
    finally:
        await engine.dispose()
