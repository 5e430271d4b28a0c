"""Recipients: push_preview (False: pushes never show the message's text).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Rows projected before this revision keep previews on until the user's next snapshot.
    with op.batch_alter_table("recipients") as batch:
        batch.add_column(
            sa.Column("push_preview", sa.Boolean(), nullable=False, server_default=sa.true())
        )


def downgrade() -> None:
    with op.batch_alter_table("recipients") as batch:
        batch.drop_column("push_preview")
