"""notification-router's own tables: the recipient projection and the notification ledger.

* `recipients`: one row per user, the latest `UserUpdated` snapshot seen (highest `version`).
* `notifications`: the ledger, one row per (message, recipient) with the decision per channel
  ("pending" or "skipped:<reason>"). Its primary key is the router's idempotency key.
* `notification_deliveries`: one row per notification the router asked a sender for (one per
  push device, one for the e-mail), keyed by the deterministic `notification_id`, with the
  status the delivery reports bring back.
* `presence_connections` and `rooms_in_view`: the presence projection, from `presence.changed`:
  each real-time stream with the time it expires (or ended), and the room each user has in
  view.

Every change goes through an Alembic revision in `migrations/versions/`.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKeyConstraint,
    Index,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    Uuid,
    true,
)

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

recipients = Table(
    "recipients",
    metadata,
    Column("user_id", Uuid, primary_key=True),
    Column("version", BigInteger, nullable=False),
    Column("username", Text, nullable=False),
    Column("display_name", Text, nullable=False),
    Column("email", Text, nullable=True),
    # [{"device_id", "platform", "token", "token_updated_at", "web_push_keys"}]: a snapshot,
    # replaced whole.
    Column("devices", JSON, nullable=False),
    Column("push_enabled", Boolean, nullable=False),
    Column("email_enabled", Boolean, nullable=False),
    Column("push_preview", Boolean, nullable=False, server_default=true()),
    Column("muted_room_ids", JSON, nullable=False),
    # Levels and per-room settings (revision 0004); NULL in rows projected before: the
    # booleans and muted_room_ids above say the same then.
    Column("push_level", String(16), nullable=True),
    Column("email_level", String(16), nullable=True),
    Column("room_settings", JSON, nullable=True),
    Column("time_zone", String(64), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

notifications = Table(
    "notifications",
    metadata,
    Column("message_id", Uuid, nullable=False),
    Column("recipient_id", Uuid, nullable=False),
    Column("room_id", Uuid, nullable=False),
    Column("mentioned", Boolean, nullable=False),
    # Why the recipient heard of the message (events.Trigger); NULL in rows decided before
    # revision 0004.
    Column("trigger", String(16), nullable=True),
    Column("push_decision", String(64), nullable=False),
    Column("email_decision", String(64), nullable=False),
    Column("decided_at", DateTime(timezone=True), nullable=False),
    # MessageCreated.timestamp: a delivery report's end-to-end latency is measured from it.
    # Null on rows written before revision 0002.
    Column("message_created_at", DateTime(timezone=True), nullable=True),
    PrimaryKeyConstraint("message_id", "recipient_id"),
)

notification_deliveries = Table(
    "notification_deliveries",
    metadata,
    Column("notification_id", Uuid, primary_key=True),
    Column("message_id", Uuid, nullable=False),
    Column("recipient_id", Uuid, nullable=False),
    Column("channel", String(16), nullable=False),
    # The device id for a push, "" for the e-mail.
    Column("target", String(64), nullable=False),
    Column("status", String(16), nullable=False),
    # What the sender reported for a failure (a provider code, no personal data).
    Column("reason", String(200), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    ForeignKeyConstraint(
        ["message_id", "recipient_id"],
        ["notifications.message_id", "notifications.recipient_id"],
        ondelete="CASCADE",
    ),
    Index("ix_notification_deliveries_message_id_recipient_id", "message_id", "recipient_id"),
)

presence_connections = Table(
    "presence_connections",
    metadata,
    Column("user_id", Uuid, nullable=False),
    Column("connection_id", Uuid, nullable=False),
    # Open until then unless renewed; for a stream that ended, its end.
    Column("expires_at", DateTime(timezone=True), nullable=False),
    # When message-service said so: an older word on the same stream never overwrites a newer.
    Column("at", DateTime(timezone=True), nullable=False),
    PrimaryKeyConstraint("user_id", "connection_id"),
    Index("ix_presence_connections_expires_at", "expires_at"),
)

rooms_in_view = Table(
    "rooms_in_view",
    metadata,
    Column("user_id", Uuid, primary_key=True),
    Column("room_id", Uuid, nullable=True),
    Column("at", DateTime(timezone=True), nullable=False),
)
