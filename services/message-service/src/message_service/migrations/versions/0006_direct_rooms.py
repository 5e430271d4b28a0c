"""Rooms: a kind (group or direct), and the unique key of a direct room's pair of users.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("rooms") as batch:
        batch.add_column(sa.Column("kind", sa.String(16), nullable=False, server_default="group"))
        batch.add_column(sa.Column("direct_key", sa.String(73), nullable=True))
        batch.create_unique_constraint("uq_rooms_direct_key", ["direct_key"])


def downgrade() -> None:
    with op.batch_alter_table("rooms") as batch:
        batch.drop_constraint("uq_rooms_direct_key", type_="unique")
        batch.drop_column("direct_key")
        batch.drop_column("kind")
