"""The outbox's stream position: the id of the transaction that wrote each row (PostgreSQL).

The real-time stream (`message_service.stream`) reads the outbox in (transaction id, seq) order,
below the oldest transaction still running, so rows never appear behind ones already read. On
SQLite the column stays empty: one writer at a time makes `seq` alone that order.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("outbox") as batch:
        batch.add_column(sa.Column("xid", sa.BigInteger(), nullable=True))
    if op.get_bind().dialect.name == "postgresql":
        # xid8 is 64 bits and never wraps around; every row written from now on gets its own.
        op.execute(
            "ALTER TABLE outbox ALTER COLUMN xid SET DEFAULT (pg_current_xact_id()::text::bigint)"
        )
    op.create_index("ix_outbox_stream", "outbox", ["xid", "seq"])


def downgrade() -> None:
    op.drop_index("ix_outbox_stream", table_name="outbox")
    with op.batch_alter_table("outbox") as batch:
        batch.drop_column("xid")
