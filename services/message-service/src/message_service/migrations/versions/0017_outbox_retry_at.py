"""Outbox: `retry_at`, before which the relay does not claim a row again.

Set on a row that failed through no fault of the broker (not a valid event, or a type with no
publisher in the relay's version), so that such rows no longer fill every batch the relay
claims and hold back all the rows behind them. NULL (every existing row): claimable now.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Plain ADD COLUMN, not a batch: nullable without a default, it rewrites nothing (on SQLite a
    # batch would copy the whole outbox).
    op.add_column("outbox", sa.Column("retry_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    # DROP COLUMN (SQLite 3.35+), not a batch: see upgrade().
    op.drop_column("outbox", "retry_at")
