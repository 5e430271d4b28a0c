"""One subscriber per queue, each a few lines: parse (FastStream does it from the annotation),
call the repository and the pure routing rules, publish the jobs.

Failures only raise; `herald_shared.retry`'s middleware turns them into delayed retries or dead
letters. Logs carry ids only: never an address, a token or message text.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from faststream.rabbit import RabbitBroker
from faststream.rabbit.publisher import RabbitPublisher
from faststream.rabbit.subscriber import RabbitSubscriber
from sqlalchemy.ext.asyncio import AsyncEngine

from herald_shared.events import (
    DeliveryOutcome,
    DeliveryReported,
    EmailRequested,
    MessageCreated,
    PushRequested,
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

# Jobs published at once (each waits for its broker confirm); bounds the tasks of a big room.
PUBLISH_CONCURRENCY = 50


@dataclass(frozen=True)
class RouterDeps:
    """What the handlers need, built once by `app.build_service` and handed down."""

    engine: AsyncEngine
    push_publisher: RabbitPublisher
    email_publisher: RabbitPublisher
    metrics: RouterMetrics
    publish_timeout: float
    limits: routing.ContentLimits = routing.DEFAULT_LIMITS


@dataclass(frozen=True)
class Subscribers:
    message_created: RabbitSubscriber
    user_updated: RabbitSubscriber
    delivery_reported: RabbitSubscriber


async def route_message(
    event: MessageCreated, deps: RouterDeps, *, correlation_id: str | None = None
) -> None:
    """Decide for every known recipient, commit the ledger, then publish the pending jobs.

    Committing before publishing makes a crash in between harmless: the redelivered message
    finds its ledger rows (the insert is a no-op) and publishes the same jobs again, with the
    same notification ids, which the senders dedupe. Recipients without a projection yet are
    left for a retry of the whole message, on which the recipients handled now are no-ops.
    """
    now = utc_now()
    known = await repository.load_recipients(deps.engine, routing.recipients_of(event))
    plan = routing.plan_notifications(event, known, now=now, limits=deps.limits)
    recorded = await repository.record_decisions(deps.engine, event, plan.decisions, now=now)
    deps.metrics.observe_decisions(event, plan.decisions, recorded.new_recipient_ids, now=now)

    jobs = [
        job
        for decision in plan.decisions
        for job in decision.jobs
        if job.notification_id in recorded.pending_notification_ids
    ]
    await _publish_jobs(jobs, deps, correlation_id)

    # DEBUG like FastStream's own per-message lines: at thousands of messages a second, the
    # metrics tell the story and retries / dead letters are logged louder by the middleware.
    logger.debug(
        "router.message.routed message_id=%s decided=%d new=%d published=%d missing=%d",
        event.message_id,
        len(plan.decisions),
        len(recorded.new_recipient_ids),
        len(jobs),
        len(plan.missing_recipient_ids),
    )
    if plan.missing_recipient_ids:
        raise RetryableError(
            f"{len(plan.missing_recipient_ids)} recipient(s) have no projection yet"
        )


async def _publish_jobs(
    jobs: list[PushRequested | EmailRequested], deps: RouterDeps, correlation_id: str | None
) -> None:
    for start in range(0, len(jobs), PUBLISH_CONCURRENCY):
        try:
            async with asyncio.TaskGroup() as group:
                for job in jobs[start : start + PUBLISH_CONCURRENCY]:
                    group.create_task(_publish_job(job, deps, correlation_id))
        except ExceptionGroup as failures:
            # The first failure decides the outcome (a retry); the group would hide its type.
            raise failures.exceptions[0] from failures


async def _publish_job(
    job: PushRequested | EmailRequested, deps: RouterDeps, correlation_id: str | None
) -> None:
    is_push = isinstance(job, PushRequested)
    publisher = deps.push_publisher if is_push else deps.email_publisher
    await publish_event(publisher, job, timeout=deps.publish_timeout, correlation_id=correlation_id)
    deps.metrics.jobs_published.labels(channel="push" if is_push else "email").inc()


async def project_recipient(event: UserUpdated, deps: RouterDeps) -> None:
    applied = await repository.upsert_recipient(deps.engine, event, now=utc_now())
    deps.metrics.recipient_updates.labels(result="applied" if applied else "stale").inc()
    logger.debug(
        "router.recipient.%s user_id=%s version=%d",
        "updated" if applied else "stale_ignored",
        event.user_id,
        event.version,
    )


async def record_delivery(event: DeliveryReported, deps: RouterDeps) -> None:
    result = await repository.apply_delivery_report(deps.engine, event, now=utc_now())
    deps.metrics.delivery_reports.labels(
        channel=event.channel, outcome=event.outcome, result=result
    ).inc()
    if result is ReportResult.APPLIED and event.outcome is DeliveryOutcome.DELIVERED:
        # Once per notification: a redelivered or later report is no longer APPLIED.
        created_at = await repository.message_created_at(
            deps.engine, message_id=event.message_id, recipient_id=event.recipient_id
        )
        if created_at is not None:
            deps.metrics.observe_delivery(event.channel, created_at, event.occurred_at)
    if result is ReportResult.UNKNOWN:
        logger.debug("router.report.unknown notification_id=%s", event.notification_id)
    elif result is ReportResult.STALE:
        logger.debug(
            "router.report.stale notification_id=%s outcome=%s",
            event.notification_id,
            event.outcome,
        )


def register_handlers(broker: RabbitBroker, deps: RouterDeps) -> Subscribers:
    message_created = broker.subscriber(
        MESSAGE_NOTIFICATIONS.queue,
        EXCHANGE,
        title=f"{MESSAGE_NOTIFICATIONS.name}:consume",
        description="New chat messages (and their retries): decide and request notifications.",
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
        description="What the senders' providers said: update each notification's status.",
    )

    @message_created
    async def on_message_created(event: MessageCreated) -> None:
        await route_message(event, deps)

    @user_updated
    async def on_user_updated(event: UserUpdated) -> None:
        await project_recipient(event, deps)

    @delivery_reported
    async def on_delivery_reported(event: DeliveryReported) -> None:
        await record_delivery(event, deps)

    return Subscribers(message_created, user_updated, delivery_reported)
