"""Notification levels per channel, and per-room settings (levels and a timed mute).

`preferences.push_enabled` / `email_enabled` become levels (`all` when on, `none` when off, so
nobody's notifications change with the upgrade; new users get `mentions`); `muted_rooms`
becomes `room_settings`, its rooms muted with no end.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MUTED_FOREVER = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)


def upgrade() -> None:
    op.create_table(
        "room_settings",
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("room_id", sa.Uuid(), nullable=False),
        sa.Column("push_level", sa.String(16), nullable=True),
        sa.Column("email_level", sa.String(16), nullable=True),
        sa.Column("muted_until", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["room_id"], ["rooms.id"], name="fk_room_settings_room_id_rooms"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_room_settings_user_id_users"),
        sa.PrimaryKeyConstraint("user_id", "room_id", name="pk_room_settings"),
    )
    bind = op.get_bind()
    # SQLite keeps UTC datetimes naive (models.UtcDateTime).
    forever = (
        MUTED_FOREVER if bind.dialect.name == "postgresql" else MUTED_FOREVER.replace(tzinfo=None)
    )
    bind.execute(
        sa.text(
            "INSERT INTO room_settings (user_id, room_id, muted_until) "
            "SELECT user_id, room_id, :forever FROM muted_rooms"
        ).bindparams(sa.bindparam("forever", forever, type_=sa.DateTime(timezone=True)))
    )
    op.drop_table("muted_rooms")

    with op.batch_alter_table("preferences") as batch:
        batch.add_column(
            sa.Column("push_level", sa.String(16), nullable=False, server_default="mentions")
        )
        batch.add_column(
            sa.Column("email_level", sa.String(16), nullable=False, server_default="mentions")
        )
    op.execute(
        "UPDATE preferences SET"
        " push_level = CASE WHEN push_enabled THEN 'all' ELSE 'none' END,"
        " email_level = CASE WHEN email_enabled THEN 'all' ELSE 'none' END"
    )
    with op.batch_alter_table("preferences") as batch:
        batch.drop_column("push_enabled")
        batch.drop_column("email_enabled")


def downgrade() -> None:
    with op.batch_alter_table("preferences") as batch:
        batch.add_column(
            sa.Column("push_enabled", sa.Boolean(), nullable=False, server_default=sa.true())
        )
        batch.add_column(
            sa.Column("email_enabled", sa.Boolean(), nullable=False, server_default=sa.true())
        )
    op.execute(
        "UPDATE preferences SET push_enabled = (push_level <> 'none'),"
        " email_enabled = (email_level <> 'none')"
    )
    with op.batch_alter_table("preferences") as batch:
        batch.drop_column("push_level")
        batch.drop_column("email_level")
    op.create_table(
        "muted_rooms",
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("room_id", sa.Uuid(), nullable=False),
        sa.ForeignKeyConstraint(["room_id"], ["rooms.id"], name="fk_muted_rooms_room_id_rooms"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_muted_rooms_user_id_users"),
        sa.PrimaryKeyConstraint("user_id", "room_id", name="pk_muted_rooms"),
    )
    op.execute(
        "INSERT INTO muted_rooms (user_id, room_id) SELECT user_id, room_id FROM room_settings"
        " WHERE muted_until IS NOT NULL"
    )
    op.drop_table("room_settings")
