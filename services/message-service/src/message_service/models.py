"""message-service's tables, as SQLModel models. No event contract lives here (see
`herald_shared.events`); request and response bodies live in `api/schemas.py`."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Dialect,
    FetchedValue,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import registry
from sqlalchemy.types import DateTime, TypeDecorator
from sqlmodel import Field, SQLModel

from herald_shared.events import utc_now

USERNAME_MAX = 32
DISPLAY_TEXT_MAX = 100
EMAIL_MAX = 254
PASSWORD_HASH_MAX = 255
SESSION_NAME_MAX = 100
OIDC_CLAIM_MAX = 255  # an issuer URL or a subject (OpenID Connect caps `sub` at 255 ASCII)
DEVICE_TOKEN_MAX = 4096
WEB_PUSH_P256DH_MAX = 200  # as in herald_shared.events.WebPushKeys
WEB_PUSH_AUTH_MAX = 100
IDEMPOTENCY_KEY_MAX = 255
OUTBOX_ERROR_MAX = 500
TRACEPARENT_MAX = 128  # herald_shared.tracing.TRACEPARENT_MAX


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every database (SQLite stores them naive, in UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are not stored")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"expected a datetime, got {type(value).__name__}")
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# Named constraints, so that later (batch) migrations can refer to them on every database.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Table(SQLModel, registry=registry(metadata=metadata)):
    """Base of this service's tables: its own metadata, apart from SQLModel's global one."""


class User(Table, table=True):
    __tablename__ = "users"
    __table_args__ = (UniqueConstraint("username", name="uq_users_username"),)

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    username: str = Field(sa_type=String(USERNAME_MAX))
    display_name: str = Field(sa_type=String(DISPLAY_TEXT_MAX))
    email: str = Field(sa_type=String(EMAIL_MAX))
    # Argon2id, in the PHC string format (parameters and salt included); None for accounts
    # registered before passwords, until their owner sets one.
    password_hash: str | None = Field(default=None, sa_type=String(PASSWORD_HASH_MAX))
    # When the account was deleted: the row stays, emptied of everything personal, because the
    # messages it wrote and the rooms it made still name it.
    deleted_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    # Grows with every change that notification routing cares about (UserUpdated.version).
    version: int = Field(default=1, sa_type=Integer)
    created_at: datetime = Field(default_factory=utc_now, sa_type=UtcDateTime)
    updated_at: datetime = Field(default_factory=utc_now, sa_type=UtcDateTime)
    # E-mail verification (revision 0015): when the user confirmed `email` through the link
    # sent to it (None: not confirmed; nothing is e-mailed to it), and the notification e-mails
    # the mail server refused for good since (`EMAIL_BOUNCE_LIMIT` of them unconfirm it).
    email_verified_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    email_hard_bounces: int = Field(
        default=0, sa_type=Integer, sa_column_kwargs={"server_default": "0"}
    )


class AuthSession(Table, table=True):
    """A signed-in client: registration or `POST /sessions` starts one, signing out ends it,
    and it expires `SESSION_TTL` after its last use. Only the SHA-256 of its token is stored (a
    leaked table grants nothing); rotating the token keeps the session and its devices."""

    __tablename__ = "auth_sessions"
    __table_args__ = (UniqueConstraint("token_hash", name="uq_auth_sessions_token_hash"),)

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    user_id: uuid.UUID = Field(foreign_key="users.id", index=True)
    token_hash: str = Field(sa_type=String(64))
    # What the client called itself ("Alice's phone"), to tell sessions apart in a list.
    name: str | None = Field(default=None, sa_type=String(SESSION_NAME_MAX))
    created_at: datetime = Field(default_factory=utc_now, sa_type=UtcDateTime)
    last_used_at: datetime = Field(default_factory=utc_now, sa_type=UtcDateTime)
    expires_at: datetime = Field(sa_type=UtcDateTime, index=True)


class ExternalIdentity(Table, table=True):
    """A user of the OpenID Connect provider (`OIDC_ISSUER`), by the token's `iss` and `sub`:
    the account made for them the first time one of their access tokens was seen."""

    __tablename__ = "external_identities"

    issuer: str = Field(sa_type=String(OIDC_CLAIM_MAX), primary_key=True)
    subject: str = Field(sa_type=String(OIDC_CLAIM_MAX), primary_key=True)
    user_id: uuid.UUID = Field(foreign_key="users.id", index=True)
    created_at: datetime = Field(default_factory=utc_now, sa_type=UtcDateTime)


class Device(Table, table=True):
    """A push target. A token belongs to one user at a time (unique by its hash, because a
    PostgreSQL index cannot hold a 4 KiB value). For Web Push the token is the subscription's
    endpoint URL and the subscription's keys are stored beside it."""

    __tablename__ = "devices"
    __table_args__ = (UniqueConstraint("platform", "token_hash", name="uq_devices_token"),)

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    user_id: uuid.UUID = Field(foreign_key="users.id", index=True)
    # The session that registered it: signing that session out (or its expiry) removes the
    # device, so a signed-out app stops receiving the account's notifications.
    session_id: uuid.UUID | None = Field(default=None, foreign_key="auth_sessions.id", index=True)
    platform: str = Field(sa_type=String(16))
    token: str = Field(sa_type=Text)
    token_hash: str = Field(sa_type=String(64))
    created_at: datetime = Field(default_factory=utc_now, sa_type=UtcDateTime)
    # When the client last registered this token; devices not refreshed for
    # DEVICE_STALE_AFTER_DAYS are pruned (indexed for that scan).
    token_updated_at: datetime = Field(default_factory=utc_now, sa_type=UtcDateTime, index=True)
    # Web Push only (RFC 8291): the browser's P-256 public key and auth secret, base64url.
    web_push_p256dh: str | None = Field(default=None, sa_type=String(WEB_PUSH_P256DH_MAX))
    web_push_auth: str | None = Field(default=None, sa_type=String(WEB_PUSH_AUTH_MAX))


LEVEL_MAX = 16  # herald_shared.events.Level's values
CLOCK_TIME_MAX = 5  # "HH:MM"
TIME_ZONE_MAX = 64  # herald_shared.events.QuietHoursSnapshot.time_zone
# Two minutes, as Zulip waits: long enough that what was read meanwhile is not mailed.
DEFAULT_EMAIL_DELAY = 120
# A mute with no end: what the older `muted_room_ids` preference sets.
MUTED_FOREVER = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)


class Preferences(Table, table=True):
    """A user's defaults per channel (`herald_shared.events.Level`): new users hear of DMs and
    mentions only, as in the chat products people like."""

    __tablename__ = "preferences"

    user_id: uuid.UUID = Field(foreign_key="users.id", primary_key=True)
    push_level: str = Field(default="mentions", sa_type=String(LEVEL_MAX))
    email_level: str = Field(default="mentions", sa_type=String(LEVEL_MAX))
    push_preview: bool = True
    # Seconds e-mail waits, gathering one digest of what is still unread then.
    email_delay: int = DEFAULT_EMAIL_DELAY
    # Daily quiet hours ("HH:MM" on the wall clock of the IANA zone `quiet_time_zone`; an end
    # before the start ends the next day): all three set, or none (no quiet hours).
    quiet_start: str | None = Field(default=None, sa_type=String(CLOCK_TIME_MAX))
    quiet_end: str | None = Field(default=None, sa_type=String(CLOCK_TIME_MAX))
    quiet_time_zone: str | None = Field(default=None, sa_type=String(TIME_ZONE_MAX))
    # Do Not Disturb until then (None, or a time passed: not snoozed).
    snoozed_until: datetime | None = Field(default=None, sa_type=UtcDateTime)


class BreakthroughUser(Table, table=True):
    """A direct message from `breakthrough_id` pushes to `user_id` at once, even during their
    quiet hours or Do Not Disturb."""

    __tablename__ = "breakthrough_users"

    user_id: uuid.UUID = Field(foreign_key="users.id", primary_key=True)
    breakthrough_id: uuid.UUID = Field(foreign_key="users.id", primary_key=True)


class RoomSettings(Table, table=True):
    """A user's own settings for one room: levels that replace their defaults there (None: the
    default), and a mute until `muted_until` (None: not muted)."""

    __tablename__ = "room_settings"

    user_id: uuid.UUID = Field(foreign_key="users.id", primary_key=True)
    room_id: uuid.UUID = Field(foreign_key="rooms.id", primary_key=True)
    push_level: str | None = Field(default=None, sa_type=String(LEVEL_MAX))
    email_level: str | None = Field(default=None, sa_type=String(LEVEL_MAX))
    muted_until: datetime | None = Field(default=None, sa_type=UtcDateTime)


ROOM_KIND_MAX = 16  # herald_shared.events.RoomKind's values
DIRECT_KEY_MAX = 73  # two UUIDs and a colon


class Room(Table, table=True):
    __tablename__ = "rooms"

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    name: str = Field(sa_type=String(DISPLAY_TEXT_MAX))  # empty for a direct room
    kind: str = Field(default="group", sa_type=String(ROOM_KIND_MAX))
    # A direct room's two members, the smaller id first: unique, so a pair has one direct room.
    direct_key: str | None = Field(default=None, sa_type=String(DIRECT_KEY_MAX), unique=True)
    created_by: uuid.UUID = Field(foreign_key="users.id")
    created_at: datetime = Field(default_factory=utc_now, sa_type=UtcDateTime)


MEMBER = "member"
INVITED = "invited"  # added by someone else: nothing from the room until they join


class RoomMember(Table, table=True):
    """A user's place in a room: a member, or invited (by `invited_by`) and not yet joined.
    `joined_at` is when the row was made, then when they joined."""

    __tablename__ = "room_members"

    room_id: uuid.UUID = Field(foreign_key="rooms.id", primary_key=True)
    user_id: uuid.UUID = Field(foreign_key="users.id", primary_key=True, index=True)
    joined_at: datetime = Field(default_factory=utc_now, sa_type=UtcDateTime)
    state: str = Field(default=MEMBER, sa_type=String(16))
    invited_by: uuid.UUID | None = Field(default=None, foreign_key="users.id")
    # The read marker: the last message the user read here, and its creation time (messages are
    # ordered by it); None until they first mark the room read.
    read_message_id: uuid.UUID | None = Field(default=None)
    read_up_to: datetime | None = Field(default=None, sa_type=UtcDateTime)


class Block(Table, table=True):
    """`user_id` blocked `blocked_id`: no notifications, invitations or DMs reach them from it."""

    __tablename__ = "blocks"

    user_id: uuid.UUID = Field(foreign_key="users.id", primary_key=True)
    blocked_id: uuid.UUID = Field(foreign_key="users.id", primary_key=True)
    created_at: datetime = Field(default_factory=utc_now, sa_type=UtcDateTime)


class Message(Table, table=True):
    """A chat message. Its author may edit it (`edited_at`) or delete it (`deleted_at`). A delete
    keeps the row, so that the ids that name it (read markers, outbox events, the router's
    ledger) still name something, but empties its `content`: the text is really gone. A deleted
    message is never listed, counted unread, read up to, edited or replayed."""

    __tablename__ = "messages"
    __table_args__ = (
        # The same Idempotency-Key from the same sender is the same message.
        UniqueConstraint("sender_id", "idempotency_key", name="uq_messages_idempotency_key"),
        # Keyset pagination: newest first within a room.
        Index("ix_messages_room_created", "room_id", "created_at", "id"),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    room_id: uuid.UUID = Field(foreign_key="rooms.id")
    sender_id: uuid.UUID = Field(foreign_key="users.id")
    content: str = Field(sa_type=Text)
    created_at: datetime = Field(default_factory=utc_now, sa_type=UtcDateTime)
    idempotency_key: str | None = Field(default=None, sa_type=String(IDEMPOTENCY_KEY_MAX))
    # With a key: the SHA-256 (hex) of the text first posted with it, so that a retry of that
    # post still replays the message once its author edited it (None: no key, or a message
    # from before revision 0013, whose current text is compared instead).
    idempotency_fingerprint: str | None = Field(default=None, sa_type=String(64))
    # When its author last changed its text (None: never).
    edited_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    # When its author deleted it (None: not deleted); `content` is "" from then on.
    deleted_at: datetime | None = Field(default=None, sa_type=UtcDateTime)


class InboxItem(Table, table=True):
    """One item of a user's notification inbox: what the router decided and saw for them and one
    message (or invitation), as its latest `InboxItemsUpdated` carried it (`version`: an older
    or replayed event never overwrites a newer). Who sent it, its preview and whether it is read
    come from this service's own tables when the inbox is listed."""

    __tablename__ = "inbox_items"
    __table_args__ = (
        # The inbox, newest first (keyset pagination, no OFFSET).
        Index("ix_inbox_items_user_created", "user_id", "message_created_at", "message_id"),
        # What retention deletes, oldest first, in batches.
        Index("ix_inbox_items_created", "message_created_at"),
    )

    user_id: uuid.UUID = Field(primary_key=True)
    message_id: uuid.UUID = Field(primary_key=True)
    room_id: uuid.UUID
    trigger: str = Field(sa_type=String(16))
    message_created_at: datetime = Field(sa_type=UtcDateTime)
    decided_at: datetime = Field(sa_type=UtcDateTime)
    # [herald_shared.events.InboxDelivery as JSON]: per channel and device, state and reason.
    deliveries: str = Field(sa_type=Text)
    version: int = Field(sa_type=BigInteger)


class OutboxEvent(Table, table=True):
    """An event committed with the change it describes, waiting for the relay to publish it."""

    __tablename__ = "outbox"
    __table_args__ = (
        # What the relay scans: only the pending rows, in created order.
        Index(
            "ix_outbox_pending",
            "seq",
            postgresql_where=text("published_at IS NULL"),
            sqlite_where=text("published_at IS NULL"),
        ),
        Index("ix_outbox_published_at", "published_at"),
        # The real-time stream reads in this order (on SQLite, where `xid` stays empty, the
        # index is kept only so that both databases have one schema).
        Index("ix_outbox_stream", "xid", "seq"),
        UniqueConstraint("event_id", name="uq_outbox_event_id"),
    )

    # SQLite only auto-increments an INTEGER PRIMARY KEY.
    seq: int | None = Field(
        default=None,
        primary_key=True,
        sa_type=BigInteger().with_variant(Integer(), "sqlite"),
    )
    event_id: uuid.UUID
    event_type: str = Field(sa_type=String(32))
    payload: str = Field(sa_type=Text)
    created_at: datetime = Field(default_factory=utc_now, sa_type=UtcDateTime)
    published_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    attempts: int = Field(default=0, sa_type=Integer)
    last_error: str | None = Field(default=None, sa_type=String(OUTBOX_ERROR_MAX))
    # A row that failed through no fault of the broker (not a valid event, or a type this
    # version has no publisher for) is not claimed again before this time, so that it cannot
    # hold the rows behind it back; it stays pending (a newer replica may publish its type).
    retry_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    # The W3C trace context of the request that staged the event, so that the relay, publishing
    # later from its own task, publishes within that request's trace (None when not tracing).
    traceparent: str | None = Field(default=None, sa_type=String(TRACEPARENT_MAX))
    # On PostgreSQL, the id of the transaction that wrote the row (a database default: never
    # set here); with `seq`, the row's position in the real-time stream (`stream.py`).
    xid: int | None = Field(
        default=None, sa_type=BigInteger, sa_column_kwargs={"server_default": FetchedValue()}
    )


class EmailVerificationSend(Table, table=True):
    """When a verification e-mail last went to an address (of any user): at most one per
    `EMAIL_VERIFICATION_INTERVAL`, so nobody can have Herald mail an address over and over by
    registering it again and again. Keyed by the SHA-256 of the address in lower case
    (`email_verification.address_key`), never the address."""

    __tablename__ = "email_verification_sends"

    address_key: str = Field(sa_type=String(64), primary_key=True)
    sent_at: datetime = Field(sa_type=UtcDateTime)


class EmailBounce(Table, table=True):
    """A notification e-mail that bounced, counted once however often its `EmailBounced` is
    delivered (the key is the notification's id)."""

    __tablename__ = "email_bounces"

    notification_id: uuid.UUID = Field(primary_key=True)
    user_id: uuid.UUID = Field(foreign_key="users.id", index=True)
    bounced_at: datetime = Field(sa_type=UtcDateTime)
