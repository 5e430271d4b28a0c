"""What the HTTP API reads and writes: request bodies with their validation, and response models.

Request models forbid unknown fields; response models list their fields explicitly (no push
token, no one else's e-mail address).
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StringConstraints,
    Tag,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

from herald_shared.events import (
    MAX_MESSAGE_CONTENT,
    MAX_RECIPIENTS,
    Channel,
    InboxState,
    Level,
    Platform,
    RoomKind,
    Trigger,
)
from message_service.models import (
    DEVICE_TOKEN_MAX,
    DISPLAY_TEXT_MAX,
    EMAIL_MAX,
    SESSION_NAME_MAX,
    TIME_ZONE_MAX,
    USERNAME_MAX,
    WEB_PUSH_AUTH_MAX,
    WEB_PUSH_P256DH_MAX,
    AuthSession,
    Device,
    Message,
    User,
)
from message_service.repository import InboxRow
from message_service.service import (
    INBOX_PREVIEW_CHARS,
    KEEP,
    MAX_BREAKTHROUGH_USERS,
    MAX_PAGE_SIZE,
    MAX_SNOOZE,
    ROOM_MENTIONS,
    Keep,
    MyRooms,
    PreferencesView,
    QuietHours,
    ReadMarker,
    RoomNotificationsView,
    RoomView,
)
from message_service.webpush_keys import AUTH_SECRET_BYTES, decode_base64url, is_p256_public_key

# --- validation ---------------------------------------------------------------------------------

# The rules below are patterns, in the JSON Schema of each field as well as checked here, so that
# the OpenAPI description says exactly what the server takes. Each is written for both regular
# expression dialects: Rust's (pydantic's, and most JSON Schema validators') and ECMAScript's
# (JSON Schema's): `^` and `$` anchor the whole text, and characters are named by `\xNN` and
# `\uNNNN` escapes, never by `\s` or `\w` (whose meanings differ).

# Control characters (Unicode category Cc), line and paragraph separators, and the bidirectional
# overrides and isolates (invisible, and used to disguise names).
_CONTROL = r"\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069"
# What `str.strip()` removes besides those: the other Unicode white space.
_SPACE = r"\x20\xa0\u1680\u2000-\u200a\u202f\u205f\u3000"
# A name: single line, no control characters, not blank; white space around it is trimmed.
SINGLE_LINE = rf"^[^{_CONTROL}]*[^{_CONTROL}{_SPACE}][^{_CONTROL}]*$"
# A message: as a name, but tabs and line breaks are text.
_MESSAGE_CONTROL = r"\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f"
MESSAGE_TEXT = (
    rf"^[^{_MESSAGE_CONTROL}]*[^{_MESSAGE_CONTROL}\t\n\r{_SPACE}\x85\u2028\u2029]"
    rf"[^{_MESSAGE_CONTROL}]*$"
)
# The WHATWG HTML definition of a valid e-mail address (what browsers accept), with a dotted
# domain; white space around it is trimmed.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
EMAIL = (
    rf"^[\t\n\r{_SPACE}]*"
    rf"[A-Za-z0-9.!#$%&'*+/=?^_`{{|}}~-]{{1,64}}@{_LABEL}(?:\.{_LABEL})+"
    rf"[\t\n\r{_SPACE}]*$"
)
PRINTABLE_ASCII = r"^[\x21-\x7e]+$"
# Base64url (RFC 4648 section 5), padded or not.
BASE64URL = r"^[A-Za-z0-9_-]*={0,2}$"


def _email(value: str) -> str:
    local, domain = value.rsplit("@", 1)
    return f"{local}@{domain.lower()}"


def _p256dh(value: str) -> str:
    if not is_p256_public_key(decode_base64url(value)):
        raise ValueError("must be the subscription's P-256 public key (65 bytes, base64url)")
    return value.rstrip("=")


def _auth_secret(value: str) -> str:
    if len(decode_base64url(value)) != AUTH_SECRET_BYTES:
        raise ValueError("must be the subscription's 16-byte auth secret (base64url)")
    return value.rstrip("=")


def _not_a_room_mention(value: str) -> str:
    if value in ROOM_MENTIONS:
        raise ValueError(f"@{value} mentions a whole room: choose another username")
    return value


Username = Annotated[
    str,
    StringConstraints(pattern=r"^[a-z0-9_]{3,32}$"),
    AfterValidator(_not_a_room_mention),
    Field(examples=["alice_01"], json_schema_extra={"not": {"enum": sorted(ROOM_MENTIONS)}}),
]
# The length is that of the text as sent, white space around it included.
DisplayText = Annotated[
    str,
    StringConstraints(max_length=DISPLAY_TEXT_MAX, pattern=SINGLE_LINE),
    AfterValidator(str.strip),
    Field(description="One line, no control characters, not blank; trimmed"),
]
Email = Annotated[
    str,
    StringConstraints(max_length=EMAIL_MAX, pattern=EMAIL),
    AfterValidator(str.strip),
    AfterValidator(_email),
    Field(examples=["alice@example.com"], description="Trimmed; the domain is lowercased"),
]
# NIST SP 800-63B: at least 8 characters, at least 64 allowed, no composition rules (any
# character, spaces too); the upper bound keeps one hash's input small.
PASSWORD_MIN = 8
PASSWORD_MAX = 128
PASSWORD_FORMAT = Field(json_schema_extra={"format": "password", "writeOnly": True})
Password = Annotated[
    str,
    StringConstraints(min_length=PASSWORD_MIN, max_length=PASSWORD_MAX),
    PASSWORD_FORMAT,
    Field(description=f"{PASSWORD_MIN} to {PASSWORD_MAX} characters, any of them"),
]
SessionName = Annotated[
    str,
    StringConstraints(max_length=SESSION_NAME_MAX, pattern=SINGLE_LINE),
    AfterValidator(str.strip),
    Field(
        examples=["Alice's phone"],
        description="What the client calls itself, to tell sessions apart; one line, trimmed",
    ),
]
MessageText = Annotated[
    str,
    StringConstraints(min_length=1, max_length=MAX_MESSAGE_CONTENT, pattern=MESSAGE_TEXT),
    Field(description="Not blank; no control characters but tabs and line breaks"),
]
DeviceToken = Annotated[
    str, StringConstraints(min_length=1, max_length=DEVICE_TOKEN_MAX, pattern=PRINTABLE_ASCII)
]
# An APNs device token: 32 bytes in hex, stored in lower case so one device is one token.
ApnsToken = Annotated[
    str,
    StringConstraints(pattern=r"^[0-9A-Fa-f]{64}$"),
    AfterValidator(str.lower),
    Field(examples=["a" * 64]),
]

# --- requests -----------------------------------------------------------------------------------


_FIRST_INSTANT = datetime.min.replace(tzinfo=UTC)
_LAST_INSTANT = datetime.max.replace(tzinfo=UTC)


def _in_utc(value: datetime) -> datetime:
    """The instant in UTC. Year 1 with a positive offset, or year 9999 with a negative one, is
    before or after any UTC time Python (and so the database) holds: the first or last one
    stands for it, which means the same for a mute (long over, or for ever)."""
    try:
        return value.astimezone(UTC)
    except OverflowError:
        return _FIRST_INSTANT if value.year == _FIRST_INSTANT.year else _LAST_INSTANT


def _text_only(value: object) -> object:
    """An instant is RFC 3339 text, as the schema says: not a number (which pydantic would read
    as seconds since 1970)."""
    if not isinstance(value, str | datetime):
        raise ValueError("must be a date-time string (RFC 3339)")
    return value


UtcInstant = Annotated[AwareDatetime, BeforeValidator(_text_only), AfterValidator(_in_utc)]


def _whole_number(value: object) -> object:
    """A delay is a JSON integer: not `false` (which equals 0), not `120.0`."""
    if type(value) is not int:
        raise ValueError("must be an integer number of seconds")
    return value


# Seconds e-mail waits: herald_shared.events.EMAIL_DELAYS.
EmailDelay = Annotated[Literal[0, 120, 900, 3600], BeforeValidator(_whole_number)]

# A room's level: one of the levels, or `default` (the user's own level applies).
RoomLevel = Literal["default", "all", "mentions", "none"]

# A time of day, as herald_shared.events.QuietHoursSnapshot has it.
ClockTime = Annotated[
    str,
    StringConstraints(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$"),
    Field(description="HH:MM, 00:00 to 23:59", examples=["22:00"]),
]
# The server checks the name against its time zone database (a 422 if unknown).
TimeZone = Annotated[
    str,
    StringConstraints(
        min_length=1,
        max_length=TIME_ZONE_MAX,
        pattern=r"^[A-Za-z][A-Za-z0-9_+-]*(/[A-Za-z0-9_+-]+)*$",
    ),
    Field(description="An IANA time zone name", examples=["Europe/Paris"]),
]


def _lone_surrogate_in(value: object) -> bool:
    if isinstance(value, str):
        return any("\ud800" <= char <= "\udfff" for char in value)
    if isinstance(value, dict):
        return any(_lone_surrogate_in(k) or _lone_surrogate_in(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_lone_surrogate_in(item) for item in value)
    return False


class RequestBody(BaseModel):
    """Every request body: unknown fields refused, and text that is not Unicode (a lone
    surrogate, such as JSON's `"\\ud800"`, which no database can store) refused."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: object) -> object:
        if _lone_surrogate_in(data):
            raise ValueError("text must be valid Unicode (no lone surrogate)")
        return data


class UserCreate(RequestBody):
    username: Username
    display_name: DisplayText
    email: Email
    password: Password
    session_name: SessionName | None = None


class SessionCreate(RequestBody):
    """Sign in."""

    # No username has a control character, and PostgreSQL cannot even look one up with a NUL.
    username: Annotated[
        str,
        StringConstraints(min_length=1, max_length=USERNAME_MAX, pattern=SINGLE_LINE),
        AfterValidator(str.lower),
        Field(description="Case does not matter; one line, no control characters"),
    ]
    password: Annotated[str, StringConstraints(max_length=PASSWORD_MAX), PASSWORD_FORMAT]
    name: SessionName | None = None


class PasswordChange(RequestBody):
    """`current_password` is required when the account has a password (every account but
    those registered before passwords existed)."""

    current_password: (
        Annotated[str, StringConstraints(max_length=PASSWORD_MAX), PASSWORD_FORMAT]
        | SkipJsonSchema[None]
    ) = None
    new_password: Password


class UserPatch(RequestBody):
    """What to change; a field left out keeps its value. Neither can be null."""

    # `None` is what a field left out reads as; the schema does not offer null.
    display_name: DisplayText | SkipJsonSchema[None] = None
    email: Email | SkipJsonSchema[None] = None

    @model_validator(mode="after")
    def _no_nulls(self) -> UserPatch:
        for name in self.model_fields_set:
            if getattr(self, name) is None:
                raise ValueError(f"{name} cannot be null")
        return self


class FcmDeviceCreate(RequestBody):
    platform: Literal["fcm"]
    token: DeviceToken


class ApnsDeviceCreate(RequestBody):
    platform: Literal["apns"]
    token: ApnsToken


class WebPushKeysBody(RequestBody):
    # 65 bytes starting 0x04 (an uncompressed point), in base64url; it must be on the curve.
    p256dh: Annotated[
        str,
        StringConstraints(
            max_length=WEB_PUSH_P256DH_MAX, pattern=r"^B[A-P][A-Za-z0-9_-]{85}={0,2}$"
        ),
        AfterValidator(_p256dh),
        Field(description="The subscription's P-256 public key: a point on the curve"),
    ]
    # 16 bytes in base64url.
    auth: Annotated[
        str,
        StringConstraints(max_length=WEB_PUSH_AUTH_MAX, pattern=r"^[A-Za-z0-9_-]{22}={0,2}$"),
        AfterValidator(_auth_secret),
    ]


class WebPushDeviceCreate(RequestBody):
    """A browser's `PushSubscription.toJSON()`, plus `"platform": "webpush"`. The endpoint must
    be on a known push service (`WEBPUSH_ALLOWED_HOSTS`)."""

    platform: Literal["webpush"]
    endpoint: DeviceToken
    keys: WebPushKeysBody
    # Part of toJSON(); the push service tells us when a subscription ends (404/410).
    expiration_time: float | None = Field(default=None, alias="expirationTime", allow_inf_nan=False)


DeviceCreate = Annotated[
    FcmDeviceCreate | ApnsDeviceCreate | WebPushDeviceCreate, Field(discriminator="platform")
]


class QuietHoursBody(RequestBody):
    """Every day from `start` to `end` on the wall clock of `time_zone`; an `end` before `start`
    ends the next day (22:00 to 07:00). `start` and `end` must differ."""

    start: ClockTime
    end: ClockTime
    time_zone: TimeZone


class PreferencesBody(RequestBody):
    """What to change; a field left out keeps its value. `push` / `email` are the levels;
    `push_enabled` / `email_enabled` and `muted_room_ids` are the older form, still taken."""

    push: Level | None = Field(
        default=None, description="all: every message; mentions: DMs and mentions; none"
    )
    email: Level | None = None
    # False: pushes name the sender and the room but never show the message's text.
    push_preview: StrictBool | None = None
    email_delay: EmailDelay | None = Field(
        default=None,
        description=(
            "Seconds e-mail waits (default 120): then one e-mail lists what is still unread; "
            "0 mails each message at once"
        ),
    )
    push_enabled: StrictBool | None = Field(
        default=None, description="Older form: false is push none; true restores the level"
    )
    email_enabled: StrictBool | None = Field(
        default=None, description="Older form: false is email none; true restores the level"
    )
    muted_room_ids: list[uuid.UUID] | None = Field(
        default=None,
        max_length=MAX_RECIPIENTS,
        description="Older form: replaces the set of rooms muted with no end",
    )
    quiet_hours: QuietHoursBody | None = Field(
        default=None,
        description=(
            "Daily quiet hours: pushes wait until they end, then come as one summary per room; "
            "null removes them (left out: unchanged)"
        ),
    )
    # `None` is what the field left out reads as; the schema does not offer null.
    breakthrough_user_ids: (
        Annotated[list[uuid.UUID], Field(max_length=MAX_BREAKTHROUGH_USERS)] | SkipJsonSchema[None]
    ) = Field(
        default=None,
        description=(
            "Replaces the users whose direct messages push at once, even in quiet hours or Do "
            "Not Disturb: other users that exist ([] for none)"
        ),
    )

    @model_validator(mode="after")
    def _no_null_list(self) -> PreferencesBody:
        if "breakthrough_user_ids" in self.model_fields_set and self.breakthrough_user_ids is None:
            raise ValueError("breakthrough_user_ids cannot be null ([] for none)")
        return self

    def quiet_hours_change(self) -> QuietHours | Literal[Keep.KEEP] | None:
        """The quiet hours asked for: KEEP when left out, None when null."""
        if "quiet_hours" not in self.model_fields_set:
            return KEEP
        if self.quiet_hours is None:
            return None
        return QuietHours(
            start=self.quiet_hours.start,
            end=self.quiet_hours.end,
            time_zone=self.quiet_hours.time_zone,
        )


class SnoozeBody(RequestBody):
    until: UtcInstant | None = Field(
        description=(
            f"Do Not Disturb until then, at most {MAX_SNOOZE.days} days ahead; null (or a time "
            "passed) ends it"
        )
    )


class RoomNotificationsBody(RequestBody):
    """Your settings for one room, all replaced: `default` follows your preferences."""

    push: RoomLevel
    email: RoomLevel
    muted_until: UtcInstant | None = Field(
        description="Silent until then (a personal mention still notifies); null: not muted"
    )


class GroupRoomCreate(RequestBody):
    """A group room: a name, and any members."""

    kind: Literal[RoomKind.GROUP] = RoomKind.GROUP
    name: DisplayText
    member_ids: list[uuid.UUID] = Field(default_factory=list, max_length=MAX_RECIPIENTS)


class DirectRoomCreate(RequestBody):
    """The direct room with one other user: no name, `member_ids` holding that user only."""

    kind: Literal[RoomKind.DIRECT]
    name: None = None
    member_ids: list[uuid.UUID] = Field(min_length=1, max_length=1)


def _room_kind(body: object) -> str | None:
    """Which of the two shapes a body is: `kind`, group when left out."""
    if isinstance(body, dict):
        kind = body.get("kind", RoomKind.GROUP.value)
    else:
        kind = getattr(body, "kind", None)
    return kind.value if isinstance(kind, RoomKind) else kind if isinstance(kind, str) else None


RoomCreate = Annotated[
    Annotated[GroupRoomCreate, Tag(RoomKind.GROUP.value)]
    | Annotated[DirectRoomCreate, Tag(RoomKind.DIRECT.value)],
    Discriminator(
        _room_kind,
        custom_error_type="room_kind",
        custom_error_message="kind must be group (the default) or direct",
    ),
]


class MemberAdd(RequestBody):
    user_id: uuid.UUID


class MessageCreate(RequestBody):
    content: MessageText


class MessageEdit(RequestBody):
    content: MessageText = Field(description="The new text, under the same rules as a post's")


# --- responses ----------------------------------------------------------------------------------


_TOKEN_DESCRIPTION = "The session's bearer token. Shown once: only its hash is stored."  # noqa: S105


class Registered(BaseModel):
    id: uuid.UUID
    username: str
    display_name: str
    token: str = Field(description=_TOKEN_DESCRIPTION)
    session_id: uuid.UUID
    expires_at: datetime = Field(description="Unless used before: each use extends it")


class SessionStarted(BaseModel):
    id: uuid.UUID
    user_id: uuid.UUID
    token: str = Field(description=_TOKEN_DESCRIPTION)
    expires_at: datetime = Field(description="Unless used before: each use extends it")

    @classmethod
    def of(cls, auth_session: AuthSession, token: str) -> SessionStarted:
        return cls(
            id=auth_session.id,
            user_id=auth_session.user_id,
            token=token,
            expires_at=auth_session.expires_at,
        )


class SessionOut(BaseModel):
    id: uuid.UUID
    name: str | None
    created_at: datetime
    last_used_at: datetime = Field(description="To the minute")
    expires_at: datetime
    current: bool = Field(description="The session of this request")

    @classmethod
    def of(cls, auth_session: AuthSession, *, current_id: uuid.UUID) -> SessionOut:
        return cls(
            id=auth_session.id,
            name=auth_session.name,
            created_at=auth_session.created_at,
            last_used_at=auth_session.last_used_at,
            expires_at=auth_session.expires_at,
            current=auth_session.id == current_id,
        )


class UserOut(BaseModel):
    id: uuid.UUID
    username: str
    display_name: str
    email: str
    # Whether the address was confirmed through the link sent to it: only then is it e-mailed.
    email_verified: bool = False
    created_at: datetime

    @classmethod
    def of(cls, user: User) -> UserOut:
        return cls(
            id=user.id,
            username=user.username,
            display_name=user.display_name,
            email=user.email,
            email_verified=user.email_verified_at is not None,
            created_at=user.created_at,
        )


class DeviceOut(BaseModel):
    id: uuid.UUID
    platform: Platform
    created_at: datetime
    session_id: uuid.UUID | None = Field(
        description="The session it was registered under: signing it out removes the device"
    )

    @classmethod
    def of(cls, device: Device) -> DeviceOut:
        return cls(
            id=device.id,
            platform=Platform(device.platform),
            created_at=device.created_at,
            session_id=device.session_id,
        )


class QuietHoursOut(BaseModel):
    """Every day from `start` to `end` ("HH:MM") on the wall clock of `time_zone`; an `end`
    before `start` ends the next day."""

    start: str
    end: str
    time_zone: str


class PreferencesOut(BaseModel):
    push: Level
    email: Level
    push_preview: bool
    email_delay: int = Field(description="Seconds e-mail waits, gathering one digest")
    push_enabled: bool = Field(description="Older form: push is not none")
    email_enabled: bool = Field(description="Older form: email is not none")
    muted_room_ids: list[uuid.UUID] = Field(description="The rooms muted with no end")
    quiet_hours: QuietHoursOut | None = Field(description="Daily quiet hours; null: none")
    snoozed_until: datetime | None = Field(description="Do Not Disturb until then; null: off")
    breakthrough_user_ids: list[uuid.UUID] = Field(
        description="Whose direct messages push at once, even in quiet hours or Do Not Disturb"
    )

    @classmethod
    def of(cls, view: PreferencesView) -> PreferencesOut:
        quiet = view.quiet_hours
        return cls(
            push=view.push,
            email=view.email,
            push_preview=view.push_preview,
            email_delay=view.email_delay,
            push_enabled=view.push is not Level.NONE,
            email_enabled=view.email is not Level.NONE,
            muted_room_ids=view.muted_room_ids,
            quiet_hours=None
            if quiet is None
            else QuietHoursOut(start=quiet.start, end=quiet.end, time_zone=quiet.time_zone),
            snoozed_until=view.snoozed_until,
            breakthrough_user_ids=view.breakthrough_user_ids,
        )


class RoomSummary(BaseModel):
    id: uuid.UUID
    kind: RoomKind
    name: str
    unread: int = Field(
        description="Messages of others after your read marker (after you joined, without one)."
    )


class InvitationOut(BaseModel):
    room_id: uuid.UUID
    name: str
    invited_by: uuid.UUID | None
    invited_at: datetime


class MyRoomsOut(BaseModel):
    rooms: list[RoomSummary]
    invitations: list[InvitationOut]

    @classmethod
    def of(cls, mine: MyRooms) -> MyRoomsOut:
        return cls(
            rooms=[
                RoomSummary(
                    id=room.id,
                    kind=RoomKind(room.kind),
                    name=room.name,
                    unread=mine.unread.get(room.id, 0),
                )
                for room in mine.rooms
            ],
            invitations=[
                InvitationOut(
                    room_id=invitation.room.id,
                    name=invitation.room.name,
                    invited_by=invitation.invited_by,
                    invited_at=invitation.invited_at,
                )
                for invitation in mine.invitations
            ],
        )


class BlockedOut(BaseModel):
    user_ids: list[uuid.UUID]


class RoomNotificationsOut(BaseModel):
    room_id: uuid.UUID
    push: RoomLevel
    email: RoomLevel
    muted_until: datetime | None

    @classmethod
    def of(cls, view: RoomNotificationsView) -> RoomNotificationsOut:
        return cls(
            room_id=view.room_id,
            push="default" if view.push is None else view.push.value,
            email="default" if view.email is None else view.email.value,
            muted_until=view.muted_until,
        )


class RoomOut(BaseModel):
    id: uuid.UUID
    kind: RoomKind
    name: str = Field(description="Empty for a direct room")
    member_ids: list[uuid.UUID]
    created_at: datetime

    @classmethod
    def of(cls, view: RoomView) -> RoomOut:
        return cls(
            id=view.room.id,
            kind=RoomKind(view.room.kind),
            name=view.room.name,
            member_ids=view.member_ids,
            created_at=view.room.created_at,
        )


class MessageOut(BaseModel):
    id: uuid.UUID
    room_id: uuid.UUID
    sender_id: uuid.UUID
    content: str
    created_at: datetime
    edited_at: datetime | None = Field(
        description="When its author last changed its text; null: never"
    )

    @classmethod
    def of(cls, message: Message) -> MessageOut:
        return cls(
            id=message.id,
            room_id=message.room_id,
            sender_id=message.sender_id,
            content=message.content,
            created_at=message.created_at,
            edited_at=message.edited_at,
        )


class MessagePageOut(BaseModel):
    items: list[MessageOut]
    next_cursor: str | None = Field(
        description="Pass as `before` to get the next (older) page; null when there is none."
    )


class PresenceBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    active_room_id: uuid.UUID | None = Field(
        description="The room your client shows now; null: none."
    )


class ReadBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    up_to: uuid.UUID = Field(description="The last message of the room you have read.")


class ReadOut(BaseModel):
    room_id: uuid.UUID
    up_to: uuid.UUID | None = Field(description="Your read marker now: it only moves forward.")
    unread: int

    @classmethod
    def of(cls, marker: ReadMarker) -> ReadOut:
        return cls(room_id=marker.room_id, up_to=marker.message_id, unread=marker.unread)


class InboxDeliveryOut(BaseModel):
    """What became of one channel (per push device once devices were picked) of a
    notification."""

    channel: Channel
    device_id: uuid.UUID | None = Field(
        description="The push device; null for the e-mail, or for a channel decided as a whole."
    )
    state: InboxState
    reason: str | None = Field(
        description=(
            "Why, as a code: `level:mentions`, `level:none`, `muted`, `active_in_room`, "
            "`online`, `read`, `no_device`, `no_email`, `deleted`, `left`, `quiet_hours`, "
            "`digest:<window id>`, `provider:<error>`; null for a plain `sent` or `pending`."
        )
    )
    decided_at: datetime
    due_at: datetime | None = Field(description="For what waits: when its wait ends.")
    accepted_at: datetime | None = Field(description="When the provider accepted it.")
    recalled_at: datetime | None = Field(description="When it was taken off the device.")


class InboxSenderOut(BaseModel):
    id: uuid.UUID
    username: str
    display_name: str


class InboxItemOut(BaseModel):
    """One message (or invitation) that concerned you, and what Herald did about it."""

    message_id: uuid.UUID
    room_id: uuid.UUID
    room_name: str | None = Field(description="Null for a direct room.")
    sender: InboxSenderOut | None = Field(description="Null for an invitation.")
    preview: str | None = Field(
        description=(
            f"The message's first {INBOX_PREVIEW_CHARS} characters; null when your "
            "`push_preview` is off, for an invitation, and once you are no longer a member of "
            "the room."
        )
    )
    trigger: Trigger
    read: bool = Field(description="Whether you have read the room past it.")
    created_at: datetime = Field(description="When the message was posted.")
    decided_at: datetime
    deliveries: list[InboxDeliveryOut]

    @classmethod
    def of(cls, row: InboxRow) -> InboxItemOut:
        sender = None
        if row.sender_id is not None and row.sender_username is not None:
            sender = InboxSenderOut(
                id=row.sender_id,
                username=row.sender_username,
                display_name=row.sender_display_name or row.sender_username,
            )
        return cls(
            message_id=row.message_id,
            room_id=row.room_id,
            room_name=row.room_name or None,
            sender=sender,
            preview=None if row.content is None else row.content[:INBOX_PREVIEW_CHARS],
            trigger=Trigger(row.trigger),
            read=row.read,
            created_at=row.message_created_at,
            decided_at=row.decided_at,
            deliveries=[
                InboxDeliveryOut.model_validate(delivery) for delivery in json.loads(row.deliveries)
            ],
        )


class InboxPageOut(BaseModel):
    items: list[InboxItemOut]
    next_cursor: str | None = Field(
        description="Pass as `cursor` to get the next (older) page; null when there is none."
    )


class NotificationIdsRead(RequestBody):
    ids: list[uuid.UUID] = Field(
        min_length=1, max_length=MAX_PAGE_SIZE, description="Message ids of your inbox."
    )


class AllNotificationsRead(RequestBody):
    all: Literal[True] = Field(description="Everything in every room.")


# Exactly one of the two: unknown fields are refused, so `{}` or both at once fit neither.
NotificationsReadBody = NotificationIdsRead | AllNotificationsRead


class NotificationsReadOut(BaseModel):
    rooms: list[ReadOut] = Field(
        description="The rooms whose read marker moved, and their unread count now."
    )
