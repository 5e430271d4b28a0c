"""`notification_deliveries` keeps room on each page (`LEDGER_FILLFACTOR`) for the new
versions of its rows, so that the update every delivery report makes stays on the row's page
without new index entries (heap-only tuples).

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from herald_shared.ledger import LEDGER_FILLFACTOR

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # PostgreSQL only (SQLite has no such setting); pages written from now on keep the room.
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"ALTER TABLE notification_deliveries SET (fillfactor = {LEDGER_FILLFACTOR})")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE notification_deliveries RESET (fillfactor)")
