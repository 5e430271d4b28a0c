"""The inbox's change log: a row per change of a (user, message) inbox item, written by triggers
on the three tables an item is read from, and the relay's version counter.

Triggers rather than a write in every repository function: an item changes in a dozen places
(decisions, delivery reports, windows that wait, close, are cancelled or recall), and one that
forgot to say so would leave a user's inbox wrong for good. On PostgreSQL they are statement
triggers with transition tables (one INSERT … SELECT DISTINCT per statement: an item whose two
devices' reports land in one statement is logged once).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# (table, event): each table has `recipient_id` and `message_id`, the item a row belongs to. A
# delivery row is only ever inserted with its item's decision or with a change of a window
# entry of it, which say so already: its inserts are not tracked, only its status changes.
TRACKED = (
    ("notifications", "INSERT"),
    ("notifications", "UPDATE"),
    ("notification_deliveries", "UPDATE"),
    ("window_entries", "INSERT"),
    ("window_entries", "UPDATE"),
)


def upgrade() -> None:
    op.create_table(
        "inbox_changes",
        sa.Column(
            "seq",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("message_id", sa.Uuid(), nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_inbox_changes"),
    )
    op.create_table(
        "inbox_relay",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_inbox_relay"),
    )
    op.execute("INSERT INTO inbox_relay (id, version) VALUES (1, 0)")
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            """
            CREATE FUNCTION inbox_item_changed() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                INSERT INTO inbox_changes (user_id, message_id)
                SELECT DISTINCT recipient_id, message_id FROM changed_rows;
                RETURN NULL;
            END
            $$
            """
        )
        for table, event in TRACKED:
            # S608: the names are this module's constants, not input.
            op.execute(
                f"CREATE TRIGGER {table}_inbox_{event.lower()} AFTER {event} ON {table} "
                "REFERENCING NEW TABLE AS changed_rows FOR EACH STATEMENT "
                "EXECUTE FUNCTION inbox_item_changed()"
            )
        return
    for table, event in TRACKED:
        op.execute(
            f"CREATE TRIGGER {table}_inbox_{event.lower()} AFTER {event} ON {table} "  # noqa: S608
            "FOR EACH ROW BEGIN "
            "INSERT INTO inbox_changes (user_id, message_id) "
            "VALUES (NEW.recipient_id, NEW.message_id); END"
        )


def downgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    for table, event in TRACKED:
        on_table = f" ON {table}" if postgres else ""
        op.execute(f"DROP TRIGGER IF EXISTS {table}_inbox_{event.lower()}{on_table}")
    if postgres:
        op.execute("DROP FUNCTION IF EXISTS inbox_item_changed()")
    op.drop_table("inbox_relay")
    op.drop_table("inbox_changes")
