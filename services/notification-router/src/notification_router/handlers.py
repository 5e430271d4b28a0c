"""One subscriber per queue, each a few lines: parse (FastStream does it from the annotation),
hand the event to its queue's batcher; each batch calls the repository and the pure routing rules
once for all its messages and publishes their jobs in as few events as they fit.

Failures only raise; `herald_shared.retry`'s middleware turns them into delayed retries or dead
letters. Logs carry ids only: never an address, a token or message text.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from faststream.rabbit import RabbitBroker
from faststream.rabbit.publisher import RabbitPublisher
from faststream.rabbit.subscriber import RabbitSubscriber
from sqlalchemy.ext.asyncio import AsyncEngine

from herald_shared.batching import MicroBatcher
from herald_shared.config import BatchSettings
from herald_shared.events import (
    AnyDeliveryReport,
    AnyMessageChange,
    AnyNotifiable,
    AnyRoomMarker,
    DeliveryOutcome,
    DeliveryReported,
    MessageChanged,
    MessageCreated,
    MessageDeleted,
    Notifiable,
    PresenceChanged,
    PushJobsRequested,
    RoomLeft,
    RoomMarker,
    UserUpdated,
    delivery_reports,
    utc_now,
)
from herald_shared.publishing import publish_events
from herald_shared.retry import RetryableError
from herald_shared.topology import (
    DELIVERY_REPORTS,
    EXCHANGE,
    MESSAGE_CHANGES,
    MESSAGE_NOTIFICATIONS,
    PRESENCE_UPDATES,
    READ_MARKERS,
    RECIPIENT_UPDATES,
)
from notification_router import repository, routing
from notification_router.metrics import RouterMetrics
from notification_router.repository import ReportResult

logger = logging.getLogger("notification_router")

# Messages whose creation time the router remembers for the latency metric: the reports of a
# message arrive within seconds of its routing, so a few minutes' worth of messages is plenty.
REMEMBERED_MESSAGES = 50_000


class MessageTimes:
    """When recently routed messages were created, so that the reports that follow need no
    database read for the latency metric. Bounded (oldest forgotten first); a message it does
    not know (routed by another replica, or before a restart) is read from the ledger."""

    def __init__(self, capacity: int = REMEMBERED_MESSAGES) -> None:
        self._capacity = capacity
        self._times: OrderedDict[uuid.UUID, datetime] = OrderedDict()

    def remember(self, message_id: uuid.UUID, created_at: datetime) -> None:
        self._times[message_id] = created_at
        if len(self._times) > self._capacity:
            self._times.popitem(last=False)

    async def of(
        self, engine: AsyncEngine, message_ids: set[uuid.UUID]
    ) -> dict[uuid.UUID, datetime]:
        known = {id_: self._times[id_] for id_ in message_ids if id_ in self._times}
        unknown = message_ids - known.keys()
        if unknown:
            known.update(await repository.messages_created_at(engine, unknown))
        return known


@dataclass(frozen=True)
class RouterDeps:
    """What the handlers need, built once by `app.build_service` and handed down."""

    engine: AsyncEngine
    # By routing key: the push and the e-mail jobs.
    publishers: Mapping[str, RabbitPublisher]
    metrics: RouterMetrics
    publish_timeout: float
    message_times: MessageTimes = field(default_factory=MessageTimes)
    recipients: repository.RecipientCache = field(default_factory=repository.RecipientCache)
    limits: routing.ContentLimits = routing.DEFAULT_LIMITS
    email_grace: timedelta = routing.EMAIL_GRACE
    # EMAIL_DELAY_SCALE: every user's e-mail delay times this (1 in production).
    email_delay_scale: float = 1.0
    # How long a recall waits for more reads of its user (RECALL_LINGER), and how a handler
    # asks this replica's dispatcher for a pass then (`WindowDispatcher.wake`).
    recall_linger: timedelta = timedelta(seconds=0.5)
    wake_schedule: Callable[[float], None] = lambda after: None


@dataclass(frozen=True)
class Subscribers:
    message_created: RabbitSubscriber
    user_updated: RabbitSubscriber
    presence_changed: RabbitSubscriber
    room_read: RabbitSubscriber
    message_changed: RabbitSubscriber
    delivery_reported: RabbitSubscriber


async def route_messages(
    events: Sequence[Notifiable], deps: RouterDeps
) -> list[RetryableError | None]:
    """Decide for every known recipient of every message (or invitation), commit the ledger,
    then publish the pending jobs in as few events as they fit (`routing.batch_jobs`); say per
    message whether it must come back.

    One read of the recipients, one transaction and one publish per event type, whatever the
    number of messages. Committing before publishing makes a crash in between harmless: the
    redelivered message finds its ledger rows (the insert is a no-op) and publishes the jobs
    still pending again, with the same notification ids, which the senders dedupe. Recipients
    without a projection yet are left for a retry of their message, on which the recipients
    handled now are no-ops.
    """
    now = utc_now()
    unique = list({event.message_id: event for event in events}.values())
    known, presence, read = await _routing_context(unique, deps, since=now - deps.email_grace)
    plans = {
        event.message_id: routing.plan_notifications(
            event,
            known,
            now=now,
            presence=presence,
            read_markers=read,
            email_grace=deps.email_grace,
            limits=deps.limits,
        )
        for event in unique
    }
    recorded = await repository.record_decisions(
        deps.engine,
        [(event, plans[event.message_id].decisions) for event in unique],
        now=now,
        email_delay_scale=deps.email_delay_scale,
    )
    new = recorded.new_recipient_ids()
    for event in unique:
        deps.message_times.remember(event.message_id, event.timestamp)
        deps.metrics.observe_decisions(
            event, plans[event.message_id].decisions, new.get(event.message_id, set()), now=now
        )

    unread = recorded.unread
    badges = routing.unread_badges(unique, unread.totals, unread.rooms, read)
    batches = routing.batch_jobs(
        routing.with_badges(
            (
                job
                for plan in plans.values()
                for decision in plan.decisions
                for job in decision.jobs
                if job.notification_id in recorded.pending_notification_ids
            ),
            badges,
        ),
        now=now,
        # A message that had no other to share its batch: the senders would find no company
        # either, and waiting for it is latency a user sees (docs/performance.md).
        quiet=len(unique) == 1,
    )
    await publish_events(batches, deps.publishers, timeout=deps.publish_timeout)
    for batch in batches:
        channel = "push" if isinstance(batch, PushJobsRequested) else "email"
        deps.metrics.jobs_published.labels(channel=channel).inc(len(batch.jobs))

    # DEBUG like FastStream's own per-message lines: at thousands of messages a second, the
    # metrics tell the story and retries / dead letters are logged louder by the middleware.
    logger.debug(
        "router.messages.routed messages=%d new=%d published=%d events=%d",
        len(unique),
        len(recorded.new),
        sum(len(batch.jobs) for batch in batches),
        len(batches),
    )
    return [_missing(plans[event.message_id]) for event in events]


async def _routing_context(
    events: Sequence[Notifiable], deps: RouterDeps, *, since: datetime
) -> tuple[
    dict[uuid.UUID, routing.Recipient],
    dict[uuid.UUID, routing.Presence],
    dict[tuple[uuid.UUID, uuid.UUID], datetime],
]:
    """The recipients of `events` with their presence (online since `since`) and how far they
    read the events' rooms: three reads that stand alone.

    A batch with an urgent message (a direct message, a mention, an invitation) runs them at
    once, each on a pooled connection: one round trip to wait for instead of three. Under load
    each await queues behind the big rooms' routing, on this loop and in PostgreSQL, and that
    wait was most of what a direct message spent before its transaction. Other batches read
    one after another: with every batch reading at once, two of six runs at 1,000/s built a
    backlog in their first seconds, and none of six with the reads in turn did (not explained;
    docs/performance.md).
    """
    wanted = {user_id for event in events for user_id in routing.recipients_of(event)}
    rooms = {event.room_id for event in events}
    if any(routing.has_urgent_recipient(event) for event in events):
        # Presence and read markers of every recipient wanted: those without a projection
        # yet are left out by the planning anyway.
        return await asyncio.gather(
            repository.load_recipients(deps.engine, wanted, deps.recipients),
            repository.load_presence(deps.engine, wanted, since=since),
            repository.load_read_markers(deps.engine, wanted, rooms),
        )
    known = await repository.load_recipients(deps.engine, wanted, deps.recipients)
    presence = await repository.load_presence(deps.engine, known, since=since)
    return known, presence, await repository.load_read_markers(deps.engine, known, rooms)


def _missing(plan: routing.RoutingPlan) -> RetryableError | None:
    if not plan.missing_recipient_ids:
        return None
    return RetryableError(f"{len(plan.missing_recipient_ids)} recipient(s) have no projection yet")


async def route_message(event: Notifiable, deps: RouterDeps) -> None:
    """`route_messages` for one message, raising how it ends."""
    (error,) = await route_messages([event], deps)
    if error is not None:
        raise error


async def project_recipient(event: UserUpdated, deps: RouterDeps) -> None:
    now = utc_now()
    due_at = None
    if not event.deleted:
        # The quiet changed (a snooze turned off or set longer, hours changed): what it holds
        # is due when it ends now, not when it would have.
        due_at = routing.quiet_end(routing.Recipient.from_snapshot(event), now=now) or now
    applied = await repository.upsert_recipient(
        deps.engine, event, now=now, push_window_due_at=due_at
    )
    deps.metrics.recipient_updates.labels(result="applied" if applied else "stale").inc()
    logger.debug(
        "router.recipient.%s user_id=%s version=%d",
        "updated" if applied else "stale_ignored",
        event.user_id,
        event.version,
    )


async def project_presence(event: PresenceChanged, deps: RouterDeps) -> None:
    await repository.apply_presence(deps.engine, event, now=utc_now())
    logger.debug(
        "router.presence.applied connections=%d rooms=%d",
        len(event.connections),
        len(event.rooms),
    )


async def apply_message_change(event: MessageChanged, deps: RouterDeps) -> None:
    changed = await repository.apply_message_change(
        deps.engine, event, now=utc_now(), recall_linger=deps.recall_linger
    )
    if changed and isinstance(event, MessageDeleted):
        deps.wake_schedule(deps.recall_linger.total_seconds())
    logger.debug(
        "router.message_change.%s type=%s message_id=%s",
        "applied" if changed else "stale_ignored",
        event.type,
        event.message_id,
    )


async def project_read_marker(event: RoomMarker, deps: RouterDeps) -> None:
    """A read marker that moves, or a room left: recount the room's unread messages and recall
    what the user's devices may still show of it (a room left also cancels what waits)."""
    now, linger = utc_now(), deps.recall_linger
    recalled: int | None
    if isinstance(event, RoomLeft):
        recalled = await repository.apply_room_left(
            deps.engine, event, now=now, recall_linger=linger
        )
    else:
        recalled = await repository.apply_read_marker(
            deps.engine, event, now=now, recall_linger=linger
        )
    if recalled:
        deps.wake_schedule(linger.total_seconds())
    logger.debug(
        "router.%s.%s recalled=%d",
        event.type,
        "behind_ignored" if recalled is None else "applied",
        recalled or 0,
    )


async def record_deliveries(event: AnyDeliveryReport, deps: RouterDeps) -> None:
    """Apply what the senders reported in one event (of any kind)."""
    await record_reports([event], deps)


async def record_reports(events: Sequence[AnyDeliveryReport], deps: RouterDeps) -> list[None]:
    """Apply the reports of many events at once: one UPDATE per outcome group."""
    reports = list(
        {
            (report.notification_id, report.outcome): report
            for event in events
            for report in delivery_reports(event)
        }.values()
    )
    results = await repository.apply_delivery_reports(deps.engine, reports, now=utc_now())
    _count_reports(reports, results, deps.metrics)
    await _observe_delivery_latency(reports, results, deps)
    _log_unapplied(reports, results)
    return [None for _ in events]


def _count_reports(
    reports: Sequence[DeliveryReported],
    results: Mapping[uuid.UUID, ReportResult],
    metrics: RouterMetrics,
) -> None:
    """One count per report, added up per label set (a batch's are mostly all the same)."""
    counts = Counter(
        (report.channel, report.outcome, results[report.notification_id]) for report in reports
    )
    for (channel, outcome, result), count in counts.items():
        metrics.delivery_reports.labels(channel=channel, outcome=outcome, result=result).inc(count)


async def _observe_delivery_latency(
    reports: Sequence[DeliveryReported],
    results: Mapping[uuid.UUID, ReportResult],
    deps: RouterDeps,
) -> None:
    # Once per notification: a redelivered or later report is no longer APPLIED. Not what
    # waited in a window (APPLIED_AFTER_WAITING): its delay was the recipient's choice.
    delivered = [
        report
        for report in reports
        if report.outcome is DeliveryOutcome.DELIVERED
        and results[report.notification_id] is ReportResult.APPLIED
    ]
    if not delivered:
        return
    created_at = await deps.message_times.of(
        deps.engine, {report.message_id for report in delivered}
    )
    for report in delivered:
        if report.message_id in created_at:
            deps.metrics.observe_delivery(
                report.channel, report.trigger, created_at[report.message_id], report.occurred_at
            )


def _log_unapplied(
    reports: Sequence[DeliveryReported], results: Mapping[uuid.UUID, ReportResult]
) -> None:
    for report in reports:
        result = results[report.notification_id]
        if result is ReportResult.UNKNOWN:
            logger.debug("router.report.unknown notification_id=%s", report.notification_id)
        elif result is ReportResult.STALE:
            logger.debug(
                "router.report.stale notification_id=%s outcome=%s",
                report.notification_id,
                report.outcome,
            )


def register_handlers(broker: RabbitBroker, deps: RouterDeps, batch: BatchSettings) -> Subscribers:
    message_created = broker.subscriber(
        MESSAGE_NOTIFICATIONS.queue,
        EXCHANGE,
        title=f"{MESSAGE_NOTIFICATIONS.name}:consume",
        description=(
            "New chat messages and room invitations (and their retries): decide, and request "
            "the notifications, many messages' jobs per event."
        ),
    )
    user_updated = broker.subscriber(
        RECIPIENT_UPDATES.queue,
        EXCHANGE,
        title=f"{RECIPIENT_UPDATES.name}:consume",
        description="User snapshots: keep the recipient projection at the highest version.",
    )
    presence_changed = broker.subscriber(
        PRESENCE_UPDATES.queue,
        EXCHANGE,
        title=f"{PRESENCE_UPDATES.name}:consume",
        description=(
            "Who has a real-time stream open and which room they look at: keep the presence "
            "projection (a newer word on a stream or a room always wins)."
        ),
    )
    room_read = broker.subscriber(
        READ_MARKERS.queue,
        EXCHANGE,
        title=f"{READ_MARKERS.name}:consume",
        description=(
            "Read markers and rooms left: keep how far each user read each room (only "
            "forward), so that a message already read notifies nobody, count the room's unread "
            "messages again, and recall what the read made stale on the user's devices; a room "
            "left also cancels what waits of it."
        ),
    )
    message_changed = broker.subscriber(
        MESSAGE_CHANGES.queue,
        EXCHANGE,
        title=f"{MESSAGE_CHANGES.name}:consume",
        description=(
            "Edits and deletions of messages: what still waits to tell of a message tells its "
            "latest text, or nothing once it is deleted (and its pushes are recalled)."
        ),
    )
    delivery_reported = broker.subscriber(
        DELIVERY_REPORTS.queue,
        EXCHANGE,
        title=f"{DELIVERY_REPORTS.name}:consume",
        description=(
            "What the senders' providers said, in events of any size: update each "
            "notification's status."
        ),
    )
    # The deliveries a consumer holds at once are handled together (`herald_shared.batching`):
    # one read, one transaction and one publish per batch rather than per message.
    messages: MicroBatcher[Notifiable, RetryableError | None] = MicroBatcher(
        functools.partial(route_messages, deps=deps),
        name="router-messages",
        max_size=batch.max_items,
        max_concurrent=batch.concurrency,
        linger=batch.linger,
        # Chat messages come one by one: one that came alone is routed at once, not a linger
        # later (at 90 notifications/s a push's p50 74 -> 47 ms; docs/performance.md).
        lone_items_linger=False,
        size=lambda event: (
            len(event.recipient_ids) or 1 if isinstance(event, MessageCreated) else 1
        ),
    )
    reports: MicroBatcher[AnyDeliveryReport, None] = MicroBatcher(
        functools.partial(record_reports, deps=deps),
        name="router-reports",
        max_size=batch.max_items,
        max_concurrent=batch.concurrency,
        linger=batch.linger,
        size=lambda event: len(delivery_reports(event)),
    )

    @message_created
    async def on_message_created(event: AnyNotifiable) -> None:
        error = await messages.submit(event, urgent=routing.has_urgent_recipient(event))
        if error is not None:
            raise error

    @user_updated
    async def on_user_updated(event: UserUpdated) -> None:
        await project_recipient(event, deps)

    @presence_changed
    async def on_presence_changed(event: PresenceChanged) -> None:
        await project_presence(event, deps)

    @room_read
    async def on_room_read(event: AnyRoomMarker) -> None:
        await project_read_marker(event, deps)

    @message_changed
    async def on_message_changed(event: AnyMessageChange) -> None:
        await apply_message_change(event, deps)

    @delivery_reported
    async def on_delivery_reported(event: AnyDeliveryReport) -> None:
        await reports.submit(event)

    return Subscribers(
        message_created,
        user_updated,
        presence_changed,
        room_read,
        message_changed,
        delivery_reported,
    )
