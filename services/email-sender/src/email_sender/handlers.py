"""email-sender's subscribers: `email_notifications` and its urgent lane
`email_notifications_urgent` → `Sender.deliver` (the shared sender workflow,
`herald_shared.sending.subscribe`), and their dead-letter hooks; `email_verifications` →
`VerificationMailer.send`.

Failures only raise; `herald_shared.retry`'s middleware turns them into delayed retries or dead
letters of the whole delivery (the jobs it had finished are no-ops when it comes back).
"""

from __future__ import annotations

from faststream.rabbit import RabbitBroker
from faststream.rabbit.publisher import RabbitPublisher
from faststream.rabbit.subscriber import RabbitSubscriber

from email_sender.verification import VerificationMailer
from herald_shared.events import (
    AnyEmailJob,
    DeliveriesReported,
    EmailBounced,
    EmailRequested,
    EmailVerificationRequested,
    email_jobs,
)
from herald_shared.publishing import event_publisher
from herald_shared.retry import DeadLetterHooks
from herald_shared.sending import Sender, subscribe
from herald_shared.topology import (
    EMAIL_BOUNCED,
    EMAIL_DELIVERED,
    EMAIL_FAILED,
    EMAIL_NOTIFICATIONS,
    EMAIL_NOTIFICATIONS_URGENT,
    EMAIL_VERIFICATIONS,
    EXCHANGE,
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
        EMAIL_BOUNCED: event_publisher(
            broker,
            EmailBounced,
            EMAIL_BOUNCED,
            description=(
                "The mail server refused a notification e-mail for good (SMTP 5xx): "
                "message-service counts it against the address."
            ),
        ),
    }


def register_handlers(
    broker: RabbitBroker,
    sender: Sender[EmailRequested],
    hooks: DeadLetterHooks,
    mailer: VerificationMailer,
) -> tuple[RabbitSubscriber, ...]:
    verifications = broker.subscriber(
        EMAIL_VERIFICATIONS.queue,
        EXCHANGE,
        title=f"{EMAIL_VERIFICATIONS.name}:consume",
        description=(
            "Send a user's address the link that verifies it, once per verification_id (no "
            "report: it is no notification)."
        ),
    )

    @verifications
    async def on_verification_requested(event: EmailVerificationRequested) -> None:
        await mailer.send(event)

    return (
        verifications,
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
