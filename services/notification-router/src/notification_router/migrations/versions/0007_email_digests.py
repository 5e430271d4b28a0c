"""The durable schedule of e-mail that waits: digests (one waiting per user) and their entries;
the recipients' email_delay.

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
    op.create_table(
        "email_digests",
        sa.Column("digest_id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("job", sa.JSON(), nullable=True),
        sa.Column("size", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("digest_id", name="pk_email_digests"),
    )
    waiting = sa.text("state = 'waiting'")
    op.create_index(
        "uq_email_digests_user_id_waiting",
        "email_digests",
        ["user_id"],
        unique=True,
        postgresql_where=waiting,
        sqlite_where=waiting,
    )
    op.create_index("ix_email_digests_state_due_at", "email_digests", ["state", "due_at"])
    op.create_table(
        "digest_entries",
        sa.Column("message_id", sa.Uuid(), nullable=False),
        sa.Column("recipient_id", sa.Uuid(), nullable=False),
        sa.Column("digest_id", sa.Uuid(), nullable=False),
        sa.Column("room_id", sa.Uuid(), nullable=False),
        sa.Column("job", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.PrimaryKeyConstraint("message_id", "recipient_id", name="pk_digest_entries"),
        sa.ForeignKeyConstraint(
            ["message_id", "recipient_id"],
            ["notifications.message_id", "notifications.recipient_id"],
            name="fk_digest_entries_notifications",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["digest_id"],
            ["email_digests.digest_id"],
            name="fk_digest_entries_email_digests",
            ondelete="CASCADE",
        ),
    )
    op.create_index("ix_digest_entries_digest_id", "digest_entries", ["digest_id"])
    op.create_index(
        "ix_digest_entries_waiting",
        "digest_entries",
        ["digest_id"],
        postgresql_where=waiting,
        sqlite_where=waiting,
    )


def downgrade() -> None:
    op.drop_table("digest_entries")
    op.drop_table("email_digests")
    with op.batch_alter_table("recipients") as batch:
        batch.drop_column("email_delay")
