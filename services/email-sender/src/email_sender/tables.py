"""email-sender's own tables: the delivery ledger (one row per notification_id)."""

from __future__ import annotations

from sqlalchemy import (
    CheckConstraint,
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    Uuid,
)

metadata = MetaData()

# The idempotency record of every e-mail notification. `status` moves
# sending → (retrying → sending)* → delivered | failed; delivered and failed are final, and a job
# whose row is final is acknowledged without sending. `claimed_at` is the lease of the worker
# that is sending right now; `reported_at` says the delivery report has been published.
email_deliveries = Table(
    "email_deliveries",
    metadata,
    Column("notification_id", Uuid, primary_key=True),
    Column("message_id", Uuid, nullable=False),
    Column("recipient_id", Uuid, nullable=False),
    Column("status", String(16), nullable=False),
    Column("backend", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    # A safe, personal-data-free reason (an SMTP code, "invalid recipient address"…).
    Column("reason", String(200), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("claimed_at", DateTime(timezone=True), nullable=True),
    Column("finished_at", DateTime(timezone=True), nullable=True),
    Column("reported_at", DateTime(timezone=True), nullable=True),
    CheckConstraint(
        "status IN ('sending', 'retrying', 'delivered', 'failed')",
        name="ck_email_deliveries_status",
    ),
)
