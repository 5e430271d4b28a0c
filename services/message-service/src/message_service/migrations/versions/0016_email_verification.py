"""E-mail verification: users' `email_verified_at` and `email_hard_bounces`, the last
verification e-mail per address (`email_verification_sends`), and the bounces counted
(`email_bounces`).

Existing users are grandfathered as verified (`email_verified_at` = the migration's time): a
running deployment keeps e-mailing the addresses it already mailed, instead of silently
stopping for everyone until each user follows a link nobody sent them. The price: an address
registered before this revision by someone who does not own it stays mailed until it bounces
`EMAIL_BOUNCE_LIMIT` times, or its user changes it. An operator who wants every address
confirmed instead sets `email_verified_at` to NULL for all users after upgrading (and each
user then asks for a link: `POST /users/me/email/verification`).

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Plain ADD COLUMN, not a batch: on SQLite a batch rebuilds `users`, which every other
    # table references (the rebuild's DROP fails their foreign keys once rows exist).
    op.add_column("users", sa.Column("email_verified_at", sa.DateTime(timezone=True)))
    op.add_column(
        "users",
        sa.Column("email_hard_bounces", sa.Integer(), nullable=False, server_default="0"),
    )
    op.execute(sa.text("UPDATE users SET email_verified_at = CURRENT_TIMESTAMP"))
    op.create_table(
        "email_verification_sends",
        sa.Column("address_key", sa.String(64), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("address_key", name="pk_email_verification_sends"),
    )
    op.create_table(
        "email_bounces",
        sa.Column("notification_id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("bounced_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_email_bounces_user_id_users"),
        sa.PrimaryKeyConstraint("notification_id", name="pk_email_bounces"),
    )
    op.create_index("ix_email_bounces_user_id", "email_bounces", ["user_id"])


def downgrade() -> None:
    op.drop_index("ix_email_bounces_user_id", table_name="email_bounces")
    op.drop_table("email_bounces")
    op.drop_table("email_verification_sends")
    # DROP COLUMN (SQLite 3.35+), not a batch: see upgrade().
    op.drop_column("users", "email_hard_bounces")
    op.drop_column("users", "email_verified_at")
