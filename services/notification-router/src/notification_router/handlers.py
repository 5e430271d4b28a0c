"""One subscriber per queue, each a few lines: parse (FastStream does it from the annotation),
call the repository and the pure routing rules, publish the jobs in batches.

Failures only raise; `herald_shared.retry`'s middleware turns them into delayed retries or dead
letters. Logs carry ids only: never an address, a token or message text.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter, OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from faststream.rabbit import RabbitBroker
from faststream.rabbit.publisher import RabbitPublisher
from faststream.rabbit.subscriber import RabbitSubscriber
from sqlalchemy.ext.asyncio import AsyncEngine

from herald_shared.events import (
    AnyDeliveryReport,
    DeliveryBatchReported,
    DeliveryOutcome,
    DeliveryReported,
    MessageCreated,
    PushBatchRequested,
    UserUpdated,
    utc_now,
)
from herald_shared.publishing import publish_event
from herald_shared.retry import RetryableError
from herald_shared.topology import (
    DELIVERY_REPORTS,
    EXCHANGE,
    MESSAGE_NOTIFICATIONS,
    RECIPIENT_UPDATES,
)
from notification_router import repository, routing
from notification_router.metrics import RouterMetrics
from notification_router.repository import ReportResult

logger = logging.getLogger("notification_router")

# Batches published at once (each waits for its broker confirm); bounds the tasks of a big room.
PUBLISH_CONCURRENCY = 50
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
    push_publisher: RabbitPublisher
    email_publisher: RabbitPublisher
    metrics: RouterMetrics
    publish_timeout: float
    message_times: MessageTimes = field(default_factory=MessageTimes)
    limits: routing.ContentLimits = routing.DEFAULT_LIMITS


@dataclass(frozen=True)
class Subscribers:
    message_created: RabbitSubscriber
    user_updated: RabbitSubscriber
    delivery_reported: RabbitSubscriber


async def route_message(
    event: MessageCreated, deps: RouterDeps, *, correlation_id: str | None = None
) -> None:
    """Decide for every known recipient, commit the ledger, then publish the pending jobs in
    batches (`routing.batch_jobs`).

    Committing before publishing makes a crash in between harmless: the redelivered message
    finds its ledger rows (the insert is a no-op) and publishes the jobs still pending again,
    with the same notification ids, which the senders dedupe (the batches may be cut
    differently: fewer jobs may be pending by then). Recipients without a projection yet are
    left for a retry of the whole message, on which the recipients handled now are no-ops.
    """
    now = utc_now()
    known = await repository.load_recipients(deps.engine, routing.recipients_of(event))
    plan = routing.plan_notifications(event, known, now=now, limits=deps.limits)
    recorded = await repository.record_decisions(deps.engine, event, plan.decisions, now=now)
    deps.message_times.remember(event.message_id, event.timestamp)
    deps.metrics.observe_decisions(event, plan.decisions, recorded.new_recipient_ids, now=now)

    batches = routing.batch_jobs(
        (
            job
            for decision in plan.decisions
            for job in decision.jobs
            if job.notification_id in recorded.pending_notification_ids
        ),
        now=now,
    )
    await _publish_batches(batches, deps, correlation_id)

    # DEBUG like FastStream's own per-message lines: at thousands of messages a second, the
    # metrics tell the story and retries / dead letters are logged louder by the middleware.
    logger.debug(
        "router.message.routed message_id=%s decided=%d new=%d published=%d batches=%d missing=%d",
        event.message_id,
        len(plan.decisions),
        len(recorded.new_recipient_ids),
        sum(len(batch.jobs) for batch in batches),
        len(batches),
        len(plan.missing_recipient_ids),
    )
    if plan.missing_recipient_ids:
        raise RetryableError(
            f"{len(plan.missing_recipient_ids)} recipient(s) have no projection yet"
        )


async def _publish_batches(
    batches: Sequence[routing.JobBatch], deps: RouterDeps, correlation_id: str | None
) -> None:
    for start in range(0, len(batches), PUBLISH_CONCURRENCY):
        try:
            async with asyncio.TaskGroup() as group:
                for batch in batches[start : start + PUBLISH_CONCURRENCY]:
                    group.create_task(_publish_batch(batch, deps, correlation_id))
        except ExceptionGroup as failures:
            # The first failure decides the outcome (a retry); the group would hide its type.
            raise failures.exceptions[0] from failures


async def _publish_batch(
    batch: routing.JobBatch, deps: RouterDeps, correlation_id: str | None
) -> None:
    is_push = isinstance(batch, PushBatchRequested)
    publisher = deps.push_publisher if is_push else deps.email_publisher
    await publish_event(
        publisher, batch, timeout=deps.publish_timeout, correlation_id=correlation_id
    )
    deps.metrics.jobs_published.labels(channel="push" if is_push else "email").inc(len(batch.jobs))


async def project_recipient(event: UserUpdated, deps: RouterDeps) -> None:
    applied = await repository.upsert_recipient(deps.engine, event, now=utc_now())
    deps.metrics.recipient_updates.labels(result="applied" if applied else "stale").inc()
    logger.debug(
        "router.recipient.%s user_id=%s version=%d",
        "updated" if applied else "stale_ignored",
        event.user_id,
        event.version,
    )


async def record_deliveries(event: AnyDeliveryReport, deps: RouterDeps) -> None:
    """Apply what the senders reported: a batch, or a single report (from a sender of an
    earlier version, or replayed from a dead-letter queue), which is a batch of one here."""
    reports = event.reports if isinstance(event, DeliveryBatchReported) else [event]
    results = await repository.apply_delivery_reports(deps.engine, reports, now=utc_now())
    _count_reports(reports, results, deps.metrics)
    await _observe_delivery_latency(reports, results, deps)
    _log_unapplied(reports, results)


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
    # Once per notification: a redelivered or later report is no longer APPLIED.
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
                report.channel, created_at[report.message_id], report.occurred_at
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


def register_handlers(broker: RabbitBroker, deps: RouterDeps) -> Subscribers:
    message_created = broker.subscriber(
        MESSAGE_NOTIFICATIONS.queue,
        EXCHANGE,
        title=f"{MESSAGE_NOTIFICATIONS.name}:consume",
        description=(
            "New chat messages (and their retries): decide, and request the notifications in "
            "batches per message and channel."
        ),
    )
    user_updated = broker.subscriber(
        RECIPIENT_UPDATES.queue,
        EXCHANGE,
        title=f"{RECIPIENT_UPDATES.name}:consume",
        description="User snapshots: keep the recipient projection at the highest version.",
    )
    delivery_reported = broker.subscriber(
        DELIVERY_REPORTS.queue,
        EXCHANGE,
        title=f"{DELIVERY_REPORTS.name}:consume",
        description=(
            "What the senders' providers said, single or in batches: update each "
            "notification's status."
        ),
    )

    @message_created
    async def on_message_created(event: MessageCreated) -> None:
        await route_message(event, deps)

    @user_updated
    async def on_user_updated(event: UserUpdated) -> None:
        await project_recipient(event, deps)

    @delivery_reported
    async def on_delivery_reported(event: AnyDeliveryReport) -> None:
        await record_deliveries(event, deps)

    return Subscribers(message_created, user_updated, delivery_reported)
