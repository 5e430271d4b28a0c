"""email-sender's one subscriber: `email_notifications` → an e-mail and a delivery report."""

from __future__ import annotations

from typing import Annotated

from faststream import Context
from faststream.rabbit import RabbitBroker
from faststream.rabbit.publisher import RabbitPublisher

from email_sender.delivery import EmailDeliveries
from herald_shared.events import DeliveryOutcome, DeliveryReported, EmailRequested
from herald_shared.publishing import event_publisher, publish_event
from herald_shared.topology import EMAIL_DELIVERED, EMAIL_FAILED, EMAIL_NOTIFICATIONS, EXCHANGE

# The app puts its `EmailDeliveries` into the broker's context under this key.
DELIVERIES_KEY = "email_deliveries"

Deliveries = Annotated[EmailDeliveries, Context(DELIVERIES_KEY)]
CorrelationId = Annotated[str, Context("message.correlation_id")]


def register_handlers(
    broker: RabbitBroker, *, publish_timeout: float
) -> dict[DeliveryOutcome, RabbitPublisher]:
    """Subscribe to `email_notifications`; return the report publishers by outcome."""
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
    async def send_email(
        job: EmailRequested, deliveries: Deliveries, correlation_id: CorrelationId
    ) -> None:
        outcome = await deliveries.deliver(job)
        if outcome.report is not None:
            try:
                await publish_event(
                    reports[outcome.report.outcome],
                    outcome.report,
                    timeout=publish_timeout,
                    correlation_id=correlation_id,
                )
            except Exception:
                await deliveries.publishing_failed(job)
                raise
            await deliveries.mark_reported(job)
        if outcome.error is not None:
            raise outcome.error

    return reports
