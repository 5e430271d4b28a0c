"""email-sender's one subscriber: `email_notifications` → an e-mail and a delivery report."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from datetime import datetime
from typing import Any

from faststream.message import StreamMessage
from faststream.rabbit import RabbitBroker
from faststream.rabbit.publisher import RabbitPublisher

from email_sender.delivery import EmailDeliveries, report_for
from herald_shared.events import DeliveryOutcome, DeliveryReported, EmailRequested
from herald_shared.publishing import event_publisher, publish_event
from herald_shared.retry import DeadLetterHooks
from herald_shared.topology import EMAIL_DELIVERED, EMAIL_FAILED, EMAIL_NOTIFICATIONS, EXCHANGE

# The app puts its `EmailDeliveries` into the broker's context under this key.
DELIVERIES_KEY = "email_deliveries"


RETRIES_EXHAUSTED = "retries exhausted"


def register_handlers(
    broker: RabbitBroker, *, publish_timeout: float, dead_letter_hooks: DeadLetterHooks
) -> dict[DeliveryOutcome, RabbitPublisher]:
    """Subscribe to `email_notifications` and register its dead-letter hook; return the report
    publishers by outcome."""
    reports = {
        DeliveryOutcome.DELIVERED: event_publisher(
            broker,
            DeliveryReported,
            EMAIL_DELIVERED,
            description="An e-mail notification was accepted by the mail server.",
        ),
        DeliveryOutcome.FAILED: event_publisher(
            broker,
            DeliveryReported,
            EMAIL_FAILED,
            description="An e-mail notification was refused for good or could not be built.",
        ),
    }

    @broker.subscriber(
        EMAIL_NOTIFICATIONS.queue,
        EXCHANGE,
        title=f"{EMAIL_NOTIFICATIONS.name}:consume",
        description="Render and send one e-mail notification, then report the outcome.",
    )
    async def send_email(job: EmailRequested) -> None:
        # Looked up here rather than injected with `Context(...)`: FastStream resolves those in a
        # worker thread, a thread hop per message.
        deliveries: EmailDeliveries = broker.context.get(DELIVERIES_KEY)
        claimed_at = deliveries.clock()
        delivery = asyncio.ensure_future(deliveries.deliver(job, claimed_at=claimed_at))
        try:
            outcome = await asyncio.shield(delivery)
            if outcome.report is not None:
                try:
                    await publish_event(
                        reports[outcome.report.outcome],
                        outcome.report,
                        timeout=publish_timeout,
                    )
                except Exception:
                    await deliveries.publishing_failed(job)
                    raise
                await deliveries.mark_reported(job)
        except asyncio.CancelledError:
            # Cancelled (connection lost, shutting down) while the mail server may have the
            # message: let that exchange finish and record its outcome, then drop the lease, so
            # the redelivered copy reports the outcome instead of sending the e-mail again.
            await asyncio.shield(_let_finish_then_abandon(deliveries, job, delivery, claimed_at))
            raise
        if outcome.error is not None:
            raise outcome.error

    dead_letter_hooks.register(
        EMAIL_NOTIFICATIONS.name,
        functools.partial(report_given_up, reports[DeliveryOutcome.FAILED], publish_timeout),
    )
    return reports


async def _let_finish_then_abandon(
    deliveries: EmailDeliveries,
    job: EmailRequested,
    delivery: asyncio.Future[Any],
    claimed_at: datetime,
) -> None:
    # The SMTP exchange is bounded by SMTP_TIMEOUT; `deliver` records or releases its outcome.
    with contextlib.suppress(Exception):
        await delivery
    await deliveries.abandon(job, claimed_at=claimed_at)


async def report_given_up(
    failed: RabbitPublisher, publish_timeout: float, message: StreamMessage[Any], error: str
) -> None:
    """The dead-letter hook of `email_notifications`: a job out of retries is reported failed,
    so the router's ledger does not keep it pending. Its own ledger row stays `retrying`, so a job
    replayed from the dead-letter queue is sent (and then reported delivered) as usual."""
    job = EmailRequested.model_validate_json(message.body)
    report = report_for(job, DeliveryOutcome.FAILED, RETRIES_EXHAUSTED)
    await publish_event(
        failed, report, timeout=publish_timeout, correlation_id=message.correlation_id
    )
