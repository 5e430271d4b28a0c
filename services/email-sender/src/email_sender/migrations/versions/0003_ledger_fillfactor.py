"""The delivery ledger keeps room on each page for the new versions of its rows
(`herald_shared.ledger.LEDGER_FILLFACTOR`), so that the updates every delivery takes (its
outcome, then its report) stay on the row's page without new index entries (heap-only tuples).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# `LEDGER_FILLFACTOR` when this revision was written: a revision applies what it applied then.
FILLFACTOR = 70


def upgrade() -> None:
    # PostgreSQL only (SQLite has no such setting); pages written from now on keep the room.
    # The lock it takes (SHARE UPDATE EXCLUSIVE) lets reads and writes go on meanwhile.
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"ALTER TABLE email_deliveries SET (fillfactor = {FILLFACTOR})")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE email_deliveries RESET (fillfactor)")
