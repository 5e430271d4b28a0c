"""Recipients: notification levels and per-room settings; the ledger: each decision's trigger.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # All nullable: rows written before keep meaning what they meant (the booleans and the
    # muted rooms) until the user's next snapshot replaces them.
    with op.batch_alter_table("recipients") as batch:
        batch.add_column(sa.Column("push_level", sa.String(16), nullable=True))
        batch.add_column(sa.Column("email_level", sa.String(16), nullable=True))
        batch.add_column(sa.Column("room_settings", sa.JSON(), nullable=True))
    with op.batch_alter_table("notifications") as batch:
        batch.add_column(sa.Column("trigger", sa.String(16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("notifications") as batch:
        batch.drop_column("trigger")
    with op.batch_alter_table("recipients") as batch:
        batch.drop_column("room_settings")
        batch.drop_column("email_level")
        batch.drop_column("push_level")
