"""Messages: edited_at and deleted_at (their author's edits and deletes).

Both nullable; existing messages are neither edited nor deleted. A delete is soft: the row stays
(read markers, outbox events and the router's ledger name it by id) with `deleted_at` set and its
`content` emptied to "", so the text itself is gone from the database.

Downgrading removes the rows of deleted messages: without `deleted_at` they would come back as
empty messages (their text is gone already), and no foreign key points at a message.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("edited_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.execute("DELETE FROM messages WHERE deleted_at IS NOT NULL")
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("deleted_at")
        batch.drop_column("edited_at")
