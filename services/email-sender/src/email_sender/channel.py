"""What makes the shared sender workflow (`herald_shared.sending`) an e-mail sender: one
backend (SMTP, or files for local runs) behind one gate, and each job rendered into its e-mail
right before it is sent."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from email_sender.backends import EmailBackend, EmailRejected, SmtpConfigurationError
from email_sender.rendering import EmailRenderer, UnrenderableEmail
from email_sender.tables import Failure
from herald_shared.events import Channel, EmailBounced, EmailRequested, Event, address_digest
from herald_shared.resilience import FairLimiter
from herald_shared.retry import DeferredError, RetryableError
from herald_shared.sending import Answer, Gate, Verdict

# Fixed namespace of `EmailBounced` ids (one per bounced notification): never change it.
BOUNCE_NAMESPACE = uuid.UUID("3f7d0c2e-51a4-4f0b-8a77-9c7e1b2d4e60")
# The backend's own timeout bounds a send; the workflow's deadline is only the backstop.
DEADLINE_MARGIN = 1.0


class EmailSending:
    """Render and send one job (`herald_shared.sending.Provider`), the backend's outcome
    classified (the SMTP table in docs/providers.md)."""

    def __init__(self, backend: EmailBackend, renderer: EmailRenderer, *, timeout: float) -> None:
        self.backend = backend
        self.renderer = renderer
        self.deadline = timeout + DEADLINE_MARGIN

    @property
    def name(self) -> str:
        return self.backend.name

    async def send(self, job: EmailRequested) -> Answer:
        try:
            message = self.renderer.render(job)
        except UnrenderableEmail as exc:
            return Answer(Verdict.REJECTED, exc.reason, failure=Failure.INVALID)
        try:
            await self.backend.send(message, notification_id=job.notification_id)
        except EmailRejected as exc:
            # Only a refused recipient (RCPT) is that address's bounce; a refused content fails
            # this e-mail alone.
            failure = Failure.BOUNCED if exc.bounce else Failure.REJECTED
            return Answer(Verdict.REJECTED, exc.reason, failure=failure)
        except SmtpConfigurationError as exc:
            return Answer(Verdict.MISCONFIGURED, exc.reason, retry_after=exc.retry_after)
        except DeferredError as exc:
            return Answer(Verdict.DEFERRED, exc.reason, retry_after=exc.retry_after)
        except RetryableError as exc:
            return Answer(Verdict.TRANSIENT, exc.reason, retry_after=exc.retry_after)
        return Answer(Verdict.ACCEPTED, "accepted")


class EmailChannel:
    """`herald_shared.sending.ChannelSpec` for e-mails."""

    channel = Channel.EMAIL

    def __init__(self, sending: EmailSending, *, max_in_flight: int) -> None:
        self.gate: Gate[EmailRequested] = Gate(sending, FairLimiter(max_in_flight))

    def gate_for(self, job: EmailRequested) -> Gate[EmailRequested]:
        return self.gate

    def unsupported(self, job: EmailRequested) -> str:
        return "no e-mail backend"  # never: every job has the backend

    def ledger_columns(self, job: EmailRequested) -> Mapping[str, Any]:
        return {}

    def gone_failures(self) -> frozenset[str]:
        return frozenset()

    def events_for_failure(
        self, job: EmailRequested, failure: str, reason: str
    ) -> tuple[Event, ...]:
        """A hard bounce is reported to message-service too, which counts them against the
        address (`EMAIL_BOUNCE_LIMIT`); it goes with the failure's report, through the same
        ledger-guarded publication, so a redelivery publishes it again with the same id."""
        if failure != Failure.BOUNCED:
            return ()
        return (
            EmailBounced(
                event_id=uuid.uuid5(BOUNCE_NAMESPACE, str(job.notification_id)),
                user_id=job.recipient_id,
                notification_id=job.notification_id,
                address_digest=address_digest(job.to_address),
                reason=reason[:200],
            ),
        )

    def settings_hint(self, provider: str) -> str:
        return "SMTP_HOST, SMTP_USERNAME, SMTP_PASSWORD, SMTP_TLS and EMAIL_FROM"
