"""Every event that travels on the `notifications` exchange, as one discriminated family.

Consumers parse at the boundary with `parse_event` (or the model's own validator) and never see a
dict. Models are frozen, ignore unknown fields (so an additive change never breaks an older
consumer) and hide input values from validation errors (so no e-mail address or message text
reaches a log line through an exception).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Literal, TypeVar

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, TypeAdapter, model_validator

SCHEMA_VERSION = 1

T = TypeVar("T")

# Fixed namespace for deterministic notification ids: never change it, ids are idempotency keys.
NOTIFICATION_NAMESPACE = uuid.UUID("6f1c3a52-2f4e-4d1b-9a57-0b4c4f1e8d21")
# Fixed namespace of report event ids (`reports_events`).
BATCH_REPORT_NAMESPACE = uuid.UUID("a9e7a1c5-9684-4797-88b9-d99cbfa08c65")

MAX_MESSAGE_CONTENT = 4000
MAX_RECIPIENTS = 1000
# Jobs (or reports) in one `_Batch` event (one message's; no longer published, still accepted).
MAX_BATCH_SIZE = 100
# Jobs (or reports) in one event of the kinds that span messages: a few hundred kB at most, and a
# delivery that has to wait for a retry holds back at most this many.
MAX_ITEMS_PER_EVENT = 500
# The messages one digest e-mail lists; those past it are counted (`EmailRequested.omitted`).
MAX_DIGEST_ENTRIES = 50
# What a user may choose to wait before an e-mail (`PreferencesSnapshot.email_delay`), seconds.
EMAIL_DELAYS = (0, 120, 900, 3600)
# What one recall names (`PushRecall`): with its overhead it fits every push provider's payload
# (4 kB and less), where each id costs ~40 bytes.
MAX_RECALLED_ROOMS = 50
MAX_RECALLED_NOTIFICATIONS = 30


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


class RoomKind(StrEnum):
    GROUP = "group"  # named, any number of members
    DIRECT = "direct"  # the one unnamed room of two users: their direct messages


class Trigger(StrEnum):
    """Why a recipient hears of a message, strongest first: the router decides it once per
    recipient and message, records it in its ledger and puts it on every job."""

    DIRECT = "dm"  # a direct message
    INVITATION = "invitation"  # someone invited the recipient to a room (not a message)
    MENTION = "mention"  # the message names the recipient (`@username`)
    ROOM_MENTION = "room_mention"  # the message names the whole room (`@room`, `@all`)
    MESSAGE = "message"  # anything else said in a room the recipient is in

    @property
    def urgent(self) -> bool:
        """Meant for this one person: pushed at once and with a sound; the rest may wait for the
        device's next wake-up and arrives silently."""
        return self in (Trigger.DIRECT, Trigger.INVITATION, Trigger.MENTION)


class Level(StrEnum):
    """How much a user wants of one channel."""

    ALL = "all"  # every message
    MENTIONS = "mentions"  # only direct messages and messages that name them or their room
    NONE = "none"  # nothing


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
    room_name: str = ""  # empty for a direct room
    room_kind: RoomKind = RoomKind.GROUP
    sender_id: uuid.UUID
    recipient_ids: list[uuid.UUID] = Field(max_length=MAX_RECIPIENTS)
    message_content: str = Field(max_length=MAX_MESSAGE_CONTENT)
    sender_info: SenderInfo
    mentions: list[uuid.UUID] = Field(default_factory=list)
    # `@room` or `@all` in the content: the message names every member.
    room_mentioned: bool = False
    timestamp: AwareDatetime


class InvitationCreated(Event):
    """Someone invited a user to a group room (`room.invitation.created`): the one notification
    the invitee gets from that room until they join. The router handles it like a message to one
    recipient, keyed by `invitation_id` where a message's id would be."""

    type: Literal["invitation_created"] = "invitation_created"
    invitation_id: uuid.UUID
    room_id: uuid.UUID
    room_name: str
    invitee_id: uuid.UUID
    inviter: SenderInfo
    timestamp: AwareDatetime

    @property
    def message_id(self) -> uuid.UUID:
        """What the ledger, the jobs and the delivery reports key this notification on."""
        return self.invitation_id


# What the router's message queue carries: what may notify someone.
Notifiable = MessageCreated | InvitationCreated
AnyNotifiable = Annotated[Notifiable, Field(discriminator="type")]


class MessageEdited(Event):
    """Its author changed a message's text (`message.updated`). What still waits to tell of it
    tells the new text; what was sent stays sent."""

    type: Literal["message_edited"] = "message_edited"
    message_id: uuid.UUID
    room_id: uuid.UUID
    sender_id: uuid.UUID
    message_content: str = Field(max_length=MAX_MESSAGE_CONTENT)
    edited_at: AwareDatetime


class MessageDeleted(Event):
    """Its author deleted a message (`message.deleted`): what still waits to tell of it is
    cancelled."""

    type: Literal["message_deleted"] = "message_deleted"
    message_id: uuid.UUID
    room_id: uuid.UUID
    sender_id: uuid.UUID
    deleted_at: AwareDatetime


# What the router's message-changes queue carries.
MessageChanged = MessageEdited | MessageDeleted
AnyMessageChange = Annotated[MessageChanged, Field(discriminator="type")]


class RoomRead(Event):
    """A user read a room up to a message (`room.read`), on some device: a marker that only moves
    forward (message-service ignores an older one). Whatever of the room was created up to
    `up_to` no longer needs telling them."""

    type: Literal["room_read"] = "room_read"
    user_id: uuid.UUID
    room_id: uuid.UUID
    message_id: uuid.UUID  # the last message read
    up_to: AwareDatetime  # its creation time


class RoomLeft(Event):
    """A user left a group room, or declined its invitation (`room.left`): nothing of the room
    up to `left_at` needs telling them any more (what waits is cancelled, what their devices
    show is recalled), and nothing after reaches them (they are no longer a recipient)."""

    type: Literal["room_left"] = "room_left"
    user_id: uuid.UUID
    room_id: uuid.UUID
    left_at: AwareDatetime


# What the router's read-markers queue carries: how far a user is done with a room.
RoomMarker = RoomRead | RoomLeft
AnyRoomMarker = Annotated[RoomMarker, Field(discriminator="type")]


class ConnectionPresence(_Frozen):
    """One real-time stream of a user: open until `expires_at` unless renewed; a stream that
    ended carries its end. `at`: when this was said (an older word on the same stream is
    ignored)."""

    user_id: uuid.UUID
    connection_id: uuid.UUID
    expires_at: AwareDatetime
    at: AwareDatetime


class RoomInView(_Frozen):
    """The room the user's client shows (None: none), as of `at`."""

    user_id: uuid.UUID
    room_id: uuid.UUID | None
    at: AwareDatetime


class PresenceChanged(Event):
    """Who has a real-time stream open and which room they look at (`presence.changed`), from
    message-service's streams: a stream opening or ending, a room coming into view, and every
    heartbeat renewing a replica's open streams. Published directly, not through the outbox: a
    lost update is repeated by the next heartbeat, and a stale one expires."""

    type: Literal["presence_changed"] = "presence_changed"
    connections: list[ConnectionPresence] = Field(
        default_factory=list, max_length=MAX_ITEMS_PER_EVENT
    )
    rooms: list[RoomInView] = Field(default_factory=list, max_length=MAX_ITEMS_PER_EVENT)

    @model_validator(mode="after")
    def _says_something(self) -> PresenceChanged:
        if not self.connections and not self.rooms:
            raise ValueError("a presence change names a stream or a room")
        return self


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


class RoomSettingsSnapshot(_Frozen):
    """A user's own settings for one room: levels that replace their defaults there (None: the
    default), and a mute that lasts until `muted_until` (None: not muted)."""

    room_id: uuid.UUID
    push: Level | None = None
    email: Level | None = None
    muted_until: AwareDatetime | None = None


class QuietHoursSnapshot(_Frozen):
    """Daily quiet hours, on the wall clock of `time_zone` (an IANA name): pushes due between
    `start` and `end` ("HH:MM"; an `end` before `start` ends the next day) wait until `end`."""

    start: str = Field(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$")
    end: str = Field(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$")
    time_zone: str = Field(min_length=1, max_length=64)


class PreferencesSnapshot(_Frozen):
    """`push` and `email` are the levels; a snapshot from before levels existed has only the
    booleans (`all` when on, `none` when off) and `muted_room_ids` (muted with no end), which
    newer snapshots still fill for older consumers."""

    push_enabled: bool = True
    email_enabled: bool = True
    # False: pushes say who wrote where ("New message from Alice in #room"), never the text.
    push_preview: bool = True
    muted_room_ids: list[uuid.UUID] = Field(default_factory=list)
    push: Level | None = None
    email: Level | None = None
    rooms: list[RoomSettingsSnapshot] = Field(default_factory=list)
    # Seconds the user's e-mail waits, gathering one digest (`EMAIL_DELAYS`). 0 in snapshots
    # from before delays existed: their e-mail went out at once.
    email_delay: int = Field(default=0, ge=0, le=max(EMAIL_DELAYS))
    # Pushes wait during quiet hours and until `snoozed_until` (Do Not Disturb), then come as
    # one summary per room; a direct message from one of `breakthrough_user_ids` never waits.
    quiet_hours: QuietHoursSnapshot | None = None
    snoozed_until: AwareDatetime | None = None
    breakthrough_user_ids: list[uuid.UUID] = Field(default_factory=list, max_length=MAX_RECIPIENTS)

    @property
    def push_level(self) -> Level:
        if self.push is not None:
            return self.push
        return Level.ALL if self.push_enabled else Level.NONE

    @property
    def email_level(self) -> Level:
        if self.email is not None:
            return self.email
        return Level.ALL if self.email_enabled else Level.NONE


class UserUpdated(Event):
    """Full snapshot of what routing needs about a user (`user.updated`).

    `version` grows with every change, so a consumer keeps the highest version it has seen and
    replays or out-of-order deliveries converge on the same state.

    `deleted`: the account was deleted. The snapshot then holds nothing personal (a placeholder
    name, no address, no device), and a consumer forgets what else it kept of the user.
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
    # Whether the user confirmed `email` through the link sent to it; no notification e-mail
    # goes to an address that is not. True by default: snapshots of producers from before
    # verification existed are of addresses they mailed anyway.
    email_verified: bool = True
    deleted: bool = False


class PushRecall(_Frozen):
    """What a recall takes off one device's screen, because it was read (or deleted) elsewhere:
    the notifications of these rooms (Android keeps one per room, under the room's tag; iOS
    groups a room's as one thread) and, where a device keeps them one by one (iOS, browsers),
    these notifications by id (the newest, when there are more)."""

    room_ids: list[uuid.UUID] = Field(min_length=1, max_length=MAX_RECALLED_ROOMS)
    notification_ids: list[uuid.UUID] = Field(
        default_factory=list, max_length=MAX_RECALLED_NOTIFICATIONS
    )


class PushRequested(Event):
    """Deliver one push notification to one device (`notification.push.send`), or, with
    `recall`, take earlier ones off it (title and body are then empty)."""

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
    trigger: Trigger = Trigger.MESSAGE
    # The recipient's unread messages, all rooms together, as the router counted them: the
    # app's badge. None from a router that did not count them.
    badge: int | None = Field(default=None, ge=0)
    # Those of this push's room: Android shows the number on the room's notification. None
    # where it is not counted (a summary, a recall).
    room_unread: int | None = Field(default=None, ge=0)
    recall: PushRecall | None = None

    @property
    def urgent(self) -> bool:
        """Its lane: DMs and personal mentions, and recalls (a stale notification on screen is
        wrong now), go ahead of the rest."""
        return self.recall is not None or self.trigger.urgent


class DigestEntry(_Frozen):
    """One message of a digest e-mail."""

    message_id: uuid.UUID
    room_id: uuid.UUID
    room_name: str  # empty for a direct room
    sender_display_name: str
    message_content: str = Field(max_length=MAX_MESSAGE_CONTENT)
    sent_at: AwareDatetime
    trigger: Trigger = Trigger.MESSAGE


class EmailRequested(Event):
    """Deliver one e-mail notification (`notification.email.send`); the sender renders it.

    A digest (what waited for the user's `email_delay`) lists its messages in `digest`, oldest
    first, and counts in `omitted` those past `MAX_DIGEST_ENTRIES`; its top-level message fields
    are those of its first entry."""

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
    trigger: Trigger = Trigger.MESSAGE
    digest: list[DigestEntry] = Field(default_factory=list, max_length=MAX_DIGEST_ENTRIES)
    omitted: int = Field(default=0, ge=0)

    @property
    def urgent(self) -> bool:
        """Its lane: DMs and personal mentions go ahead of the rest."""
        return self.trigger.urgent


class DeliveryReported(Event):
    """What the provider said about one notification (`notification.<channel>.<outcome>`)."""

    type: Literal["delivery_reported"] = "delivery_reported"
    notification_id: uuid.UUID
    message_id: uuid.UUID
    recipient_id: uuid.UUID
    channel: Channel
    outcome: DeliveryOutcome
    reason: str | None = None
    # The reported job's trigger: the router measures latency per lane with it.
    trigger: Trigger = Trigger.MESSAGE


class _Batch(Event):
    """Many jobs or reports of one message and channel in one broker message.

    What the router and the senders exchanged before the kinds that span messages (`_Jobs`);
    still accepted (from a service of that version, or replayed from a dead-letter queue). Each
    item keeps its own ids, so an item of a batch is handled exactly as it would be on its own; a
    batch is retried or dead-lettered as a whole, and the items it had already finished are
    no-ops then.
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


class _Jobs(Event):
    """Many jobs or reports of any messages in one broker message: what the router publishes
    for everything it decided in one go, and what a sender reports for everything it settled in
    one go. Like a `_Batch`, it is retried or dead-lettered as a whole, and each item keeps its
    own ids, so the items it had already finished are no-ops when it comes back."""

    @staticmethod
    def _unique(ids: Sequence[uuid.UUID]) -> None:
        if len(set(ids)) != len(ids):
            raise ValueError("a notification appears twice in one event")


# A sender holds a delivery back a little (`BATCH_LINGER`) so that the next ones share its claim;
# when the router saw no company for the message, waiting downstream would find none either.
_QUIET = (
    "The router decided these jobs for a chat message that had no other to share its batch: "
    "the pipeline is quiet, so the sender claims them at once rather than waiting for other "
    "deliveries to share the claim. A hint only: the jobs are the same either way."
)


class PushJobsRequested(_Jobs):
    """Deliver push notifications, of one or more messages, to devices of one platform
    (`notification.push.send`, or `notification.push.send.urgent` when `urgent`: jobs of DMs and
    personal mentions, and recalls, only). Supersedes `PushBatchRequested` (one message), which
    stays accepted."""

    type: Literal["push_jobs_requested"] = "push_jobs_requested"
    platform: Platform
    urgent: bool = False
    quiet: bool = Field(default=False, description=_QUIET)
    jobs: list[PushRequested] = Field(min_length=1, max_length=MAX_ITEMS_PER_EVENT)

    @model_validator(mode="after")
    def _consistent(self) -> PushJobsRequested:
        self._unique([job.notification_id for job in self.jobs])
        if any(job.platform is not self.platform for job in self.jobs):
            raise ValueError("every job is for the event's platform")
        if any(job.urgent is not self.urgent for job in self.jobs):
            raise ValueError("every job is of the event's lane")
        return self


class EmailJobsRequested(_Jobs):
    """Deliver e-mail notifications of one or more messages (`notification.email.send`, or
    `notification.email.send.urgent` when `urgent`). Supersedes `EmailBatchRequested` (one
    message), which stays accepted."""

    type: Literal["email_jobs_requested"] = "email_jobs_requested"
    urgent: bool = False
    quiet: bool = Field(default=False, description=_QUIET)
    jobs: list[EmailRequested] = Field(min_length=1, max_length=MAX_ITEMS_PER_EVENT)

    @model_validator(mode="after")
    def _consistent(self) -> EmailJobsRequested:
        self._unique([job.notification_id for job in self.jobs])
        if any(job.urgent is not self.urgent for job in self.jobs):
            raise ValueError("every job is of the event's lane")
        return self


class DeliveriesReported(_Jobs):
    """One outcome of notifications of one or more messages on one channel
    (`notification.<channel>.<outcome>`). Supersedes `DeliveryBatchReported` (one message),
    which stays accepted."""

    type: Literal["deliveries_reported"] = "deliveries_reported"
    channel: Channel
    outcome: DeliveryOutcome
    reports: list[DeliveryReported] = Field(min_length=1, max_length=MAX_ITEMS_PER_EVENT)

    @model_validator(mode="after")
    def _consistent(self) -> DeliveriesReported:
        self._unique([report.notification_id for report in self.reports])
        if any(
            report.channel is not self.channel or report.outcome is not self.outcome
            for report in self.reports
        ):
            raise ValueError("every report has the event's channel and outcome")
        return self


def chunks(items: Sequence[T], size: int = MAX_ITEMS_PER_EVENT) -> list[Sequence[T]]:
    """`items` cut into runs of at most `size`, in order."""
    return [items[start : start + size] for start in range(0, len(items), size)]


def reports_events(reports: Iterable[DeliveryReported]) -> list[DeliveriesReported]:
    """Reports as the fewest events: one per channel and outcome (delivered first), cut at
    `MAX_ITEMS_PER_EVENT`. Each event's id derives from its outcome and notifications, so the
    same reports published again (after a crash between publishing and recording that they went
    out) carry the same id."""
    grouped: dict[tuple[Channel, DeliveryOutcome], dict[uuid.UUID, DeliveryReported]] = {}
    for report in reports:
        grouped.setdefault((report.channel, report.outcome), {})[report.notification_id] = report
    events = []
    for channel in Channel:
        for outcome in DeliveryOutcome:
            by_id = grouped.get((channel, outcome))
            if not by_id:
                continue
            ordered = [by_id[key] for key in sorted(by_id)]
            for part in chunks(ordered):
                key = ",".join(str(report.notification_id) for report in part)
                events.append(
                    DeliveriesReported(
                        event_id=uuid.uuid5(BATCH_REPORT_NAMESPACE, f"{channel}:{outcome}:{key}"),
                        channel=channel,
                        outcome=outcome,
                        reports=list(part),
                    )
                )
    return events


class InboxState(StrEnum):
    """What became of one channel (or one device) of a notification, as its user sees it."""

    PENDING = "pending"  # decided, on its way to the provider
    SENT = "sent"  # the provider accepted it
    SUPPRESSED = "suppressed"  # decided against (the reason says why)
    DEFERRED = "deferred"  # waits for quiet hours or a snooze to end
    BATCHED = "batched"  # waits for the user's e-mail digest
    CANCELLED = "cancelled"  # waited, then was not sent (read, deleted, left, settings)
    RECALLED = "recalled"  # was shown, then taken off the device (read elsewhere, deleted)
    FAILED = "failed"  # the provider refused it for good


# The longest reason an inbox item carries; a longer one is cut (`provider:` and a provider's text).
INBOX_REASON_MAX = 200


class InboxDelivery(_Frozen):
    """One channel of an inbox item: per push device once the router picked devices, else (and
    for the e-mail) one for the channel as a whole (`device_id` None)."""

    channel: Channel
    device_id: uuid.UUID | None = None
    state: InboxState
    # Why, as a code: `level:mentions`, `muted`, `active_in_room`, `read`, `quiet_hours`,
    # `digest:<window id>`, `provider:<error>`, ... (None for a plain `sent` or `pending`).
    reason: str | None = Field(default=None, max_length=INBOX_REASON_MAX)
    decided_at: AwareDatetime
    due_at: AwareDatetime | None = None  # for what waits: when its window ends
    accepted_at: AwareDatetime | None = None  # when the provider accepted it
    recalled_at: AwareDatetime | None = None  # when its recall went out


class InboxItem(_Frozen):
    """Everything the router decided and saw for one user and one message (or invitation): an
    item of that user's notification inbox. No text, address or token."""

    user_id: uuid.UUID
    message_id: uuid.UUID
    room_id: uuid.UUID
    trigger: Trigger
    decided_at: AwareDatetime
    message_created_at: AwareDatetime | None = None
    deliveries: list[InboxDelivery] = Field(max_length=MAX_RECIPIENTS)


class InboxItemsUpdated(Event):
    """The router's latest view of inbox items (`notification.inbox.updated`), each whole: a
    consumer keeps, per item, the one of the highest `version` (a replay or a late event then
    changes nothing). Versions grow with every publication; one event's items share it."""

    type: Literal["inbox_items_updated"] = "inbox_items_updated"
    version: int = Field(ge=1)
    items: list[InboxItem] = Field(min_length=1, max_length=MAX_ITEMS_PER_EVENT)


class DeviceInvalidated(Event):
    """The provider says a push token is dead; message-service removes the device
    (`device.invalidated`)."""

    type: Literal["device_invalidated"] = "device_invalidated"
    user_id: uuid.UUID
    device_id: uuid.UUID
    reason: str


# The signed token of a verification link (message_service.email_verification): URL-safe only.
VERIFICATION_LINK_PATTERN = r"^[0-9a-f]{32}\.[0-9]{1,12}\.[A-Za-z0-9_-]{43}$"


class EmailVerificationRequested(Event):
    """Send the user the link that confirms their e-mail address
    (`notification.email.verify`): message-service signed `token` for this user and this very
    address; email-sender builds the link from it and its base URL, and sends the e-mail once
    per `verification_id`. Never reported to the router (it is no notification)."""

    type: Literal["email_verification_requested"] = "email_verification_requested"
    verification_id: uuid.UUID
    user_id: uuid.UUID
    to_address: str
    to_name: str
    token: str = Field(pattern=VERIFICATION_LINK_PATTERN)
    expires_at: AwareDatetime


class EmailBounced(Event):
    """The mail server refused a notification e-mail for good (an SMTP 5xx), `email.bounced`:
    message-service counts it against the user's address, once per `notification_id`. The
    address itself is not sent, only its SHA-256 (`address_digest`), so a bounce of an address
    the user has replaced since counts against nothing."""

    type: Literal["email_bounced"] = "email_bounced"
    user_id: uuid.UUID
    notification_id: uuid.UUID
    address_digest: str = Field(pattern=r"^[0-9a-f]{64}$")
    reason: str = Field(max_length=200)


def address_digest(address: str) -> str:
    """The SHA-256 (hex) of an address exactly as stored: what `EmailBounced` names it by."""
    return hashlib.sha256(address.encode("utf-8")).hexdigest()


AnyEvent = Annotated[
    MessageCreated
    | MessageEdited
    | MessageDeleted
    | InvitationCreated
    | PresenceChanged
    | RoomRead
    | RoomLeft
    | UserUpdated
    | PushRequested
    | EmailRequested
    | DeliveryReported
    | DeviceInvalidated
    | EmailVerificationRequested
    | EmailBounced
    | InboxItemsUpdated
    | PushBatchRequested
    | EmailBatchRequested
    | DeliveryBatchReported
    | PushJobsRequested
    | EmailJobsRequested
    | DeliveriesReported,
    Field(discriminator="type"),
]

# What each sender's queue and the router's report queue carry: the events that span messages,
# or (from a service of an earlier version, or replayed from a dead-letter queue) one message's
# batch, or a single job or report.
AnyPushJob = Annotated[
    PushRequested | PushBatchRequested | PushJobsRequested, Field(discriminator="type")
]
AnyEmailJob = Annotated[
    EmailRequested | EmailBatchRequested | EmailJobsRequested, Field(discriminator="type")
]
AnyDeliveryReport = Annotated[
    DeliveryReported | DeliveryBatchReported | DeliveriesReported, Field(discriminator="type")
]


def push_jobs(event: PushRequested | PushBatchRequested | PushJobsRequested) -> list[PushRequested]:
    """The jobs an event of the push queue carries, whatever its kind."""
    return [event] if isinstance(event, PushRequested) else list(event.jobs)


def email_jobs(
    event: EmailRequested | EmailBatchRequested | EmailJobsRequested,
) -> list[EmailRequested]:
    """The jobs an event of the e-mail queue carries, whatever its kind."""
    return [event] if isinstance(event, EmailRequested) else list(event.jobs)


def decided_when_quiet(event: Event) -> bool:
    """Whether a sender's event carries jobs the router decided in a quiet pipeline (`quiet`):
    its claim need not wait for company."""
    return isinstance(event, PushJobsRequested | EmailJobsRequested) and event.quiet


def delivery_reports(
    event: DeliveryReported | DeliveryBatchReported | DeliveriesReported,
) -> list[DeliveryReported]:
    """The reports an event of the report queue carries, whatever its kind."""
    return [event] if isinstance(event, DeliveryReported) else list(event.reports)


EVENT_ADAPTER: TypeAdapter[AnyEvent] = TypeAdapter(AnyEvent)

EVENT_MODELS: tuple[type[Event], ...] = (
    MessageCreated,
    MessageEdited,
    MessageDeleted,
    InvitationCreated,
    PresenceChanged,
    RoomRead,
    RoomLeft,
    UserUpdated,
    PushRequested,
    EmailRequested,
    DeliveryReported,
    DeviceInvalidated,
    EmailVerificationRequested,
    EmailBounced,
    InboxItemsUpdated,
    PushBatchRequested,
    EmailBatchRequested,
    DeliveryBatchReported,
    PushJobsRequested,
    EmailJobsRequested,
    DeliveriesReported,
)


def notification_id_for(
    *, message_id: uuid.UUID, recipient_id: uuid.UUID, channel: Channel, target: str = ""
) -> uuid.UUID:
    """The idempotency key of one notification, identical however often it is computed.

    `target` distinguishes several deliveries on one channel (one push per device).
    """
    return uuid.uuid5(NOTIFICATION_NAMESPACE, f"{message_id}:{recipient_id}:{channel}:{target}")
