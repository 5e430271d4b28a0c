"""notification-router's own tables: the recipient projection and the notification ledger.

* `recipients`: one row per user, the latest `UserUpdated` snapshot seen (highest `version`).
* `notifications`: the ledger, one row per (message, recipient) with the decision per channel
  ("pending" or "skipped:<reason>"). Its primary key is the router's idempotency key.
* `notification_deliveries`: one row per notification the router asked a sender for (one per
  push device, one for the e-mail), keyed by the deterministic `notification_id`, with the
  status the delivery reports bring back.
* `read_markers`: how far each user read each room, from `room.read`.
* `unread_counts`: per user and room, the messages the user has not read (their badge is the
  sum), counted as messages are routed and counted again when the room's read marker moves.
* `waiting_windows` and `window_entries`: the durable schedule of what waits (e-mail for the
  user's delay, pushes for their quiet hours, recalls of pushes a read made stale). A user has
  at most one `waiting` window per channel (a partial unique index: "one digest per window" is
  a database fact); each waiting notification is an entry of it, with what was decided.
* `message_changes`: edits and deletions, from `message.updated` / `message.deleted`, applied
  to what still waits when its window ends.
* `presence_connections` and `rooms_in_view`: the presence projection, from `presence.changed`:
  each real-time stream with the time it expires (or ended), and the room each user has in
  view.
* `inbox_changes` and `inbox_relay`: which (user, message) inbox items changed since they were
  last published (a row per change, written by database triggers on `notifications`,
  `notification_deliveries` and `window_entries`, so no path that changes an item can forget
  it), and the version the last publication of the inbox relay took (`inbox.py`).

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
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    Uuid,
    text,
    true,
)

from herald_shared.ledger import LEDGER_FILLFACTOR

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
    # Seconds e-mail waits, gathering one digest (revision 0007; 0 in rows projected before).
    Column("email_delay", Integer, nullable=False, server_default="0"),
    # Quiet hours ({"start", "end", "time_zone"}), Do Not Disturb and the users whose direct
    # messages break through them (revision 0007; NULL: none).
    Column("quiet_hours", JSON, nullable=True),
    Column("snoozed_until", DateTime(timezone=True), nullable=True),
    Column("breakthrough_user_ids", JSON, nullable=True),
    # Whether the user confirmed `email` (revision 0012; true in rows projected before, as
    # message-service grandfathered their addresses): an unconfirmed address is never e-mailed.
    Column("email_verified", Boolean, nullable=False, server_default=true()),
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
    # A user's messages of a room by time: what a read marker's move reads (revision 0009).
    Index(
        "ix_notifications_recipient_id_room_id_message_created_at",
        "recipient_id",
        "room_id",
        "message_created_at",
    ),
    # What retention deletes, oldest first (revision 0011).
    Index("ix_notifications_decided_at", "decided_at"),
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
    # Room on each page for the new version of a row that a delivery report updates.
    postgresql_with={"fillfactor": LEDGER_FILLFACTOR},
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

read_markers = Table(
    "read_markers",
    metadata,
    Column("user_id", Uuid, nullable=False),
    Column("room_id", Uuid, nullable=False),
    # The creation time of the last message read: everything of the room up to it is read.
    Column("up_to", DateTime(timezone=True), nullable=False),
    Column("message_id", Uuid, nullable=False),
    PrimaryKeyConstraint("user_id", "room_id"),
)

unread_counts = Table(
    "unread_counts",
    metadata,
    Column("user_id", Uuid, nullable=False),
    Column("room_id", Uuid, nullable=False),
    Column("unread", Integer, nullable=False),
    PrimaryKeyConstraint("user_id", "room_id"),
)

WINDOW_WAITING = "waiting"

waiting_windows = Table(
    "waiting_windows",
    metadata,
    Column("window_id", Uuid, primary_key=True),
    Column("user_id", Uuid, nullable=False),
    # email: a digest after the user's delay; push: what waits for quiet hours or a snooze;
    # recall: what a read (or a deletion) made stale on the user's devices.
    Column("channel", String(16), nullable=False),
    Column("opened_at", DateTime(timezone=True), nullable=False),
    Column("due_at", DateTime(timezone=True), nullable=False),
    # waiting → sending (its jobs composed, being published) → sent; or waiting → cancelled
    # (nothing left to tell).
    Column("state", String(16), nullable=False),
    # When it left `waiting`; for one `sending`, when its publication was last tried.
    Column("closed_at", DateTime(timezone=True), nullable=True),
    # Its jobs (EmailRequested / PushRequested), kept from `sending` on so a retry sends the
    # same.
    Column("jobs", JSON, nullable=True),
    # Messages told of.
    Column("size", Integer, nullable=True),
    Index(
        "uq_waiting_windows_user_id_channel_waiting",
        "user_id",
        "channel",
        unique=True,
        postgresql_where=text(f"state = '{WINDOW_WAITING}'"),
        sqlite_where=text(f"state = '{WINDOW_WAITING}'"),
    ),
    Index("ix_waiting_windows_state_due_at", "state", "due_at"),
    Index("ix_waiting_windows_closed_at", "closed_at"),
)

window_entries = Table(
    "window_entries",
    metadata,
    Column("message_id", Uuid, nullable=False),
    Column("recipient_id", Uuid, nullable=False),
    Column("channel", String(16), nullable=False),
    Column("window_id", Uuid, nullable=False),
    Column("room_id", Uuid, nullable=False),
    # What was decided: the e-mail (an EmailRequested), the pushes (routing.HeldPushes), or
    # for a recall the pushes shown (routing.RecalledPushes).
    Column("job", JSON, nullable=False),
    # waiting, sent, or cancelled:<reason> (routing.SkipReason).
    Column("state", String(32), nullable=False),
    PrimaryKeyConstraint("message_id", "recipient_id", "channel"),
    ForeignKeyConstraint(
        ["message_id", "recipient_id"],
        ["notifications.message_id", "notifications.recipient_id"],
        ondelete="CASCADE",
    ),
    ForeignKeyConstraint(["window_id"], ["waiting_windows.window_id"], ondelete="CASCADE"),
    Index("ix_window_entries_window_id", "window_id"),
    # The waiting ones are few and read every poll (the backlog gauge); the rest is history.
    Index(
        "ix_window_entries_waiting",
        "window_id",
        postgresql_where=text(f"state = '{WINDOW_WAITING}'"),
        sqlite_where=text(f"state = '{WINDOW_WAITING}'"),
    ),
)

message_changes = Table(
    "message_changes",
    metadata,
    Column("message_id", Uuid, primary_key=True),
    Column("room_id", Uuid, nullable=False),
    # The latest text (from the latest edit), and when it was written.
    Column("content", Text, nullable=True),
    Column("edited_at", DateTime(timezone=True), nullable=True),
    Column("deleted_at", DateTime(timezone=True), nullable=True),
)

inbox_changes = Table(
    "inbox_changes",
    metadata,
    Column(
        "seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("user_id", Uuid, nullable=False),
    Column("message_id", Uuid, nullable=False),
)

inbox_relay = Table(
    "inbox_relay",
    metadata,
    # One row: the version of the last publication (its row lock makes one relay at a time).
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("version", BigInteger, nullable=False),
)
