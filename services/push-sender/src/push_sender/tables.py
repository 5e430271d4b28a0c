"""push-sender's own tables: the delivery ledger (one row per notification_id)."""

from __future__ import annotations

from sqlalchemy import CheckConstraint, Column, DateTime, Integer, MetaData, String, Table, Uuid

metadata = MetaData()

# The idempotency record of every push notification. `status` moves
# sending → (retrying → sending)* → delivered | failed; delivered and failed are final, and a job
# whose row is final is acknowledged without calling the provider. `claimed_at` is the lease of
# the worker sending right now; `reported_at` says the outcome's events have been published.
# The device token is never stored here.
push_deliveries = Table(
    "push_deliveries",
    metadata,
    Column("notification_id", Uuid, primary_key=True),
    Column("message_id", Uuid, nullable=False),
    Column("recipient_id", Uuid, nullable=False),
    Column("device_id", Uuid, nullable=False),
    Column("status", String(16), nullable=False),
    # Why a failed delivery failed: the device's token is dead, or the provider refused the push.
    Column("failure", String(16), nullable=True),
    Column("provider", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    # A safe, personal-data-free reason ("fcm 404 UNREGISTERED", "fcm timeout"…).
    Column("reason", String(200), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("claimed_at", DateTime(timezone=True), nullable=True),
    Column("finished_at", DateTime(timezone=True), nullable=True),
    Column("reported_at", DateTime(timezone=True), nullable=True),
    CheckConstraint(
        "status IN ('sending', 'retrying', 'delivered', 'failed')",
        name="ck_push_deliveries_status",
    ),
    CheckConstraint(
        "failure IS NULL OR failure IN ('token_invalid', 'rejected')",
        name="ck_push_deliveries_failure",
    ),
)
