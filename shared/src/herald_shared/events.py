"""Every event that travels on the `notifications` exchange, as one discriminated family.

Consumers parse at the boundary with `parse_event` (or the model's own validator) and never see a
dict. Models are frozen, ignore unknown fields (so an additive change never breaks an older
consumer) and hide input values from validation errors (so no e-mail address or message text
reaches a log line through an exception).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, TypeAdapter

SCHEMA_VERSION = 1

# Fixed namespace for deterministic notification ids: never change it, ids are idempotency keys.
NOTIFICATION_NAMESPACE = uuid.UUID("6f1c3a52-2f4e-4d1b-9a57-0b4c4f1e8d21")

MAX_MESSAGE_CONTENT = 4000
MAX_RECIPIENTS = 1000


def utc_now() -> datetime:
    return datetime.now(UTC)


class Channel(StrEnum):
    PUSH = "push"
    EMAIL = "email"


class Platform(StrEnum):
    """Which push provider serves a device."""

    FCM = "fcm"  # Android (and any FCM client): the token is an FCM registration token
    APNS = "apns"  # iOS: the token is the APNs device token (hex)
    WEB_PUSH = "webpush"  # a browser: the token is the subscription's endpoint URL


class DeliveryOutcome(StrEnum):
    DELIVERED = "delivered"
    FAILED = "failed"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", hide_input_in_errors=True)


class Event(_Frozen):
    """The envelope every event shares."""

    event_id: uuid.UUID = Field(default_factory=uuid.uuid4)
    occurred_at: AwareDatetime = Field(default_factory=utc_now)
    schema_version: int = SCHEMA_VERSION


class SenderInfo(_Frozen):
    user_id: uuid.UUID
    username: str
    display_name: str
    profile_picture_url: str | None = None


class MessageCreated(Event):
    """A chat message was stored; its recipients may need to be told (`notification.message.new`).

    The specification's message format, plus `mentions` and `room_name`. The retry count is not
    part of the payload: it travels in a header.
    """

    type: Literal["new_message"] = "new_message"
    message_id: uuid.UUID
    room_id: uuid.UUID
    room_name: str = ""
    sender_id: uuid.UUID
    recipient_ids: list[uuid.UUID] = Field(max_length=MAX_RECIPIENTS)
    message_content: str = Field(max_length=MAX_MESSAGE_CONTENT)
    sender_info: SenderInfo
    mentions: list[uuid.UUID] = Field(default_factory=list)
    timestamp: AwareDatetime


class WebPushKeys(_Frozen):
    """A Web Push subscription's keys (RFC 8291), base64url without padding as browsers give
    them: the user agent's P-256 public key and the shared authentication secret."""

    p256dh: str = Field(min_length=1, max_length=200)
    auth: str = Field(min_length=1, max_length=100)


class DeviceSnapshot(_Frozen):
    device_id: uuid.UUID
    platform: Platform
    token: str
    # When the client last registered (or refreshed) this token: APNs' 410 rule compares it with
    # the time Apple says the token became invalid.
    token_updated_at: AwareDatetime | None = None
    web_push_keys: WebPushKeys | None = None  # platform webpush only


class PreferencesSnapshot(_Frozen):
    push_enabled: bool = True
    email_enabled: bool = True
    # False: pushes say who wrote where ("New message from Alice in #room"), never the text.
    push_preview: bool = True
    muted_room_ids: list[uuid.UUID] = Field(default_factory=list)


class UserUpdated(Event):
    """Full snapshot of what routing needs about a user (`user.updated`).

    `version` grows with every change, so a consumer keeps the highest version it has seen and
    replays or out-of-order deliveries converge on the same state.
    """

    type: Literal["user_updated"] = "user_updated"
    user_id: uuid.UUID
    version: int = Field(ge=1)
    username: str
    display_name: str
    email: str | None
    devices: list[DeviceSnapshot] = Field(default_factory=list)
    preferences: PreferencesSnapshot = Field(default_factory=PreferencesSnapshot)
    time_zone: str = "UTC"


class PushRequested(Event):
    """Deliver one push notification to one device (`notification.push.send`)."""

    type: Literal["push_requested"] = "push_requested"
    notification_id: uuid.UUID
    message_id: uuid.UUID
    room_id: uuid.UUID
    recipient_id: uuid.UUID
    device_id: uuid.UUID
    platform: Platform
    token: str
    token_updated_at: AwareDatetime | None = None
    web_push_keys: WebPushKeys | None = None  # platform webpush only
    title: str
    body: str


class EmailRequested(Event):
    """Deliver one e-mail notification (`notification.email.send`); the sender renders it."""

    type: Literal["email_requested"] = "email_requested"
    notification_id: uuid.UUID
    message_id: uuid.UUID
    room_id: uuid.UUID
    room_name: str
    recipient_id: uuid.UUID
    to_address: str
    to_name: str
    sender_display_name: str
    message_content: str
    sent_at: AwareDatetime


class DeliveryReported(Event):
    """What the provider said about one notification (`notification.<channel>.<outcome>`)."""

    type: Literal["delivery_reported"] = "delivery_reported"
    notification_id: uuid.UUID
    message_id: uuid.UUID
    recipient_id: uuid.UUID
    channel: Channel
    outcome: DeliveryOutcome
    reason: str | None = None


class DeviceInvalidated(Event):
    """The provider says a push token is dead; message-service removes the device
    (`device.invalidated`)."""

    type: Literal["device_invalidated"] = "device_invalidated"
    user_id: uuid.UUID
    device_id: uuid.UUID
    reason: str


AnyEvent = Annotated[
    MessageCreated
    | UserUpdated
    | PushRequested
    | EmailRequested
    | DeliveryReported
    | DeviceInvalidated,
    Field(discriminator="type"),
]

EVENT_ADAPTER: TypeAdapter[AnyEvent] = TypeAdapter(AnyEvent)

EVENT_MODELS: tuple[type[Event], ...] = (
    MessageCreated,
    UserUpdated,
    PushRequested,
    EmailRequested,
    DeliveryReported,
    DeviceInvalidated,
)


def notification_id_for(
    *, message_id: uuid.UUID, recipient_id: uuid.UUID, channel: Channel, target: str = ""
) -> uuid.UUID:
    """The idempotency key of one notification, identical however often it is computed.

    `target` distinguishes several deliveries on one channel (one push per device).
    """
    return uuid.uuid5(NOTIFICATION_NAMESPACE, f"{message_id}:{recipient_id}:{channel}:{target}")
