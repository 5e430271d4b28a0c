"""What retention deletes, oldest first: the ledger by decision time, the windows by when they
ended.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_notifications_decided_at", "notifications", ["decided_at"])
    op.create_index("ix_waiting_windows_closed_at", "waiting_windows", ["closed_at"])


def downgrade() -> None:
    op.drop_index("ix_waiting_windows_closed_at", table_name="waiting_windows")
    op.drop_index("ix_notifications_decided_at", table_name="notifications")
