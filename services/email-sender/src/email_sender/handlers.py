"""email-sender's one subscriber: `email_notifications` → the e-mails of one message's batch and
their delivery reports, one event per outcome.

Failures only raise; `herald_shared.retry`'s middleware turns them into delayed retries or dead
letters, of the batch as a whole (its finished jobs are no-ops when it comes back). Logs carry ids
only: never an address or message text.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from faststream.message import StreamMessage
from faststream.rabbit import RabbitBroker
from faststream.rabbit.publisher import RabbitPublisher
from pydantic import TypeAdapter

from email_sender.delivery import (
    EmailDeliveries,
    Outcome,
    jobs_of,
    report_for,
)
from herald_shared.events import (
    AnyEmailJob,
    DeliveryBatchReported,
    DeliveryOutcome,
    EmailRequested,
    batch_report,
    batch_reports,
)
from herald_shared.publishing import event_publisher, publish_event
from herald_shared.retry import DeadLetterHooks, batch_error
from herald_shared.topology import EMAIL_DELIVERED, EMAIL_FAILED, EMAIL_NOTIFICATIONS, EXCHANGE

# The app puts its `EmailDeliveries` into the broker's context under this key.
DELIVERIES_KEY = "email_deliveries"

RETRIES_EXHAUSTED = "retries exhausted"

_EMAIL_JOB: TypeAdapter[AnyEmailJob] = TypeAdapter(AnyEmailJob)


def register_handlers(
    broker: RabbitBroker, *, publish_timeout: float, dead_letter_hooks: DeadLetterHooks
) -> dict[DeliveryOutcome, RabbitPublisher]:
    """Subscribe to `email_notifications` and register its dead-letter hook; return the report
    publishers by outcome."""
    reports = {
        DeliveryOutcome.DELIVERED: event_publisher(
            broker,
            DeliveryBatchReported,
            EMAIL_DELIVERED,
            description="E-mail notifications of one message that the mail server accepted.",
        ),
        DeliveryOutcome.FAILED: event_publisher(
            broker,
            DeliveryBatchReported,
            EMAIL_FAILED,
            description=(
                "E-mail notifications of one message that were refused for good or could not be"
                " built, or ran out of retries."
            ),
        ),
    }

    @broker.subscriber(
        EMAIL_NOTIFICATIONS.queue,
        EXCHANGE,
        title=f"{EMAIL_NOTIFICATIONS.name}:consume",
        description=(
            "Render and send the e-mail notifications of one message, then report the outcomes."
        ),
    )
    async def send_emails(job: AnyEmailJob) -> None:
        # Looked up here rather than injected with `Context(...)`: FastStream resolves those in a
        # worker thread, a thread hop per message.
        deliveries: EmailDeliveries = broker.context.get(DELIVERIES_KEY)
        await deliver_and_report(
            jobs_of(job), deliveries, reports=reports, publish_timeout=publish_timeout
        )

    dead_letter_hooks.register(
        EMAIL_NOTIFICATIONS.name,
        functools.partial(report_given_up, reports[DeliveryOutcome.FAILED], publish_timeout),
    )
    return reports


async def deliver_and_report(
    jobs: Sequence[EmailRequested],
    deliveries: EmailDeliveries,
    *,
    reports: Mapping[DeliveryOutcome, RabbitPublisher],
    publish_timeout: float,
) -> None:
    """Deliver one batch, publish its reports (one event per outcome), raise how it ends.

    The ledger is committed before the reports are published and the reports before the ack. If
    publishing fails, the batch's retry publishes the same reports (with the same ids) at once;
    after a crash in between, once the dead worker's leases have run out.
    """
    claimed_at = deliveries.clock()
    delivery = asyncio.ensure_future(deliveries.deliver_batch(jobs, claimed_at=claimed_at))
    try:
        outcomes = await asyncio.shield(delivery)
        await _publish_reports(
            jobs, outcomes, deliveries, reports=reports, publish_timeout=publish_timeout
        )
    except asyncio.CancelledError:
        # Cancelled (connection lost, shutting down) while the mail server may have the
        # messages: let those exchanges finish and record their outcomes, then drop the leases,
        # so the redelivered copy reports the outcomes instead of sending the e-mails again.
        await asyncio.shield(_let_finish_then_abandon(deliveries, jobs, delivery, claimed_at))
        raise
    error = batch_error(outcome.error for outcome in outcomes)
    if error is not None:
        raise error


async def _publish_reports(
    jobs: Sequence[EmailRequested],
    outcomes: Sequence[Outcome],
    deliveries: EmailDeliveries,
    *,
    reports: Mapping[DeliveryOutcome, RabbitPublisher],
    publish_timeout: float,
) -> None:
    """Publish the batch's reports, then mark their jobs reported (one statement); if
    publishing fails, drop those jobs' leases (one statement) and raise."""
    reported = [
        (job, outcome.report)
        for job, outcome in zip(jobs, outcomes, strict=True)
        if outcome.report is not None
    ]
    if not reported:
        return
    reported_jobs = [job for job, _ in reported]
    try:
        for event in batch_reports(report for _, report in reported):
            await publish_event(reports[event.outcome], event, timeout=publish_timeout)
    except Exception:
        await deliveries.publishing_failed(reported_jobs)
        raise
    await deliveries.mark_reported(reported_jobs)


async def _let_finish_then_abandon(
    deliveries: EmailDeliveries,
    jobs: Sequence[EmailRequested],
    delivery: asyncio.Future[Any],
    claimed_at: datetime,
) -> None:
    # The SMTP exchanges are bounded by SMTP_TIMEOUT; `deliver_batch` records or releases their
    # outcomes.
    with contextlib.suppress(Exception):
        await delivery
    await deliveries.abandon(jobs, claimed_at=claimed_at)


async def report_given_up(
    failed: RabbitPublisher, publish_timeout: float, message: StreamMessage[Any], error: str
) -> None:
    """The dead-letter hook of `email_notifications`: the jobs of a batch out of retries are
    reported failed, in one event, so the router's ledger does not keep them pending. Those
    delivered before are reported failed too: the router never lets a failure overwrite a
    delivery. Their own ledger rows stay as they are, so a batch replayed from the dead-letter
    queue sends the unsent ones (and then reports them delivered) as usual."""
    jobs = jobs_of(_EMAIL_JOB.validate_json(message.body))
    report = batch_report(
        [report_for(job, DeliveryOutcome.FAILED, RETRIES_EXHAUSTED) for job in jobs]
    )
    await publish_event(
        failed, report, timeout=publish_timeout, correlation_id=message.correlation_id
    )
