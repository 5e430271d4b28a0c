"""Presence: the users' open real-time streams and the room each user has in view.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "presence_connections",
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("connection_id", sa.Uuid(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("user_id", "connection_id", name="pk_presence_connections"),
    )
    op.create_index("ix_presence_connections_expires_at", "presence_connections", ["expires_at"])
    op.create_table(
        "rooms_in_view",
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("room_id", sa.Uuid(), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("user_id", name="pk_rooms_in_view"),
    )


def downgrade() -> None:
    op.drop_table("rooms_in_view")
    op.drop_index("ix_presence_connections_expires_at", table_name="presence_connections")
    op.drop_table("presence_connections")
