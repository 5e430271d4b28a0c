"""The inbox relay's versions come from a sequence (PostgreSQL): a value `nextval` handed out is
never handed out again, even when the transaction that took it rolls back. A publication that
failed may still have reached the broker (a confirm that timed out, a commit that failed, a
process that died before committing): the next pass must not publish the same items' newer
state under that version, which message-service would ignore (it applies only higher ones).

It starts after the last version the counter row (`inbox_relay`, revision 0010) recorded; that
row stays, as the relay's lock and the record of its last publication. SQLite keeps the counter
row (one relay per file): the relay commits its bump before publishing.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("CREATE SEQUENCE inbox_versions AS bigint MINVALUE 1")
    op.execute(
        "SELECT setval('inbox_versions', "
        "(SELECT COALESCE(MAX(version), 0) + 1 FROM inbox_relay), false)"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    # The counter row goes on from every version the sequence may have handed out.
    op.execute(
        "UPDATE inbox_relay SET version = GREATEST(version, "
        "(SELECT last_value FROM inbox_versions))"
    )
    op.execute("DROP SEQUENCE inbox_versions")
