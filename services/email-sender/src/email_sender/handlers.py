"""email-sender's subscribers: `email_notifications` and its urgent lane
`email_notifications_urgent` → `Sender.deliver` (the shared sender workflow,
`herald_shared.sending.subscribe`), and their dead-letter hooks.

Failures only raise; `herald_shared.retry`'s middleware turns them into delayed retries or dead
letters of the whole delivery (the jobs it had finished are no-ops when it comes back).
"""

from __future__ import annotations

from faststream.rabbit import RabbitBroker
from faststream.rabbit.publisher import RabbitPublisher
from faststream.rabbit.subscriber import RabbitSubscriber

from herald_shared.events import AnyEmailJob, DeliveriesReported, EmailRequested, email_jobs
from herald_shared.publishing import event_publisher
from herald_shared.retry import DeadLetterHooks
from herald_shared.sending import Sender, subscribe
from herald_shared.topology import (
    EMAIL_DELIVERED,
    EMAIL_FAILED,
    EMAIL_NOTIFICATIONS,
    EMAIL_NOTIFICATIONS_URGENT,
)


def make_publishers(broker: RabbitBroker) -> dict[str, RabbitPublisher]:
    """One documented publisher per routing key email-sender publishes on."""
    return {
        EMAIL_DELIVERED: event_publisher(
            broker,
            DeliveriesReported,
            EMAIL_DELIVERED,
            description="E-mail notifications the mail server accepted.",
        ),
        EMAIL_FAILED: event_publisher(
            broker,
            DeliveriesReported,
            EMAIL_FAILED,
            description=(
                "E-mail notifications that were refused for good or could not be built, or ran "
                "out of retries."
            ),
        ),
    }


def register_handlers(
    broker: RabbitBroker, sender: Sender[EmailRequested], hooks: DeadLetterHooks
) -> tuple[RabbitSubscriber, ...]:
    return (
        subscribe(
            broker,
            sender,
            queue=EMAIL_NOTIFICATIONS,
            event_type=AnyEmailJob,
            jobs_of=email_jobs,
            hooks=hooks,
            description=(
                "Render and send e-mail notifications (of one or more messages), then report "
                "the outcomes."
            ),
        ),
        subscribe(
            broker,
            sender,
            queue=EMAIL_NOTIFICATIONS_URGENT,
            event_type=AnyEmailJob,
            jobs_of=email_jobs,
            hooks=hooks,
            description=(
                "Render and send the urgent lane's e-mail notifications (direct messages and "
                "personal mentions), then report the outcomes."
            ),
        ),
    )
