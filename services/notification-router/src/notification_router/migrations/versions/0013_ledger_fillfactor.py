"""`notification_deliveries` keeps room on each page for the new versions of its rows
(`herald_shared.ledger.LEDGER_FILLFACTOR`), so that the update every delivery report makes stays
on the row's page without new index entries (heap-only tuples).

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# `LEDGER_FILLFACTOR` when this revision was written: a revision applies what it applied then.
FILLFACTOR = 70


def upgrade() -> None:
    # PostgreSQL only (SQLite has no such setting); pages written from now on keep the room.
    # The lock it takes (SHARE UPDATE EXCLUSIVE) lets reads and writes go on meanwhile.
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"ALTER TABLE notification_deliveries SET (fillfactor = {FILLFACTOR})")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE notification_deliveries RESET (fillfactor)")
