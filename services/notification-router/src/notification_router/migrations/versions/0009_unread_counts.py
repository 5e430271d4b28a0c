"""Unread counts per user and room (the badge), and the ledger's index by recipient and room.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_notifications_recipient_id_room_id_message_created_at",
        "notifications",
        ["recipient_id", "room_id", "message_created_at"],
    )
    op.create_table(
        "unread_counts",
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("room_id", sa.Uuid(), nullable=False),
        sa.Column("unread", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("user_id", "room_id", name="pk_unread_counts"),
    )
    # What the ledger already holds, counted as the router counts from now on: messages (not
    # invitations) after the recipient's read marker, deleted ones aside.
    op.execute(
        """
        INSERT INTO unread_counts (user_id, room_id, unread)
        SELECT n.recipient_id, n.room_id, count(*)
        FROM notifications n
        LEFT JOIN read_markers m ON m.user_id = n.recipient_id AND m.room_id = n.room_id
        LEFT JOIN message_changes c ON c.message_id = n.message_id
        WHERE coalesce(n.trigger, 'message') <> 'invitation'
          AND c.deleted_at IS NULL
          AND (m.up_to IS NULL OR n.message_created_at > m.up_to)
        GROUP BY n.recipient_id, n.room_id
        """
    )


def downgrade() -> None:
    op.drop_table("unread_counts")
    op.drop_index(
        "ix_notifications_recipient_id_room_id_message_created_at", table_name="notifications"
    )
