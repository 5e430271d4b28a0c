"""Revisions on data written before them: on/off preferences become levels (nobody's
notifications change with the upgrade), rooms muted before stay muted with no end (0005); quiet
hours, snooze and breakthrough users start empty (0011); messages are neither edited nor
deleted (0012); and back."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import Connection, text

from herald_shared.database import make_engine
from message_service.models import metadata

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


def differences(connection: Connection) -> list[object]:
    """What tells the migrated schema from the models (nothing, at the newest revision)."""
    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return list(compare_metadata(context, metadata))


@pytest.mark.parametrize("database", ["postgresql", "sqlite"])
async def test_quiet_hours_snooze_and_breakthrough_users_come_and_go(
    database: str, pg_url: str, sqlite_url: str
) -> None:
    """Revision 0011: existing users get no quiet hours, no snooze and no breakthrough users;
    the schema (with the later revisions) is then the models'; and back, the preferences
    kept."""
    engine = make_engine(pg_url if database == "postgresql" else sqlite_url)
    alice, bob = uuid.uuid4(), uuid.uuid4()
    now = datetime.now(UTC)
    preferences_0010 = sa.table(
        "preferences",
        sa.column("user_id", sa.Uuid()),
        *map(sa.column, ("push_level", "email_level", "push_preview", "email_delay")),
    )
    quiet = sa.table(
        "preferences",
        sa.column("user_id", sa.Uuid()),
        *map(sa.column, ("quiet_start", "quiet_end", "quiet_time_zone", "snoozed_until")),
    )
    breakthrough = sa.table(
        "breakthrough_users",
        sa.column("user_id", sa.Uuid()),
        sa.column("breakthrough_id", sa.Uuid()),
    )
    try:
        async with engine.begin() as connection:
            await connection.run_sync(migrate, "0010")
            for user in (alice, bob):
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
                    preferences_0010.insert().values(
                        user_id=user,
                        push_level="all",
                        email_level="mentions",
                        push_preview=True,
                        email_delay=900,
                    )
                )

            await connection.run_sync(migrate, "0011")

            rows = (await connection.execute(sa.select(quiet))).all()
            assert sorted(tuple(row) for row in rows) == sorted(
                (user, None, None, None, None) for user in (alice, bob)
            )
            await connection.run_sync(migrate, "head")  # the models are the newest revision
            assert await connection.run_sync(differences) == []
            await connection.execute(
                breakthrough.insert().values(user_id=alice, breakthrough_id=bob)
            )
            with pytest.raises(sa.exc.IntegrityError):  # a user that exists, once
                async with connection.begin_nested():
                    await connection.execute(
                        breakthrough.insert().values(user_id=alice, breakthrough_id=bob)
                    )

            await connection.run_sync(migrate, "0010", down=True)

            kept = (await connection.execute(sa.select(preferences_0010))).all()
            assert {row[0]: tuple(row[1:]) for row in kept}[alice][:2] == ("all", "mentions")
            tables = await connection.run_sync(lambda sync: sa.inspect(sync).get_table_names())
            assert "breakthrough_users" not in tables

            await connection.run_sync(migrate, "head")
            assert await connection.run_sync(differences) == []
    finally:
        await engine.dispose()


@pytest.mark.parametrize("database", ["postgresql", "sqlite"])
async def test_messages_get_edited_at_and_deleted_at_and_back(
    database: str, pg_url: str, sqlite_url: str
) -> None:
    """Revision 0012: existing messages are neither edited nor deleted; the schema is then the
    models'; and back, the deleted messages (their text already gone) removed, the others kept."""
    engine = make_engine(pg_url if database == "postgresql" else sqlite_url)
    alice, room, kept, deleted = uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    now = datetime.now(UTC)
    messages_0011 = sa.table(
        "messages",
        *(sa.column(name, sa.Uuid()) for name in ("id", "room_id", "sender_id")),
        sa.column("content"),
        sa.column("created_at", TIMESTAMP),
    )
    changes = sa.table(
        "messages",
        sa.column("id", sa.Uuid()),
        sa.column("content"),
        *(sa.column(name, TIMESTAMP) for name in ("edited_at", "deleted_at")),
    )
    try:
        async with engine.begin() as connection:
            await connection.run_sync(migrate, "0011")
            await connection.execute(
                USERS.insert().values(
                    id=alice,
                    username="alice",
                    display_name="Alice",
                    email="alice@x.test",
                    version=1,
                    created_at=now,
                    updated_at=now,
                )
            )
            await connection.execute(
                ROOMS.insert().values(id=room, name="r", created_by=alice, created_at=now)
            )
            for message in (kept, deleted):
                await connection.execute(
                    messages_0011.insert().values(
                        id=message, room_id=room, sender_id=alice, content="hi", created_at=now
                    )
                )

            await connection.run_sync(migrate, "0012")

            rows = (await connection.execute(sa.select(changes))).all()
            assert sorted(tuple(row) for row in rows) == sorted(
                (message, "hi", None, None) for message in (kept, deleted)
            )
            # With revision 0013's fingerprint (null for these, posted without a key), the
            # schema is the models'.
            await connection.run_sync(migrate, "head")
            assert await connection.run_sync(differences) == []
            await connection.execute(
                changes.update().where(changes.c.id == deleted).values(content="", deleted_at=now)
            )
            await connection.execute(
                changes.update().where(changes.c.id == kept).values(content="hey", edited_at=now)
            )

            await connection.run_sync(migrate, "0011", down=True)

            left = (await connection.execute(sa.select(messages_0011))).all()
            assert [(row.id, row.content) for row in left] == [(kept, "hey")]

            await connection.run_sync(migrate, "head")
            assert await connection.run_sync(differences) == []
    finally:
        await engine.dispose()


@pytest.mark.parametrize("database", ["postgresql", "sqlite"])
async def test_api_tokens_become_sessions_that_own_the_devices_and_back(
    database: str, pg_url: str, sqlite_url: str
) -> None:
    """Revision 0015: each API token becomes a session of its user (the same token goes on
    working), expiring 30 days later unless used; the user's devices belong to it; no password
    yet. Back: each session's token is an API token again."""
    engine = make_engine(pg_url if database == "postgresql" else sqlite_url)
    alice, device = uuid.uuid4(), uuid.uuid4()
    token_hash = "a" * 64
    now = datetime.now(UTC)
    api_tokens = sa.table(
        "api_tokens",
        sa.column("token_hash"),
        sa.column("user_id", sa.Uuid()),
        sa.column("created_at", TIMESTAMP),
    )
    devices = sa.table(
        "devices",
        *(sa.column(name, sa.Uuid()) for name in ("id", "user_id", "session_id")),
        *(sa.column(name) for name in ("platform", "token", "token_hash")),
        *(sa.column(name, TIMESTAMP) for name in ("created_at", "token_updated_at")),
    )
    sessions = sa.table(
        "auth_sessions",
        *(sa.column(name, sa.Uuid()) for name in ("id", "user_id")),
        sa.column("token_hash"),
        *(sa.column(name, TIMESTAMP) for name in ("created_at", "expires_at")),
    )
    try:
        async with engine.begin() as connection:
            await connection.run_sync(migrate, "0014")
            await connection.execute(
                USERS.insert().values(
                    id=alice,
                    username="alice",
                    display_name="Alice",
                    email="alice@x.test",
                    version=1,
                    created_at=now,
                    updated_at=now,
                )
            )
            await connection.execute(
                api_tokens.insert().values(token_hash=token_hash, user_id=alice, created_at=now)
            )
            await connection.execute(
                devices.insert().values(
                    id=device,
                    user_id=alice,
                    platform="fcm",
                    token="t",
                    token_hash="b" * 64,
                    created_at=now,
                    token_updated_at=now,
                )
            )

            await connection.run_sync(migrate, "0015")

            [session] = (await connection.execute(sa.select(sessions))).all()
            assert (session.user_id, session.token_hash) == (alice, token_hash)
            expires_at = session.expires_at.replace(tzinfo=UTC)
            assert timedelta(days=29) < expires_at - now < timedelta(days=31)
            owner = (await connection.execute(sa.select(devices.c.session_id))).scalar_one()
            assert owner == session.id
            password = await connection.execute(sa.text("SELECT password_hash FROM users"))
            assert password.scalar_one() is None
            await connection.run_sync(migrate, "head")
            assert await connection.run_sync(differences) == []

            await connection.run_sync(migrate, "0014", down=True)

            [token] = (await connection.execute(sa.select(api_tokens))).all()
            assert (token.token_hash, token.user_id) == (token_hash, alice)
            await connection.run_sync(migrate, "head")
            assert await connection.run_sync(differences) == []
    finally:
        await engine.dispose()


@pytest.mark.parametrize("database", ["postgresql", "sqlite"])
async def test_existing_users_are_grandfathered_as_verified_and_back(
    database: str, pg_url: str, sqlite_url: str
) -> None:
    """Revision 0016: users registered before are verified (a running deployment keeps
    mailing them), with no bounces; new rows start with none; and back, the users kept."""
    engine = make_engine(pg_url if database == "postgresql" else sqlite_url)
    alice = uuid.uuid4()
    now = datetime.now(UTC)
    verification = sa.table(
        "users",
        sa.column("id", sa.Uuid()),
        sa.column("email_verified_at", TIMESTAMP),
        sa.column("email_hard_bounces"),
    )
    preferences = sa.table("preferences", sa.column("user_id", sa.Uuid()))
    try:
        async with engine.begin() as connection:
            await connection.run_sync(migrate, "0015")
            await connection.execute(
                USERS.insert().values(
                    id=alice,
                    username="alice",
                    display_name="A",
                    email="alice@x.test",
                    version=1,
                    created_at=now,
                    updated_at=now,
                )
            )
            # A row that references the user: the upgrade must not rebuild `users` under it.
            await connection.execute(preferences.insert().values(user_id=alice))

            await connection.run_sync(migrate, "head")

            [(user, verified_at, bounces)] = (
                await connection.execute(sa.select(verification))
            ).all()
            assert (user, bounces) == (alice, 0)
            assert verified_at is not None
            assert await connection.run_sync(differences) == []

            await connection.run_sync(migrate, "0015", down=True)
            columns = await connection.run_sync(
                lambda sync: {column["name"] for column in sa.inspect(sync).get_columns("users")}
            )
            assert "email_verified_at" not in columns
            assert (await connection.execute(sa.select(USERS.c.id))).scalars().all() == [alice]
    finally:
        await engine.dispose()
