"""The durable schedule of what waits: windows (one waiting per user and channel: an e-mail
digest, or pushes held for quiet hours) and their entries; the recipients' email_delay, quiet
hours, snooze and breakthrough users.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("recipients") as batch:
        # Rows projected before: their e-mail went out at once.
        batch.add_column(sa.Column("email_delay", sa.Integer(), nullable=False, server_default="0"))
        # {"start", "end", "time_zone"} or NULL.
        batch.add_column(sa.Column("quiet_hours", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("snoozed_until", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("breakthrough_user_ids", sa.JSON(), nullable=True))
    op.create_table(
        "waiting_windows",
        sa.Column("window_id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("channel", sa.String(16), nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("jobs", sa.JSON(), nullable=True),
        sa.Column("size", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("window_id", name="pk_waiting_windows"),
    )
    waiting = sa.text("state = 'waiting'")
    op.create_index(
        "uq_waiting_windows_user_id_channel_waiting",
        "waiting_windows",
        ["user_id", "channel"],
        unique=True,
        postgresql_where=waiting,
        sqlite_where=waiting,
    )
    op.create_index("ix_waiting_windows_state_due_at", "waiting_windows", ["state", "due_at"])
    op.create_table(
        "window_entries",
        sa.Column("message_id", sa.Uuid(), nullable=False),
        sa.Column("recipient_id", sa.Uuid(), nullable=False),
        sa.Column("channel", sa.String(16), nullable=False),
        sa.Column("window_id", sa.Uuid(), nullable=False),
        sa.Column("room_id", sa.Uuid(), nullable=False),
        sa.Column("job", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.PrimaryKeyConstraint("message_id", "recipient_id", "channel", name="pk_window_entries"),
        sa.ForeignKeyConstraint(
            ["message_id", "recipient_id"],
            ["notifications.message_id", "notifications.recipient_id"],
            name="fk_window_entries_notifications",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["window_id"],
            ["waiting_windows.window_id"],
            name="fk_window_entries_waiting_windows",
            ondelete="CASCADE",
        ),
    )
    op.create_index("ix_window_entries_window_id", "window_entries", ["window_id"])
    op.create_index(
        "ix_window_entries_waiting",
        "window_entries",
        ["window_id"],
        postgresql_where=waiting,
        sqlite_where=waiting,
    )


def downgrade() -> None:
    op.drop_table("window_entries")
    op.drop_table("waiting_windows")
    with op.batch_alter_table("recipients") as batch:
        for column in ("breakthrough_user_ids", "snoozed_until", "quiet_hours", "email_delay"):
            batch.drop_column(column)
