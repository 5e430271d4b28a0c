"""Every event that travels on the `notifications` exchange, as one discriminated family.

Consumers parse at the boundary with `parse_event` (or the model's own validator) and never see a
dict. Models are frozen, ignore unknown fields (so an additive change never breaks an older
consumer) and hide input values from validation errors (so no e-mail address or message text
reaches a log line through an exception).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, TypeAdapter, model_validator

SCHEMA_VERSION = 1

# Fixed namespace for deterministic notification ids: never change it, ids are idempotency keys.
NOTIFICATION_NAMESPACE = uuid.UUID("6f1c3a52-2f4e-4d1b-9a57-0b4c4f1e8d21")
# Fixed namespace of batch report ids (`batch_report`).
BATCH_REPORT_NAMESPACE = uuid.UUID("a9e7a1c5-9684-4797-88b9-d99cbfa08c65")

MAX_MESSAGE_CONTENT = 4000
MAX_RECIPIENTS = 1000
# Jobs (or reports) in one batch event: a room of 1,000 members makes ten push batches, each a
# few hundred kB, and a batch that has to wait for a retry holds back at most this many.
MAX_BATCH_SIZE = 100


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


class _Batch(Event):
    """Many jobs or reports of one message and channel in one broker message.

    What the router and the senders exchange at volume: one broker message (a consume, a
    publish, a confirm) and one ledger statement per batch instead of per notification. Each item
    keeps its own ids, so an item of a batch is handled exactly as it would be on its own; a batch
    is retried or dead-lettered as a whole, and the items it had already finished are no-ops then.
    """

    message_id: uuid.UUID

    def _check_items(
        self, items: Sequence[PushRequested | EmailRequested | DeliveryReported]
    ) -> None:
        if any(item.message_id != self.message_id for item in items):
            raise ValueError("every item of a batch belongs to the batch's message")
        ids = [item.notification_id for item in items]
        if len(set(ids)) != len(ids):
            raise ValueError("a notification appears twice in one batch")


class PushBatchRequested(_Batch):
    """Deliver the push notifications of one message to the devices of one platform
    (`notification.push.send`): the router's job at volume; `PushRequested` stays accepted."""

    type: Literal["push_batch_requested"] = "push_batch_requested"
    platform: Platform
    jobs: list[PushRequested] = Field(min_length=1, max_length=MAX_BATCH_SIZE)

    @model_validator(mode="after")
    def _consistent(self) -> PushBatchRequested:
        self._check_items(self.jobs)
        if any(job.platform is not self.platform for job in self.jobs):
            raise ValueError("every job of a push batch is for the batch's platform")
        return self


class EmailBatchRequested(_Batch):
    """Deliver the e-mail notifications of one message (`notification.email.send`): the
    router's job at volume; `EmailRequested` stays accepted."""

    type: Literal["email_batch_requested"] = "email_batch_requested"
    jobs: list[EmailRequested] = Field(min_length=1, max_length=MAX_BATCH_SIZE)

    @model_validator(mode="after")
    def _consistent(self) -> EmailBatchRequested:
        self._check_items(self.jobs)
        return self


class DeliveryBatchReported(_Batch):
    """One outcome of many notifications of one message on one channel
    (`notification.<channel>.<outcome>`): the senders' report at volume; `DeliveryReported`
    stays accepted."""

    type: Literal["delivery_batch_reported"] = "delivery_batch_reported"
    channel: Channel
    outcome: DeliveryOutcome
    reports: list[DeliveryReported] = Field(min_length=1, max_length=MAX_BATCH_SIZE)

    @model_validator(mode="after")
    def _consistent(self) -> DeliveryBatchReported:
        self._check_items(self.reports)
        if any(
            report.channel is not self.channel or report.outcome is not self.outcome
            for report in self.reports
        ):
            raise ValueError("every report of a batch has the batch's channel and outcome")
        return self


def batch_report(reports: Sequence[DeliveryReported]) -> DeliveryBatchReported:
    """`reports` (of one message and channel, with one outcome) as one event. Its id derives
    from the outcome and the notifications, so the same reports published again (after a crash
    between publishing and recording it) carry the same id."""
    first = reports[0]
    notifications = ",".join(sorted(str(report.notification_id) for report in reports))
    return DeliveryBatchReported(
        event_id=uuid.uuid5(
            BATCH_REPORT_NAMESPACE, f"{first.channel}:{first.outcome}:{notifications}"
        ),
        message_id=first.message_id,
        channel=first.channel,
        outcome=first.outcome,
        reports=list(reports),
    )


def batch_reports(reports: Iterable[DeliveryReported]) -> list[DeliveryBatchReported]:
    """The reports of one message and channel as one event per outcome present (delivered
    first)."""
    by_outcome: dict[DeliveryOutcome, list[DeliveryReported]] = {}
    for report in reports:
        by_outcome.setdefault(report.outcome, []).append(report)
    return [
        batch_report(by_outcome[outcome]) for outcome in DeliveryOutcome if outcome in by_outcome
    ]


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
    | DeviceInvalidated
    | PushBatchRequested
    | EmailBatchRequested
    | DeliveryBatchReported,
    Field(discriminator="type"),
]

# What each sender's queue and the router's report queue carry: the batch, or (from a router of
# an earlier version, or replayed from a dead-letter queue) a single job or report.
AnyPushJob = Annotated[PushRequested | PushBatchRequested, Field(discriminator="type")]
AnyEmailJob = Annotated[EmailRequested | EmailBatchRequested, Field(discriminator="type")]
AnyDeliveryReport = Annotated[DeliveryReported | DeliveryBatchReported, Field(discriminator="type")]

EVENT_ADAPTER: TypeAdapter[AnyEvent] = TypeAdapter(AnyEvent)

EVENT_MODELS: tuple[type[Event], ...] = (
    MessageCreated,
    UserUpdated,
    PushRequested,
    EmailRequested,
    DeliveryReported,
    DeviceInvalidated,
    PushBatchRequested,
    EmailBatchRequested,
    DeliveryBatchReported,
)


def notification_id_for(
    *, message_id: uuid.UUID, recipient_id: uuid.UUID, channel: Channel, target: str = ""
) -> uuid.UUID:
    """The idempotency key of one notification, identical however often it is computed.

    `target` distinguishes several deliveries on one channel (one push per device).
    """
    return uuid.uuid5(NOTIFICATION_NAMESPACE, f"{message_id}:{recipient_id}:{channel}:{target}")
