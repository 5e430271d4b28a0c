"""Recipients: email_verified (False: the user has not confirmed their address; nothing is
e-mailed to it).

Rows projected before this revision are of addresses message-service grandfathered as verified
(its revision 0016) and count as verified until the user's next snapshot says otherwise.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-03
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
    with op.batch_alter_table("recipients") as batch:
        batch.add_column(
            sa.Column("email_verified", sa.Boolean(), nullable=False, server_default=sa.true())
        )


def downgrade() -> None:
    with op.batch_alter_table("recipients") as batch:
        batch.drop_column("email_verified")
