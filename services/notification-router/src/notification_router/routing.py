"""Who gets what, on which channel: the router's decisions as pure functions.

No I/O and no framework here (neither faststream, httpx nor sqlalchemy): the handlers load the
recipients, call `plan_notifications`, record the plan and publish its pending jobs in the
batches of `batch_jobs`. Everything below is deterministic in its inputs (`now` included), so a
redelivered message yields the same notification ids and the same jobs.

Rules, per recipient of a `MessageCreated` (the table in docs/notifications.md):

* the sender is never notified, and a recipient listed twice is decided once;
* a message the recipient has already read (their read marker of the room is at or past it,
  from any device) notifies nothing: a router that was behind catches up without buzzing;
* the trigger is the strongest reason the message concerns the recipient: a direct message,
  else a personal mention, else a room-wide mention (`@room`, `@all`), else a plain message;
* per channel, the level is the recipient's setting for the room, else their default:
  `none` sends nothing, `mentions` sends for anything but a plain message, `all` sends for
  everything;
* a room muted until a time still to come silences every channel, unless the message mentions
  the recipient personally (a room-wide mention does not break a mute); a mention never
  overrides a level, only the mute;
* presence: nothing for a message in the room the recipient has in view while a real-time stream
  of theirs is open (it reached their screen); no e-mail while they have had a stream open in
  the last `email_grace` (60 s by default: they are reading, or just were);
* push: one job per registered device; e-mail: one job, if there is an address;
* e-mail waits when the recipient chose an `email_delay`: the first such e-mail opens their
  window, and when it ends one digest lists what is still unread and still wanted then
  (`compose_digest`); with no delay it goes at once;
* pushes wait during the recipient's quiet hours (on their wall clock) or Do Not Disturb
  (`quiet_until`), except a direct message from one of their breakthrough users; when these
  end, each room still unread gets one summary push per device, or its one message's own push
  (`compose_push_summaries`);
* every push carries the recipient's unread count, all rooms together, as the badge, and the
  room's own (`unread_badges`); what a room's read (or a message's deletion) leaves stale on a
  device is recalled, one recall per device for everything read at once (`compose_recalls`).

An `InvitationCreated` is decided the same way for its one recipient, the invitee, with the
trigger `invitation`: personal, so a level of `mentions` or `all` sends it and `none` does not.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from enum import StrEnum
from typing import TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AwareDatetime, BaseModel, ConfigDict

from herald_shared.events import (
    MAX_DIGEST_ENTRIES,
    MAX_RECALLED_NOTIFICATIONS,
    MAX_RECALLED_ROOMS,
    NOTIFICATION_NAMESPACE,
    Channel,
    DeliveryOutcome,
    DigestEntry,
    EmailJobsRequested,
    EmailRequested,
    InvitationCreated,
    Level,
    MessageCreated,
    Notifiable,
    Platform,
    PreferencesSnapshot,
    PushJobsRequested,
    PushRecall,
    PushRequested,
    QuietHoursSnapshot,
    RoomKind,
    Trigger,
    UserUpdated,
    WebPushKeys,
    chunks,
    notification_id_for,
)
from herald_shared.text import truncate

PENDING = "pending"
# An e-mail in the recipient's digest window (`compose_digest` decides when it ends).
WAITING = "waiting"
# A mute with no end (what `muted_room_ids` of older snapshots mean).
MUTED_FOREVER = datetime.max.replace(tzinfo=UTC)


class SkipReason(StrEnum):
    READ = "read"  # the recipient already read the room past the message, on some device
    MUTED = "muted"
    PUSH_DISABLED = "push_disabled"  # push level `none`
    EMAIL_DISABLED = "email_disabled"  # e-mail level `none`
    LEVEL_MENTIONS = "level_mentions"  # level `mentions`, and the message names nobody
    ACTIVE_IN_ROOM = "active_in_room"  # the room is on the recipient's screen
    ONLINE = "online"  # e-mail: the recipient has (or just had) a real-time stream open
    NO_DEVICE = "no_device"
    NO_EMAIL = "no_email"
    # The user has not confirmed their address (or it bounced too often since): no e-mail.
    EMAIL_UNVERIFIED = "email_unverified"
    DELETED = "deleted"  # waiting, its message was deleted
    LEFT = "left"  # waiting, its recipient left the room (or declined its invitation)
    # A waiting e-mail the digest left out: the room was read, or the recipient's e-mail
    # settings no longer want it (READ, MUTED, EMAIL_DISABLED, LEVEL_MENTIONS, NO_EMAIL,
    # EMAIL_UNVERIFIED).


def email_address(recipient: Recipient) -> str | SkipReason:
    """Where the recipient's e-mail may go, or why nowhere: no address, or one its owner has
    not confirmed (nobody may have Herald mail an address that is not theirs). Push is not
    concerned."""
    if not recipient.email:
        return SkipReason.NO_EMAIL
    if not recipient.email_verified:
        return SkipReason.EMAIL_UNVERIFIED
    return recipient.email


def skipped(reason: SkipReason) -> str:
    """The ledger's spelling of a channel that was decided against."""
    return f"skipped:{reason}"


class DeliveryStatus(StrEnum):
    """The state of one notification (one device, or one e-mail) in the ledger."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


@dataclass(frozen=True)
class Device:
    device_id: uuid.UUID
    platform: Platform
    token: str
    # Passed on to push-sender: APNs' 410 rule needs the registration time, Web Push the keys.
    token_updated_at: datetime | None = None
    web_push_keys: WebPushKeys | None = None


@dataclass(frozen=True)
class RoomSettings:
    """A recipient's own settings for one room (None: their default level applies)."""

    push: Level | None = None
    email: Level | None = None
    muted_until: datetime | None = None


@dataclass(frozen=True)
class QuietHours:
    """Daily quiet hours on the wall clock of `time_zone`; `end` before `start`: overnight."""

    start: time
    end: time
    time_zone: str

    @classmethod
    def of(cls, snapshot: QuietHoursSnapshot | None) -> QuietHours | None:
        if snapshot is None or snapshot.start == snapshot.end:
            return None
        return cls(
            time.fromisoformat(snapshot.start), time.fromisoformat(snapshot.end), snapshot.time_zone
        )

    def end_after(self, now: datetime) -> datetime | None:
        """When the quiet hours `now` is in end (UTC), or None when `now` is not in them. The
        wall-clock times are those of that day in the zone, daylight-saving changes included
        (an end in the hour a spring change skips counts from before the change; of an end the
        clock reads twice, in the hour an autumn change repeats, the reading still to come)."""
        zone = _zone(self.time_zone)
        local = now.astimezone(zone)
        today, clock = local.date(), local.time().replace(tzinfo=None)
        if self.start < self.end:
            end_day = today if self.start <= clock < self.end else None
        elif clock >= self.start:
            end_day = today + timedelta(days=1)
        elif clock < self.end:
            end_day = today
        else:
            end_day = None
        if end_day is None:
            return None
        end = datetime.combine(end_day, self.end, tzinfo=zone)
        first, second = end.astimezone(UTC), end.replace(fold=1).astimezone(UTC)
        # The same instant twice, but in a repeated hour: in its second pass, the first is over.
        return first if first > now else second


def _zone(name: str) -> ZoneInfo:
    """The zone of that name, or UTC for one ZoneInfo cannot load: message-service checks zones,
    and a name that got past it (a tzdata directory such as "America" raises IsADirectoryError)
    must not fail the routing of everyone else in the batch."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return ZoneInfo("UTC")


def quiet_until(recipient: Recipient, event: Notifiable, *, now: datetime) -> datetime | None:
    """Until when the recipient's pushes wait (their quiet hours or Do Not Disturb, the later
    if both hold now), or None: push at once. A direct message from a breakthrough user never
    waits."""
    if (
        isinstance(event, MessageCreated)
        and event.room_kind is RoomKind.DIRECT
        and event.sender_id in recipient.breakthrough_user_ids
    ):
        return None
    return quiet_end(recipient, now=now)


def quiet_end(recipient: Recipient, *, now: datetime) -> datetime | None:
    """When the quiet hours or the snooze that hold now end (the later if both), or None; and
    if that end falls in the other, when that ends: a snooze until 23:30 with quiet hours from
    23:00 holds pushes until the morning, not until 23:30."""
    end = None
    # A snooze counts once, and quiet hours end when the clock reads their end: a few steps.
    for _ in range(4):
        snoozed = recipient.snoozed_until
        ends = [snoozed] if snoozed is not None and snoozed > now else []
        if recipient.quiet_hours is not None and (until := recipient.quiet_hours.end_after(now)):
            ends.append(until)
        if not ends:
            break
        end = now = max(ends)
    return end


@dataclass(frozen=True)
class Recipient:
    """What routing knows about a user: the projection of their latest `UserUpdated`."""

    user_id: uuid.UUID
    version: int
    display_name: str
    email: str | None
    devices: tuple[Device, ...] = ()
    push_level: Level = Level.ALL
    email_level: Level = Level.ALL
    # False: pushes say who wrote where, never what (`push_content`).
    push_preview: bool = True
    rooms: Mapping[uuid.UUID, RoomSettings] = field(default_factory=dict)
    time_zone: str = "UTC"
    # How long e-mail waits, gathering one digest; zero: each e-mail goes at once.
    email_delay: timedelta = timedelta(0)
    # Pushes wait during these and until `snoozed_until`, except a direct message from one of
    # `breakthrough_user_ids` (`quiet_until`).
    quiet_hours: QuietHours | None = None
    snoozed_until: datetime | None = None
    breakthrough_user_ids: frozenset[uuid.UUID] = frozenset()
    # Whether the user confirmed `email` through the link sent to it (`UserUpdated`).
    email_verified: bool = True

    @classmethod
    def from_snapshot(cls, snapshot: UserUpdated) -> Recipient:
        preferences = snapshot.preferences
        return cls(
            user_id=snapshot.user_id,
            version=snapshot.version,
            display_name=snapshot.display_name,
            email=snapshot.email,
            devices=tuple(
                Device(
                    device_id=device.device_id,
                    platform=device.platform,
                    token=device.token,
                    token_updated_at=device.token_updated_at,
                    web_push_keys=device.web_push_keys,
                )
                for device in snapshot.devices
            ),
            push_level=preferences.push_level,
            email_level=preferences.email_level,
            push_preview=preferences.push_preview,
            rooms=room_settings_of(preferences),
            time_zone=snapshot.time_zone,
            email_delay=timedelta(seconds=preferences.email_delay),
            quiet_hours=QuietHours.of(preferences.quiet_hours),
            snoozed_until=preferences.snoozed_until,
            breakthrough_user_ids=frozenset(preferences.breakthrough_user_ids),
            email_verified=snapshot.email_verified,
        )

    def level(self, room_id: uuid.UUID, channel: Channel) -> Level:
        """The level of `channel` in that room: the room's own, else the user's default."""
        room = self.rooms.get(room_id)
        if channel is Channel.PUSH:
            return room.push if room and room.push else self.push_level
        return room.email if room and room.email else self.email_level

    def muted(self, room_id: uuid.UUID, *, now: datetime) -> bool:
        room = self.rooms.get(room_id)
        return room is not None and room.muted_until is not None and room.muted_until > now


def room_settings_of(preferences: PreferencesSnapshot) -> dict[uuid.UUID, RoomSettings]:
    """The rooms' settings of a snapshot; a room only in the older `muted_room_ids` is muted
    with no end."""
    rooms = {
        room.room_id: RoomSettings(room.push, room.email, room.muted_until)
        for room in preferences.rooms
    }
    for room_id in preferences.muted_room_ids:
        rooms.setdefault(room_id, RoomSettings(muted_until=MUTED_FOREVER))
    return rooms


# E-mail waits until a user has had no real-time stream open for this long.
EMAIL_GRACE = timedelta(seconds=60)


@dataclass(frozen=True)
class Presence:
    """What the real-time streams say of a user: until when one of them is open (for a stream
    that ended, its end; for an open one, when it expires unless renewed), and the room in
    view."""

    online_until: datetime
    room_in_view: uuid.UUID | None = None

    def viewing(self, room_id: uuid.UUID, *, now: datetime) -> bool:
        return self.online_until > now and self.room_in_view == room_id

    def recently_online(self, *, now: datetime, grace: timedelta) -> bool:
        return self.online_until > now - grace


@dataclass(frozen=True)
class ContentLimits:
    """How many characters a push title and body may have (see `truncate`)."""

    title_max_chars: int = 100
    body_max_chars: int = 200


DEFAULT_LIMITS = ContentLimits()


class HeldPushes(BaseModel):
    """A message's pushes to one recipient, kept while their quiet hours or snooze last: what
    the summary of its room needs, and the pushes themselves (sent as they are when the room
    has nothing else to tell)."""

    model_config = ConfigDict(frozen=True)

    message_id: uuid.UUID
    room_id: uuid.UUID
    room_name: str
    sender_display_name: str
    sent_at: AwareDatetime
    trigger: Trigger
    jobs: list[PushRequested]


@dataclass(frozen=True)
class RecipientDecision:
    """The decision for one recipient: the ledger summary per channel and the jobs to send."""

    recipient_id: uuid.UUID
    mentioned: bool
    trigger: Trigger
    push: str  # "pending" or "skipped:<reason>"
    email: str  # "pending", "waiting" or "skipped:<reason>"
    push_jobs: tuple[PushRequested, ...] = ()
    email_job: EmailRequested | None = None
    # Waiting e-mail: how long the window it opens lasts (if it is the first).
    email_delay: timedelta = timedelta(0)
    # Waiting pushes: kept until the quiet hours or the snooze end (`push_due`).
    held_pushes: HeldPushes | None = None
    push_due: datetime | None = None
    # A message the recipient has not read: it counts in their unread count (the badge).
    unread: bool = False

    @property
    def jobs(self) -> tuple[PushRequested | EmailRequested, ...]:
        """What to hand the senders now (what waits is not: see `waiting_email`,
        `held_pushes`)."""
        pushes = self.push_jobs if self.push != WAITING else ()
        email = (self.email_job,) if self.email_job and self.email != WAITING else ()
        return (*pushes, *email)

    @property
    def waiting_email(self) -> EmailRequested | None:
        """The e-mail to keep for the recipient's digest."""
        return self.email_job if self.email == WAITING else None


@dataclass(frozen=True)
class RoutingPlan:
    """Decisions for every recipient with a projection, and those still without one."""

    decisions: tuple[RecipientDecision, ...]
    missing_recipient_ids: tuple[uuid.UUID, ...]


def recipients_of(event: Notifiable) -> tuple[uuid.UUID, ...]:
    """The users to decide for: every listed recipient once, in order, never the sender (an
    invitation's: its invitee)."""
    if isinstance(event, InvitationCreated):
        return () if event.invitee_id == event.inviter.user_id else (event.invitee_id,)
    return tuple(
        recipient_id
        for recipient_id in dict.fromkeys(event.recipient_ids)
        if recipient_id != event.sender_id
    )


def trigger_of(event: Notifiable, recipient_id: uuid.UUID) -> Trigger:
    """The strongest reason `event` concerns the recipient."""
    if isinstance(event, InvitationCreated):
        return Trigger.INVITATION
    if event.room_kind is RoomKind.DIRECT:
        return Trigger.DIRECT
    if recipient_id in event.mentions:
        return Trigger.MENTION
    if event.room_mentioned:
        return Trigger.ROOM_MENTION
    return Trigger.MESSAGE


def has_urgent_recipient(event: Notifiable) -> bool:
    """Whether `trigger_of` is urgent for some recipient of `event` (its invitee, a direct
    room's other member, someone it mentions), read from the event alone: the router routes such
    an event ahead of room chatter, without waiting for a batch of it to finish."""
    if isinstance(event, InvitationCreated):
        return Trigger.INVITATION.urgent
    candidates = event.mentions or event.recipient_ids[:1]
    return any(trigger_of(event, recipient_id).urgent for recipient_id in candidates)


def channel_skip(
    recipient: Recipient,
    event: Notifiable,
    channel: Channel,
    trigger: Trigger,
    now: datetime,
    presence: Presence | None = None,
    email_grace: timedelta = EMAIL_GRACE,
    read_up_to: datetime | None = None,
) -> SkipReason | None:
    """Why this channel stays silent for the recipient, or None when it should be used (if
    there is a device or an address to use): the mute first (which only naming the recipient
    breaks, also in a muted direct room; an invitee is in no room to mute), then the level,
    then presence. A message already read comes first of all."""
    already_read = read_up_to is not None and event.timestamp <= read_up_to
    if already_read and isinstance(event, MessageCreated):
        return SkipReason.READ
    if recipient.muted(event.room_id, now=now) and not _names(event, recipient.user_id):
        return SkipReason.MUTED
    level = recipient.level(event.room_id, channel)
    if level is Level.NONE:
        return SkipReason.PUSH_DISABLED if channel is Channel.PUSH else SkipReason.EMAIL_DISABLED
    if level is Level.MENTIONS and trigger is Trigger.MESSAGE:
        return SkipReason.LEVEL_MENTIONS
    if presence is not None:
        if presence.viewing(event.room_id, now=now):
            return SkipReason.ACTIVE_IN_ROOM
        if channel is Channel.EMAIL and presence.recently_online(now=now, grace=email_grace):
            return SkipReason.ONLINE
    return None


def _names(event: Notifiable, user_id: uuid.UUID) -> bool:
    """Whether the event is about the user in person: a mention of them, or their invitation."""
    if isinstance(event, InvitationCreated):
        return event.invitee_id == user_id
    return user_id in event.mentions


def plan_notifications(
    event: Notifiable,
    recipients: Mapping[uuid.UUID, Recipient],
    *,
    now: datetime,
    presence: Mapping[uuid.UUID, Presence] | None = None,
    read_markers: Mapping[tuple[uuid.UUID, uuid.UUID], datetime] | None = None,
    email_grace: timedelta = EMAIL_GRACE,
    limits: ContentLimits = DEFAULT_LIMITS,
) -> RoutingPlan:
    """The decisions for every recipient of the event; `presence`: of those who have had a
    real-time stream open lately (the others are offline); `read_markers`: (user, room) → up to
    when the user read the room. Its pushes carry no badge yet: the unread counts are known once
    the decisions are recorded (`unread_badges`, `with_badges`)."""
    decisions: list[RecipientDecision] = []
    missing: list[uuid.UUID] = []
    for recipient_id in recipients_of(event):
        recipient = recipients.get(recipient_id)
        if recipient is None:
            missing.append(recipient_id)
        else:
            decisions.append(
                decide_for(
                    event,
                    recipient,
                    now=now,
                    presence=(presence or {}).get(recipient_id),
                    read_up_to=(read_markers or {}).get((recipient_id, event.room_id)),
                    email_grace=email_grace,
                    limits=limits,
                )
            )
    return RoutingPlan(decisions=tuple(decisions), missing_recipient_ids=tuple(missing))


def decide_for(
    event: Notifiable,
    recipient: Recipient,
    *,
    now: datetime,
    presence: Presence | None = None,
    read_up_to: datetime | None = None,
    email_grace: timedelta = EMAIL_GRACE,
    limits: ContentLimits = DEFAULT_LIMITS,
) -> RecipientDecision:
    mentioned = isinstance(event, MessageCreated) and recipient.user_id in event.mentions
    trigger = trigger_of(event, recipient.user_id)

    push_jobs: tuple[PushRequested, ...] = ()
    push_due: datetime | None = None
    push_skip = channel_skip(
        recipient, event, Channel.PUSH, trigger, now, presence, email_grace, read_up_to
    )
    if push_skip is not None:
        push = skipped(push_skip)
    elif not recipient.devices:
        push = skipped(SkipReason.NO_DEVICE)
    else:
        title, body = push_content(event, preview=recipient.push_preview, limits=limits)
        push_jobs = tuple(
            _push_job(
                event,
                recipient,
                device,
                title=title,
                body=body,
                trigger=trigger,
                now=now,
            )
            for device in recipient.devices
        )
        push_due = quiet_until(recipient, event, now=now)
        push = PENDING if push_due is None else WAITING

    email_job: EmailRequested | None = None
    email_skip = channel_skip(
        recipient, event, Channel.EMAIL, trigger, now, presence, email_grace, read_up_to
    )
    address = email_address(recipient)
    if email_skip is not None:
        email = skipped(email_skip)
    elif isinstance(address, SkipReason):
        email = skipped(address)
    else:
        email = WAITING if recipient.email_delay > timedelta(0) else PENDING
        email_job = _email_job(event, recipient, address, trigger=trigger, now=now)

    return RecipientDecision(
        recipient.user_id,
        mentioned,
        trigger,
        push=push,
        email=email,
        push_jobs=push_jobs,
        email_job=email_job,
        email_delay=recipient.email_delay if email == WAITING else timedelta(0),
        held_pushes=None
        if push != WAITING
        else HeldPushes(
            message_id=event.message_id,
            room_id=event.room_id,
            room_name=event.room_name,
            sender_display_name=sender_name(event),
            sent_at=event.timestamp,
            trigger=trigger,
            jobs=list(push_jobs),
        ),
        push_due=push_due,
        unread=counts_unread(event, read_up_to),
    )


def counts_unread(event: Notifiable, read_up_to: datetime | None) -> bool:
    """Whether the event adds to its recipient's unread count: a message they have not read
    (an invitation is no message)."""
    if not isinstance(event, MessageCreated):
        return False
    return read_up_to is None or event.timestamp > read_up_to


@dataclass(frozen=True)
class Badge:
    """A recipient's unread messages as a push tells them: all rooms together (the app's
    badge), and the push's room's own."""

    total: int
    room: int


def unread_badges(
    events: Iterable[Notifiable],
    totals: Mapping[uuid.UUID, int],
    rooms: Mapping[tuple[uuid.UUID, uuid.UUID], int],
    read_markers: Mapping[tuple[uuid.UUID, uuid.UUID], datetime],
) -> dict[uuid.UUID, dict[uuid.UUID, Badge]]:
    """Message id → recipient → the badge its pushes carry: the recipient's unread counts up to
    and with the message. `totals` (by user) and `rooms` (by user and room) are the counts once
    these events are in; each event's are those less the unread events after it.

    The room's count is exact (the routing transactions of one user and room take the same
    counter row in turn); the total may miss a message of another room routed in the same
    instant, and the next push or recall carries it again."""
    running_totals, running_rooms = dict(totals), dict(rooms)
    badges: dict[uuid.UUID, dict[uuid.UUID, Badge]] = {}
    newest_first = sorted(events, key=lambda event: (event.timestamp, event.message_id))[::-1]
    for event in newest_first:
        of_event: dict[uuid.UUID, Badge] = {}
        for recipient_id in recipients_of(event):
            pair = (recipient_id, event.room_id)
            total, in_room = running_totals.get(recipient_id, 0), running_rooms.get(pair, 0)
            of_event[recipient_id] = Badge(max(total, 0), max(in_room, 0))
            if counts_unread(event, read_markers.get(pair)):
                running_totals[recipient_id], running_rooms[pair] = total - 1, in_room - 1
        badges[event.message_id] = of_event
    return badges


J = TypeVar("J", bound=PushRequested | EmailRequested)


def with_badges(
    jobs: Iterable[J], badges: Mapping[uuid.UUID, Mapping[uuid.UUID, Badge]]
) -> list[J]:
    """The jobs, each push with its badge (`unread_badges`); e-mails as they are."""
    stamped: list[J] = []
    for job in jobs:
        badge = badges.get(job.message_id, {}).get(job.recipient_id)
        if isinstance(job, PushRequested) and badge is not None:
            job = job.model_copy(update={"badge": badge.total, "room_unread": badge.room})
        stamped.append(job)
    return stamped


def _push_job(
    event: Notifiable,
    recipient: Recipient,
    device: Device,
    *,
    title: str,
    body: str,
    trigger: Trigger,
    now: datetime,
) -> PushRequested:
    notification_id = notification_id_for(
        message_id=event.message_id,
        recipient_id=recipient.user_id,
        channel=Channel.PUSH,
        target=str(device.device_id),
    )
    return _device_push(
        notification_id,
        message_id=event.message_id,
        room_id=event.room_id,
        recipient_id=recipient.user_id,
        device=device,
        title=title,
        body=body,
        trigger=trigger,
        badge=None,
        now=now,
    )


def _device_push(
    notification_id: uuid.UUID,
    *,
    message_id: uuid.UUID,
    room_id: uuid.UUID,
    recipient_id: uuid.UUID,
    device: Device,
    title: str,
    body: str,
    trigger: Trigger,
    badge: int | None,
    now: datetime,
    room_unread: int | None = None,
    recall: PushRecall | None = None,
) -> PushRequested:
    # The job's event id is its notification id: a republished job is the same event.
    return PushRequested(
        event_id=notification_id,
        occurred_at=now,
        notification_id=notification_id,
        message_id=message_id,
        room_id=room_id,
        recipient_id=recipient_id,
        device_id=device.device_id,
        platform=device.platform,
        token=device.token,
        token_updated_at=device.token_updated_at,
        web_push_keys=device.web_push_keys,
        title=title,
        body=body,
        trigger=trigger,
        badge=badge,
        room_unread=room_unread,
        recall=recall,
    )


def _email_job(
    event: Notifiable, recipient: Recipient, address: str, *, trigger: Trigger, now: datetime
) -> EmailRequested:
    notification_id = notification_id_for(
        message_id=event.message_id, recipient_id=recipient.user_id, channel=Channel.EMAIL
    )
    return EmailRequested(
        event_id=notification_id,
        occurred_at=now,
        notification_id=notification_id,
        message_id=event.message_id,
        room_id=event.room_id,
        room_name=event.room_name,
        recipient_id=recipient.user_id,
        to_address=address,
        to_name=recipient.display_name,
        sender_display_name=sender_name(event),
        # An invitation has no text of its own: the e-mail-sender words it by its trigger.
        message_content=event.message_content if isinstance(event, MessageCreated) else "",
        sent_at=event.timestamp,
        trigger=trigger,
    )


@dataclass(frozen=True)
class MessageChange:
    """What became of a message since it was decided: its latest text, or its deletion."""

    content: str | None = None
    deleted: bool = False


def _changed(job: EmailRequested, change: MessageChange | None) -> EmailRequested:
    if change is None or change.content is None:
        return job
    return job.model_copy(update={"message_content": change.content})


@dataclass(frozen=True)
class WindowPlan:
    """What one ended window sends (nothing, when nothing is left to tell): for e-mail one
    digest, for pushes one per room and device; the messages told of, and those left out, with
    why."""

    jobs: tuple[PushRequested | EmailRequested, ...]
    sent: tuple[uuid.UUID, ...]
    cancelled: Mapping[uuid.UUID, SkipReason]


def compose_digest(
    digest_id: uuid.UUID,
    recipient: Recipient | None,
    waiting: Sequence[EmailRequested],
    *,
    read_markers: Mapping[uuid.UUID, datetime],
    now: datetime,
    changes: Mapping[uuid.UUID, MessageChange] | None = None,
) -> WindowPlan:
    """The digest of a window that ended: every waiting e-mail of it (as decided then) whose
    message is still there (`changes`: deleted, or edited since: then with its latest text),
    still unread (`read_markers`: room → read up to) and still wanted by the recipient's
    e-mail settings, oldest first; the first `MAX_DIGEST_ENTRIES` listed, the rest counted.
    Sent to the address the recipient has now. Its notification id derives from the window:
    composing it again (a crash before it was marked) gives the same e-mail, which the
    e-mail-sender dedupes."""
    kept: list[EmailRequested] = []
    cancelled: dict[uuid.UUID, SkipReason] = {}
    for job in sorted(waiting, key=lambda job: (job.sent_at, str(job.message_id))):
        change = (changes or {}).get(job.message_id)
        reason = _no_longer_wanted(
            Channel.EMAIL, recipient, job, change, read_up_to=read_markers.get(job.room_id), now=now
        )
        if reason is None:
            kept.append(_changed(job, change))
        else:
            cancelled[job.message_id] = reason
    sent = tuple(job.message_id for job in kept)
    address = None if recipient is None else email_address(recipient)
    if not kept or recipient is None or not isinstance(address, str):
        return WindowPlan((), sent=(), cancelled=cancelled)
    first = kept[0]
    notification_id = digest_notification_id(digest_id, recipient.user_id)
    listed = kept[:MAX_DIGEST_ENTRIES]
    job = first.model_copy(
        update={
            "event_id": notification_id,
            "occurred_at": now,
            "notification_id": notification_id,
            "to_address": address,
            "to_name": recipient.display_name,
            "digest": [
                DigestEntry(
                    message_id=entry.message_id,
                    room_id=entry.room_id,
                    room_name=entry.room_name,
                    sender_display_name=entry.sender_display_name,
                    message_content=entry.message_content,
                    sent_at=entry.sent_at,
                    trigger=entry.trigger,
                )
                for entry in listed
            ],
            "omitted": len(kept) - len(listed),
        }
    )
    return WindowPlan((job,), sent=sent, cancelled=cancelled)


def compose_push_summaries(
    window_id: uuid.UUID,
    recipient: Recipient | None,
    held: Sequence[HeldPushes],
    *,
    read_markers: Mapping[uuid.UUID, datetime],
    now: datetime,
    limits: ContentLimits = DEFAULT_LIMITS,
    changes: Mapping[uuid.UUID, MessageChange] | None = None,
    badge: int | None = None,
) -> WindowPlan:
    """The pushes of quiet hours (or a snooze) that ended: per room with something still there,
    unread and wanted, its one held message's own pushes (with its latest text, if edited and
    previews are on), or for several one summary per device ("12 new messages in #general"),
    which replaces the room's notification on the device. Each carries `badge`, the recipient's
    unread count of now. Its notification id derives from the window, the room and the device:
    composed again, the same pushes, which push-sender dedupes."""
    kept: dict[uuid.UUID, list[HeldPushes]] = {}
    cancelled: dict[uuid.UUID, SkipReason] = {}
    for message in sorted(held, key=lambda message: (message.sent_at, str(message.message_id))):
        change = (changes or {}).get(message.message_id)
        reason = _no_longer_wanted(
            Channel.PUSH,
            recipient,
            message,
            change,
            read_up_to=read_markers.get(message.room_id),
            now=now,
        )
        new_text = change.content if change is not None else None
        if new_text is not None and recipient is not None and recipient.push_preview:
            body = truncate(one_line(new_text), limits.body_max_chars)
            message = message.model_copy(
                update={"jobs": [job.model_copy(update={"body": body}) for job in message.jobs]}
            )
        if (
            recipient is not None
            and not recipient.push_preview
            and message.trigger is not Trigger.INVITATION
        ):
            # Previews turned off since it was held: its own pushes must not carry the text.
            title, body = _textless_content(message.sender_display_name, message.room_name, limits)
            message = message.model_copy(
                update={
                    "jobs": [
                        job.model_copy(update={"title": title, "body": body})
                        for job in message.jobs
                    ]
                }
            )
        if reason is None:
            kept.setdefault(message.room_id, []).append(message)
        else:
            cancelled[message.message_id] = reason
    if recipient is None:
        return WindowPlan((), sent=(), cancelled=cancelled)
    devices = {device.device_id for device in recipient.devices}
    jobs: list[PushRequested] = []
    sent: list[uuid.UUID] = []
    for room_id, messages in kept.items():
        if len(messages) == 1:
            (message,) = messages
            own = [
                job.model_copy(update={"badge": badge, "room_unread": None})
                for job in message.jobs
                if job.device_id in devices
            ]
            if own:
                jobs.extend(own)
                sent.append(message.message_id)
            else:  # its devices are gone (the summary would go to the devices of now)
                cancelled[message.message_id] = SkipReason.NO_DEVICE
            continue
        sent.extend(message.message_id for message in messages)
        last = messages[-1]
        urgent = [message.trigger for message in messages if message.trigger.urgent]
        title, body = summary_content(last, len(messages), limits=limits)
        jobs.extend(
            _device_push(
                notification_id_for(
                    message_id=window_id,
                    recipient_id=recipient.user_id,
                    channel=Channel.PUSH,
                    target=f"{room_id}:{device.device_id}",
                ),
                message_id=last.message_id,
                room_id=room_id,
                recipient_id=recipient.user_id,
                device=device,
                title=title,
                body=body,
                trigger=urgent[0] if urgent else Trigger.MESSAGE,
                badge=badge,
                now=now,
            )
            for device in recipient.devices
        )
    return WindowPlan(tuple(jobs), sent=tuple(sent), cancelled=cancelled)


class ShownPush(BaseModel):
    """One push a device may still show."""

    model_config = ConfigDict(frozen=True)

    notification_id: uuid.UUID
    device_id: uuid.UUID


class RecalledPushes(BaseModel):
    """A message's pushes to one recipient that its room's read (or its deletion) made stale:
    an entry of the recipient's recall window."""

    model_config = ConfigDict(frozen=True)

    message_id: uuid.UUID
    room_id: uuid.UUID
    sent_at: AwareDatetime
    pushes: list[ShownPush]


def compose_recalls(
    window_id: uuid.UUID,
    recipient: Recipient | None,
    recalled: Sequence[RecalledPushes],
    *,
    badge: int | None,
    now: datetime,
) -> WindowPlan:
    """One recall per device that may still show some of `recalled`, whatever the number of
    rooms read meanwhile: the rooms (newest first, at most `MAX_RECALLED_ROOMS`) and the
    notifications (newest first, at most `MAX_RECALLED_NOTIFICATIONS`: a device clears the
    rest by room), with `badge`, the unread count of now. Only to the recipient's devices of
    now: a device gone shows nothing of ours. Its notification id derives from the window and
    the device: composed again, the same recall, which push-sender dedupes."""
    if recipient is None:
        return WindowPlan(
            (),
            sent=(),
            cancelled=dict.fromkeys((entry.message_id for entry in recalled), SkipReason.NO_DEVICE),
        )
    devices = {device.device_id: device for device in recipient.devices}
    newest_first = sorted(
        recalled, key=lambda entry: (entry.sent_at, str(entry.message_id)), reverse=True
    )
    shown: dict[uuid.UUID, list[tuple[RecalledPushes, uuid.UUID]]] = defaultdict(list)
    for entry in newest_first:
        for push in entry.pushes:
            if push.device_id in devices:
                shown[push.device_id].append((entry, push.notification_id))
    jobs: list[PushRequested] = []
    for device_id, pushes in sorted(shown.items()):
        newest = pushes[0][0]
        rooms = list(dict.fromkeys(entry.room_id for entry, _ in pushes))
        notification_ids = list(dict.fromkeys(notification_id for _, notification_id in pushes))
        jobs.append(
            _device_push(
                notification_id_for(
                    message_id=window_id,
                    recipient_id=recipient.user_id,
                    channel=Channel.PUSH,
                    target=f"recall:{device_id}",
                ),
                message_id=newest.message_id,
                room_id=newest.room_id,
                recipient_id=recipient.user_id,
                device=devices[device_id],
                title="",
                body="",
                trigger=Trigger.MESSAGE,
                badge=badge,
                now=now,
                recall=PushRecall(
                    room_ids=rooms[:MAX_RECALLED_ROOMS],
                    notification_ids=notification_ids[:MAX_RECALLED_NOTIFICATIONS],
                ),
            )
        )
    recalled_ids = {entry.message_id for pushes in shown.values() for entry, _ in pushes}
    cancelled = {
        entry.message_id: SkipReason.NO_DEVICE
        for entry in recalled
        if entry.message_id not in recalled_ids
    }
    return WindowPlan(tuple(jobs), sent=tuple(sorted(recalled_ids)), cancelled=cancelled)


def summary_content(
    last: HeldPushes, count: int, *, limits: ContentLimits = DEFAULT_LIMITS
) -> tuple[str, str]:
    """A summary push's (title, body): "#general" / "12 new messages in #general", or for a
    direct room "Alice" / "3 new messages from Alice". No message text."""
    room = one_line(last.room_name).lstrip("#").strip()
    if room:
        title, body = f"#{room}", f"{count} new messages in #{room}"
    else:
        sender = one_line(last.sender_display_name) or "Someone"
        title, body = sender, f"{count} new messages from {sender}"
    return truncate(title, limits.title_max_chars), truncate(body, limits.body_max_chars)


def digest_notification_id(digest_id: uuid.UUID, recipient_id: uuid.UUID) -> uuid.UUID:
    """The digest e-mail's idempotency key: one per window, never a single message's."""
    return notification_id_for(
        message_id=digest_id, recipient_id=recipient_id, channel=Channel.EMAIL, target="digest"
    )


def _no_longer_wanted(
    channel: Channel,
    recipient: Recipient | None,
    waited: EmailRequested | HeldPushes,
    change: MessageChange | None,
    *,
    read_up_to: datetime | None,
    now: datetime,
) -> SkipReason | None:
    """Why what waited on `channel` is no longer to be told when its window ends, or None: its
    message deleted or read meanwhile, nowhere to send it now, or the recipient's settings of
    now (the rules of `channel_skip`: only naming the recipient breaks a mute, and `mentions`
    wants everything but a plain message)."""
    room_id, trigger, sent_at = waited.room_id, waited.trigger, waited.sent_at
    if change is not None and change.deleted:
        return SkipReason.DELETED
    if read_up_to is not None and sent_at <= read_up_to:
        return SkipReason.READ
    if channel is Channel.EMAIL:
        address = SkipReason.NO_EMAIL if recipient is None else email_address(recipient)
        if isinstance(address, SkipReason):
            return address
    if recipient is None or (channel is Channel.PUSH and not recipient.devices):
        return SkipReason.NO_DEVICE
    naming = trigger in (Trigger.MENTION, Trigger.INVITATION)
    if recipient.muted(room_id, now=now) and not naming:
        return SkipReason.MUTED
    level = recipient.level(room_id, channel)
    if level is Level.NONE:
        return SkipReason.PUSH_DISABLED if channel is Channel.PUSH else SkipReason.EMAIL_DISABLED
    if level is Level.MENTIONS and trigger is Trigger.MESSAGE:
        return SkipReason.LEVEL_MENTIONS
    return None


JobBatch = PushJobsRequested | EmailJobsRequested


def batch_jobs(
    jobs: Iterable[PushRequested | EmailRequested], *, now: datetime, quiet: bool = False
) -> tuple[JobBatch, ...]:
    """The jobs as the senders take them, in as few events as they fit: one
    `PushJobsRequested` per lane and platform and one `EmailJobsRequested` per lane, whatever
    messages the jobs are of, each cut into chunks of at most `MAX_ITEMS_PER_EVENT`. The urgent
    lane (DMs and personal mentions) has queues of its own. `quiet` marks every event: the
    jobs were decided in a quiet pipeline, and their senders claim them without waiting for
    company.

    The events depend on the set of jobs only, not on the order they come in: push events (urgent
    first, then by platform) before e-mail events (urgent first), and within each the jobs by
    notification id. A job listed
    twice goes out once (an event may not carry a notification twice, and the second copy would
    only be deduped by the sender).
    """
    unique = {job.notification_id: job for job in jobs}
    pushes: defaultdict[tuple[bool, Platform], list[PushRequested]] = defaultdict(list)
    emails: defaultdict[bool, list[EmailRequested]] = defaultdict(list)
    for job in sorted(unique.values(), key=lambda job: job.notification_id):
        if isinstance(job, PushRequested):
            pushes[(not job.urgent, job.platform)].append(job)
        else:
            emails[not job.urgent].append(job)

    batches: list[JobBatch] = []
    for not_urgent, platform in sorted(pushes):
        batches.extend(
            PushJobsRequested(
                event_id=_batch_event_id(chunk),
                occurred_at=now,
                platform=platform,
                urgent=not not_urgent,
                quiet=quiet,
                jobs=list(chunk),
            )
            for chunk in chunks(pushes[(not_urgent, platform)])
        )
    for not_urgent in sorted(emails):
        batches.extend(
            EmailJobsRequested(
                event_id=_batch_event_id(chunk),
                occurred_at=now,
                urgent=not not_urgent,
                quiet=quiet,
                jobs=list(chunk),
            )
            for chunk in chunks(emails[not_urgent])
        )
    return tuple(batches)


def _batch_event_id(jobs: Sequence[PushRequested | EmailRequested]) -> uuid.UUID:
    # Like a job's (its notification id), a batch's event id names its content: a batch
    # republished with the same jobs is the same event, a differently composed one is not.
    return uuid.uuid5(
        NOTIFICATION_NAMESPACE, "batch:" + ",".join(str(job.notification_id) for job in jobs)
    )


def sender_name(event: Notifiable) -> str:
    """Who wrote the message, or who sent the invitation."""
    sender = event.inviter if isinstance(event, InvitationCreated) else event.sender_info
    return one_line(sender.display_name) or one_line(sender.username) or "Someone"


def push_title(event: MessageCreated, max_chars: int) -> str:
    """`"<sender> in <room>"`, or just the sender where the room has no name (a direct chat)."""
    name = sender_name(event)
    room = one_line(event.room_name)
    return truncate(f"{name} in {room}" if room else name, max_chars)


def push_body(event: MessageCreated, max_chars: int) -> str:
    return truncate(one_line(event.message_content), max_chars)


def push_content(
    event: Notifiable, *, preview: bool, limits: ContentLimits = DEFAULT_LIMITS
) -> tuple[str, str]:
    """A push's (title, body). With `preview` the body is the message's text; without it (the
    recipient's privacy setting) neither carries any text: "Alice in #general" / "New message
    from Alice in #general", or just "Alice" / "New message from Alice" in a direct chat. An
    invitation carries no text to hide: "#general" / "Alice invited you to #general"."""
    if isinstance(event, InvitationCreated):
        room = "#" + (one_line(event.room_name).lstrip("#").strip() or "a room")
        return (
            truncate(room, limits.title_max_chars),
            truncate(f"{sender_name(event)} invited you to {room}", limits.body_max_chars),
        )
    if preview:
        return push_title(event, limits.title_max_chars), push_body(event, limits.body_max_chars)
    return _textless_content(sender_name(event), event.room_name, limits)


def _textless_content(sender: str, room_name: str, limits: ContentLimits) -> tuple[str, str]:
    """A push's (title, body) without the message's text (`push_content`, previews off)."""
    room = one_line(room_name).lstrip("#").strip()
    where = f"{sender} in #{room}" if room else sender
    return (
        truncate(where, limits.title_max_chars),
        truncate(f"New message from {where}", limits.body_max_chars),
    )


def one_line(text: str) -> str:
    """Runs of whitespace (line breaks included) become one space: a preview is one line."""
    return " ".join(text.split())


def statuses_replaceable_by(outcome: DeliveryOutcome) -> frozenset[str]:
    """The ledger statuses a delivery report may overwrite.

    `delivered` is final: a late or duplicated `failed` report never moves it back. `failed`
    may still become `delivered` (a replayed job that got through later); a second `failed`
    changes nothing. `pending` becomes whatever is reported.
    """
    if outcome is DeliveryOutcome.DELIVERED:
        return frozenset({DeliveryStatus.PENDING, DeliveryStatus.FAILED})
    return frozenset({DeliveryStatus.PENDING})
