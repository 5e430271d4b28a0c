"""Preferences: quiet hours, Do Not Disturb (`snoozed_until`) and breakthrough users.

Quiet hours are three nullable columns on `preferences` (start and end as "HH:MM", and the IANA
time zone they are read in), `snoozed_until` a fourth; existing users have neither.

Breakthrough users get a table of their own, `breakthrough_users` (user, breakthrough user), as
`blocks` has, rather than a JSON list on `preferences`: each id is then a foreign key to a user
that exists, a pair is there at most once (the primary key), and both databases store and compare
it alike (a JSON column is `JSON` on SQLite but would want `JSONB` on PostgreSQL, and its ids
would be checked by no one).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("preferences") as batch:
        batch.add_column(sa.Column("quiet_start", sa.String(5), nullable=True))
        batch.add_column(sa.Column("quiet_end", sa.String(5), nullable=True))
        batch.add_column(sa.Column("quiet_time_zone", sa.String(64), nullable=True))
        batch.add_column(sa.Column("snoozed_until", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "breakthrough_users",
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("breakthrough_id", sa.Uuid(), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name="fk_breakthrough_users_user_id_users"
        ),
        sa.ForeignKeyConstraint(
            ["breakthrough_id"], ["users.id"], name="fk_breakthrough_users_breakthrough_id_users"
        ),
        sa.PrimaryKeyConstraint("user_id", "breakthrough_id", name="pk_breakthrough_users"),
    )


def downgrade() -> None:
    op.drop_table("breakthrough_users")
    with op.batch_alter_table("preferences") as batch:
        batch.drop_column("snoozed_until")
        batch.drop_column("quiet_time_zone")
        batch.drop_column("quiet_end")
        batch.drop_column("quiet_start")
