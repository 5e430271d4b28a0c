"""Room members: a state (member or invited) and who invited them; users' blocks.

Everyone in a room before this revision stays a member.

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
    with op.batch_alter_table("room_members") as batch:
        batch.add_column(sa.Column("state", sa.String(16), nullable=False, server_default="member"))
        batch.add_column(sa.Column("invited_by", sa.Uuid(), nullable=True))
        batch.create_foreign_key(
            "fk_room_members_invited_by_users", "users", ["invited_by"], ["id"]
        )
    op.create_table(
        "blocks",
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("blocked_id", sa.Uuid(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_blocks_user_id_users"),
        sa.ForeignKeyConstraint(["blocked_id"], ["users.id"], name="fk_blocks_blocked_id_users"),
        sa.PrimaryKeyConstraint("user_id", "blocked_id", name="pk_blocks"),
    )


def downgrade() -> None:
    op.drop_table("blocks")
    op.execute("DELETE FROM room_members WHERE state <> 'member'")
    with op.batch_alter_table("room_members") as batch:
        batch.drop_constraint("fk_room_members_invited_by_users", type_="foreignkey")
        batch.drop_column("invited_by")
        batch.drop_column("state")
