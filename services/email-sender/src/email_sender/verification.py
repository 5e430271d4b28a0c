"""The e-mail that verifies an address (`EmailVerificationRequested`, queue
`email_verifications`): rendered here, sent with the notification e-mails' backend, once per
`verification_id`.

Not through the shared sender workflow (`herald_shared.sending`): that one reports every outcome
to the router, whose ledger knows nothing of these e-mails. It keeps the workflow's guarantee all
the same, with the same ledger table (`email_deliveries`, the verification id as notification id
and message id): a redelivered request finds its row final and is acknowledged without a second
e-mail; a transient failure gives the claim back and raises for the shared retry middleware
(`herald_shared.retry`); a refusal for good (an SMTP 5xx, an address that cannot be written) is
recorded failed and not retried. A claim's lease lasts the backend's whole timeout, so a
concurrent copy never sends while the first is still sending (the lease is not renewed). Nothing
but ids is logged: no address, no token.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from email import policy
from email.header import decode_header, make_header
from email.parser import BytesHeaderParser
from email.utils import format_datetime, getaddresses

from jinja2 import Environment

from email_sender import mime
from email_sender.backends import EmailBackend, EmailRejected
from email_sender.rendering import (
    MAX_DISPLAY_NAME_LENGTH,
    RenderedEmail,
    UnrenderableEmail,
    header_text,
    message_id_for,
    template_environment,
)
from email_sender.tables import Failure
from herald_shared.events import EmailVerificationRequested, utc_now
from herald_shared.ledger import AlreadyFinal, Busy, DeliveryLedger, DeliveryStatus
from herald_shared.retry import DeferredError

logger = logging.getLogger("email_sender.verification")

SUBJECT = "Confirm your e-mail address for Herald"
TEXT_TEMPLATE = "verification.txt.j2"
HTML_TEMPLATE = "verification.html.j2"
# The headers of a verification e-mail, in order (then MIME-Version and Content-Type): no
# List-Unsubscribe, as there is no list; it is the one e-mail an unverified address gets.
HEADER_NAMES = ("From", "To", "Subject", "Date", "Message-ID", "Auto-Submitted")
# The shortest wait before a copy that found the request in another worker's hands tries again.
MIN_BUSY_WAIT = 0.5


class VerificationRenderer:
    """Builds the verification e-mail; `sender` is the validated EMAIL_FROM, `url` the link's
    endpoint at message-service (`…/verify-email`)."""

    def __init__(
        self,
        *,
        sender: str,
        message_id_domain: str,
        url: str,
        environment: Environment | None = None,
    ) -> None:
        header = policy.default.header_factory("From", sender)
        self._from_header = f"From: {header}".strip()
        self._envelope_sender = header.addresses[0].addr_spec
        self._message_id_domain = message_id_domain
        self._url = url
        environment = environment or template_environment()
        self._text = environment.get_template(TEXT_TEMPLATE)
        self._html = environment.get_template(HTML_TEMPLATE)

    def link(self, event: EmailVerificationRequested) -> str:
        return f"{self._url}?token={event.token}"  # the token is URL-safe as it is

    def render(
        self, event: EmailVerificationRequested, *, now: datetime | None = None
    ) -> RenderedEmail:
        """The complete message, or `UnrenderableEmail` (never with the offending input in it)."""
        address = event.to_address.strip()
        if mime.ADDRESS.fullmatch(address) is None:
            raise UnrenderableEmail("invalid recipient address") from None
        now = now or utc_now()
        to_name = header_text(event.to_name, limit=MAX_DISPLAY_NAME_LENGTH)
        context = {
            "subject": SUBJECT,
            "recipient_name": to_name,
            "verification_url": self.link(event),
            "expires_at": event.expires_at.strftime("%Y-%m-%d %H:%M UTC"),
        }
        message_id = message_id_for(event.verification_id, self._message_id_domain)
        try:
            headers = [
                self._from_header,
                mime.mailbox("To", to_name, address),
                mime.unstructured("Subject", SUBJECT),
                f"Date: {format_datetime(now)}",
                f"Message-ID: {message_id}",
                "Auto-Submitted: auto-generated",  # RFC 3834: no auto-reply, please
            ]
            data = mime.multipart_alternative(
                headers,
                boundary=f"=_herald_{uuid.uuid4().hex}",
                text=self._text.render(context),
                html=self._html.render(context),
            )
        except (ValueError, UnicodeError):
            raise UnrenderableEmail("message could not be built") from None
        if not _headers_as_built(data, recipient=address):
            raise UnrenderableEmail("message headers did not survive serialisation")
        return RenderedEmail(data, self._envelope_sender, address, message_id)


def _headers_as_built(data: bytes, *, recipient: str) -> bool:
    """What a receiving server parses has exactly the headers set, one recipient and the
    subject (as `rendering.headers_as_built` checks the notification e-mails)."""
    received = BytesHeaderParser(policy=policy.compat32).parsebytes(data)
    recipients = getaddresses(received.get_all("To", []))
    subject = received.get("Subject")
    return (
        tuple(received.keys()) == (*HEADER_NAMES, "MIME-Version", "Content-Type")
        and len(recipients) == 1
        and recipients[0][1] == recipient
        and subject is not None
        and str(make_header(decode_header(subject.replace("\n", "")))) == SUBJECT
    )


@dataclass(frozen=True)
class _Job:
    """A verification e-mail as the ledger sees it (`herald_shared.ledger.DeliveryJob`)."""

    notification_id: uuid.UUID
    message_id: uuid.UUID
    recipient_id: uuid.UUID


class VerificationMailer:
    """Sends each requested verification e-mail once (see the module's docstring)."""

    def __init__(
        self,
        backend: EmailBackend,
        renderer: VerificationRenderer,
        ledger: DeliveryLedger,
        *,
        lease: timedelta,
    ) -> None:
        self.backend = backend
        self.renderer = renderer
        self.ledger = ledger
        self.lease = lease

    async def send(self, event: EmailVerificationRequested) -> DeliveryStatus | None:
        """Send it, unless it was before: the outcome recorded now, or None if there was none to
        record (already sent or refused). Raises for a transient failure (it is retried)."""
        key = event.verification_id
        now = utc_now()
        job = _Job(notification_id=key, message_id=key, recipient_id=event.user_id)
        claim = await self.ledger.claim(job, provider=self.backend.name, now=now, lease=self.lease)
        if isinstance(claim, Busy):
            wait = max(MIN_BUSY_WAIT, (claim.lease_expires_at - now).total_seconds())
            raise DeferredError("verification e-mail held by another worker", retry_after=wait)
        if isinstance(claim, AlreadyFinal):
            if not claim.reported:  # nothing to publish: only the lease to end
                await self.ledger.mark_reported(key, now=now)
            return None
        if event.expires_at <= now:
            # Late (it waited out a long outage): its link would only say "expired".
            return await self._finish(event, DeliveryStatus.FAILED, Failure.INVALID, "expired")
        try:
            email = self.renderer.render(event, now=now)
        except UnrenderableEmail as exc:
            return await self._finish(event, DeliveryStatus.FAILED, Failure.INVALID, exc.reason)
        try:
            await self.backend.send(email, notification_id=key)
        except EmailRejected as exc:
            failure = Failure.BOUNCED if exc.bounce else Failure.REJECTED
            return await self._finish(event, DeliveryStatus.FAILED, failure, exc.reason)
        except Exception:
            # Transient (or an outage of the server): the claim goes back for the retry.
            await self.ledger.release(key, reason="transient failure", now=utc_now())
            raise
        return await self._finish(event, DeliveryStatus.DELIVERED, None, "accepted")

    async def _finish(
        self,
        event: EmailVerificationRequested,
        status: DeliveryStatus,
        failure: Failure | None,
        reason: str,
    ) -> DeliveryStatus:
        now = utc_now()
        key = event.verification_id
        await self.ledger.finish(key, status=status, failure=failure, reason=reason, now=now)
        await self.ledger.mark_reported(key, now=now)
        logger.info(
            "email_sender.verification.%s verification_id=%s user_id=%s reason=%s",
            status,
            key,
            event.user_id,
            reason,
        )
        return status
