"""Devices: when the client last registered the token (for pruning stale tokens and APNs' 410
rule) and the Web Push subscription's keys.

Revision ID: 0002
Revises: 0001
Create Date: 2026-02-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("token_updated_at", TIMESTAMP, nullable=True))
        batch.add_column(sa.Column("web_push_p256dh", sa.String(200), nullable=True))
        batch.add_column(sa.Column("web_push_auth", sa.String(100), nullable=True))
    # Existing devices count as registered when they were created: the stale clock starts there.
    op.execute("UPDATE devices SET token_updated_at = created_at")
    with op.batch_alter_table("devices") as batch:
        batch.alter_column("token_updated_at", existing_type=TIMESTAMP, nullable=False)
        batch.create_index("ix_devices_token_updated_at", ["token_updated_at"])


def downgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.drop_index("ix_devices_token_updated_at")
        batch.drop_column("web_push_auth")
        batch.drop_column("web_push_p256dh")
        batch.drop_column("token_updated_at")
