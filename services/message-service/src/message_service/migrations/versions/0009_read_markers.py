"""Read markers: the last message each member read in each room.

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
    with op.batch_alter_table("room_members") as batch:
        batch.add_column(sa.Column("read_message_id", sa.Uuid(), nullable=True))
        batch.add_column(sa.Column("read_up_to", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("room_members") as batch:
        batch.drop_column("read_up_to")
        batch.drop_column("read_message_id")
