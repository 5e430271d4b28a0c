"""The ledger's failure `rejected`: an e-mail refused for good at DATA (its content), which,
unlike `bounced` (its recipient refused at RCPT TO), says nothing about the address.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = "ck_email_deliveries_failure"


def _allow(*codes: str) -> None:
    allowed = ", ".join(f"'{code}'" for code in codes)
    with op.batch_alter_table("email_deliveries") as batch:
        batch.drop_constraint(NAME, type_="check")
        batch.create_check_constraint(NAME, f"failure IS NULL OR failure IN ({allowed})")


def upgrade() -> None:
    _allow("bounced", "invalid", "rejected")


def downgrade() -> None:
    # Rows failed `rejected` would break the old constraint: they were refused for good, and
    # before this revision that was recorded as `bounced`.
    op.execute("UPDATE email_deliveries SET failure = 'bounced' WHERE failure = 'rejected'")
    _allow("bounced", "invalid")
