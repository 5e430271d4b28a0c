"""Who gets what, on which channel: the router's decisions as pure functions.

No I/O and no framework here (neither faststream, httpx nor sqlalchemy): the handlers load the
recipients, call `plan_notifications`, record the plan and publish its pending jobs in the
batches of `batch_jobs`. Everything below is deterministic in its inputs (`now` included), so a
redelivered message yields the same notification ids and the same jobs.

Rules, per recipient of a `MessageCreated`:

* the sender is never notified, and a recipient listed twice is decided once;
* a room the recipient muted silences every channel, unless the message mentions them;
* push: one job per registered device, unless push is off or there is no device;
* email: one job, unless email is off or there is no address;
* a mention overrides the room's mute only, never a channel the recipient switched off.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from herald_shared.events import (
    NOTIFICATION_NAMESPACE,
    Channel,
    DeliveryOutcome,
    EmailJobsRequested,
    EmailRequested,
    MessageCreated,
    Platform,
    PushJobsRequested,
    PushRequested,
    UserUpdated,
    WebPushKeys,
    chunks,
    notification_id_for,
)
from herald_shared.text import truncate

PENDING = "pending"


class SkipReason(StrEnum):
    MUTED = "muted"
    PUSH_DISABLED = "push_disabled"
    EMAIL_DISABLED = "email_disabled"
    NO_DEVICE = "no_device"
    NO_EMAIL = "no_email"


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
class Recipient:
    """What routing knows about a user: the projection of their latest `UserUpdated`."""

    user_id: uuid.UUID
    version: int
    display_name: str
    email: str | None
    devices: tuple[Device, ...] = ()
    push_enabled: bool = True
    email_enabled: bool = True
    # False: pushes say who wrote where, never what (`push_content`).
    push_preview: bool = True
    muted_room_ids: frozenset[uuid.UUID] = frozenset()
    time_zone: str = "UTC"

    @classmethod
    def from_snapshot(cls, snapshot: UserUpdated) -> Recipient:
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
            push_enabled=snapshot.preferences.push_enabled,
            email_enabled=snapshot.preferences.email_enabled,
            push_preview=snapshot.preferences.push_preview,
            muted_room_ids=frozenset(snapshot.preferences.muted_room_ids),
            time_zone=snapshot.time_zone,
        )


@dataclass(frozen=True)
class ContentLimits:
    """How many characters a push title and body may have (see `truncate`)."""

    title_max_chars: int = 100
    body_max_chars: int = 200


DEFAULT_LIMITS = ContentLimits()


@dataclass(frozen=True)
class RecipientDecision:
    """The decision for one recipient: the ledger summary per channel and the jobs to send."""

    recipient_id: uuid.UUID
    mentioned: bool
    push: str  # "pending" or "skipped:<reason>"
    email: str  # "pending" or "skipped:<reason>"
    push_jobs: tuple[PushRequested, ...] = ()
    email_job: EmailRequested | None = None

    @property
    def jobs(self) -> tuple[PushRequested | EmailRequested, ...]:
        return (*self.push_jobs, *((self.email_job,) if self.email_job else ()))


@dataclass(frozen=True)
class RoutingPlan:
    """Decisions for every recipient with a projection, and those still without one."""

    decisions: tuple[RecipientDecision, ...]
    missing_recipient_ids: tuple[uuid.UUID, ...]


def recipients_of(event: MessageCreated) -> tuple[uuid.UUID, ...]:
    """The users to decide for: every listed recipient once, in order, never the sender."""
    return tuple(
        recipient_id
        for recipient_id in dict.fromkeys(event.recipient_ids)
        if recipient_id != event.sender_id
    )


def is_muted(event: MessageCreated, recipient: Recipient) -> bool:
    """A muted room stays silent, except for a message that mentions the recipient."""
    return event.room_id in recipient.muted_room_ids and recipient.user_id not in event.mentions


def plan_notifications(
    event: MessageCreated,
    recipients: Mapping[uuid.UUID, Recipient],
    *,
    now: datetime,
    limits: ContentLimits = DEFAULT_LIMITS,
) -> RoutingPlan:
    decisions: list[RecipientDecision] = []
    missing: list[uuid.UUID] = []
    for recipient_id in recipients_of(event):
        recipient = recipients.get(recipient_id)
        if recipient is None:
            missing.append(recipient_id)
        else:
            decisions.append(decide_for(event, recipient, now=now, limits=limits))
    return RoutingPlan(decisions=tuple(decisions), missing_recipient_ids=tuple(missing))


def decide_for(
    event: MessageCreated,
    recipient: Recipient,
    *,
    now: datetime,
    limits: ContentLimits = DEFAULT_LIMITS,
) -> RecipientDecision:
    mentioned = recipient.user_id in event.mentions
    if is_muted(event, recipient):
        reason = skipped(SkipReason.MUTED)
        return RecipientDecision(recipient.user_id, mentioned, push=reason, email=reason)

    push_jobs: tuple[PushRequested, ...] = ()
    if not recipient.push_enabled:
        push = skipped(SkipReason.PUSH_DISABLED)
    elif not recipient.devices:
        push = skipped(SkipReason.NO_DEVICE)
    else:
        push = PENDING
        title, body = push_content(event, preview=recipient.push_preview, limits=limits)
        push_jobs = tuple(
            _push_job(event, recipient, device, title=title, body=body, now=now)
            for device in recipient.devices
        )

    email_job: EmailRequested | None = None
    if not recipient.email_enabled:
        email = skipped(SkipReason.EMAIL_DISABLED)
    elif not recipient.email:
        email = skipped(SkipReason.NO_EMAIL)
    else:
        email = PENDING
        email_job = _email_job(event, recipient, recipient.email, now=now)

    return RecipientDecision(
        recipient.user_id,
        mentioned,
        push=push,
        email=email,
        push_jobs=push_jobs,
        email_job=email_job,
    )


def _push_job(
    event: MessageCreated,
    recipient: Recipient,
    device: Device,
    *,
    title: str,
    body: str,
    now: datetime,
) -> PushRequested:
    notification_id = notification_id_for(
        message_id=event.message_id,
        recipient_id=recipient.user_id,
        channel=Channel.PUSH,
        target=str(device.device_id),
    )
    # The job's event id is its notification id: a republished job is the same event.
    return PushRequested(
        event_id=notification_id,
        occurred_at=now,
        notification_id=notification_id,
        message_id=event.message_id,
        room_id=event.room_id,
        recipient_id=recipient.user_id,
        device_id=device.device_id,
        platform=device.platform,
        token=device.token,
        token_updated_at=device.token_updated_at,
        web_push_keys=device.web_push_keys,
        title=title,
        body=body,
    )


def _email_job(
    event: MessageCreated, recipient: Recipient, address: str, *, now: datetime
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
        message_content=event.message_content,
        sent_at=event.timestamp,
    )


JobBatch = PushJobsRequested | EmailJobsRequested


def batch_jobs(
    jobs: Iterable[PushRequested | EmailRequested], *, now: datetime
) -> tuple[JobBatch, ...]:
    """The jobs as the senders take them, in as few events as they fit: one
    `PushJobsRequested` per platform and one `EmailJobsRequested`, whatever messages the jobs
    are of, each cut into chunks of at most `MAX_ITEMS_PER_EVENT`.

    The events depend on the set of jobs only, not on the order they come in: push events (by
    platform) before e-mail events, and within each the jobs by notification id. A job listed
    twice goes out once (an event may not carry a notification twice, and the second copy would
    only be deduped by the sender).
    """
    unique = {job.notification_id: job for job in jobs}
    pushes: defaultdict[Platform, list[PushRequested]] = defaultdict(list)
    emails: list[EmailRequested] = []
    for job in sorted(unique.values(), key=lambda job: job.notification_id):
        if isinstance(job, PushRequested):
            pushes[job.platform].append(job)
        else:
            emails.append(job)

    batches: list[JobBatch] = []
    for platform in sorted(pushes):
        batches.extend(
            PushJobsRequested(
                event_id=_batch_event_id(chunk),
                occurred_at=now,
                platform=platform,
                jobs=list(chunk),
            )
            for chunk in chunks(pushes[platform])
        )
    batches.extend(
        EmailJobsRequested(event_id=_batch_event_id(chunk), occurred_at=now, jobs=list(chunk))
        for chunk in chunks(emails)
    )
    return tuple(batches)


def _batch_event_id(jobs: Sequence[PushRequested | EmailRequested]) -> uuid.UUID:
    # Like a job's (its notification id), a batch's event id names its content: a batch
    # republished with the same jobs is the same event, a differently composed one is not.
    return uuid.uuid5(
        NOTIFICATION_NAMESPACE, "batch:" + ",".join(str(job.notification_id) for job in jobs)
    )


def sender_name(event: MessageCreated) -> str:
    return (
        one_line(event.sender_info.display_name)
        or one_line(event.sender_info.username)
        or "Someone"
    )


def push_title(event: MessageCreated, max_chars: int) -> str:
    """`"<sender> in <room>"`, or just the sender where the room has no name (a direct chat)."""
    name = sender_name(event)
    room = one_line(event.room_name)
    return truncate(f"{name} in {room}" if room else name, max_chars)


def push_body(event: MessageCreated, max_chars: int) -> str:
    return truncate(one_line(event.message_content), max_chars)


def push_content(
    event: MessageCreated, *, preview: bool, limits: ContentLimits = DEFAULT_LIMITS
) -> tuple[str, str]:
    """A push's (title, body). With `preview` the body is the message's text; without it (the
    recipient's privacy setting) neither carries any text: "Alice in #general" / "New message
    from Alice in #general", or just "Alice" / "New message from Alice" in a direct chat."""
    if preview:
        return push_title(event, limits.title_max_chars), push_body(event, limits.body_max_chars)
    name = sender_name(event)
    room = one_line(event.room_name).lstrip("#").strip()
    where = f"{name} in #{room}" if room else name
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
