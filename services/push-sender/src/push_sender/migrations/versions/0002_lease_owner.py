"""The lease's owner in the delivery ledger (`leased_by`): every write after a claim is a
compare-and-set on it.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Leases taken before the column existed have no owner: no worker's compare-and-set matches
    # them, so they run out (at most one lease) and the next copy takes the row over.
    with op.batch_alter_table("push_deliveries") as batch:
        batch.add_column(sa.Column("leased_by", sa.Uuid(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("push_deliveries") as batch:
        batch.drop_column("leased_by")
