"""Delivery over SMTP with aiosmtplib, on a small pool of persistent connections.

No retries here: a failure is classified and raised, and the shared retry middleware decides.
The one exception is a kept connection that turns out closed before anything of the message was
sent (the server dropped it while idle): that is the pool's business, not a failed attempt, so the
message goes once more over a new connection.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Callable

import aiosmtplib

from email_sender.backends.base import EmailRejected
from email_sender.backends.smtp_pool import SmtpPool
from email_sender.rendering import RenderedEmail
from email_sender.settings import SmtpConfig
from herald_shared.retry import DeferredError, RetryableError

logger = logging.getLogger("email_sender.smtp")

# 530 authentication required, 534 mechanism too weak, 535 credentials invalid,
# 538 encryption required for the mechanism: our configuration, not the message.
AUTH_CODES = frozenset({530, 534, 535, 538})
_ENHANCED_STATUS = re.compile(r"^\s*([245]\.\d{1,3}\.\d{1,3})\b")


# How long a job waits (at least) while the server refuses our credentials.
CONFIGURATION_RETRY_AFTER = 60.0


class SmtpConfigurationError(DeferredError):
    """The server refuses us, not the message (authentication, missing extension, our host or
    our sender address refused).

    Deferred: the job waits in the delayed-retry path without spending an attempt, so messages
    wait for a fixed configuration instead of being burnt (up to RABBITMQ_MAX_DEFERRALS waits);
    logged at ERROR because an operator has to act. `check` names what to look at.
    """

    def __init__(
        self, reason: str, *, check: str = "SMTP_USERNAME, SMTP_PASSWORD and SMTP_TLS"
    ) -> None:
        super().__init__(reason, retry_after=CONFIGURATION_RETRY_AFTER)
        self.check = check


class ConnectionLostDuringData(RetryableError):
    """The connection broke after DATA began: the server may or may not have the message. Treated
    as a 451 (transient); the stable Message-ID lets a duplicate be recognised."""

    def __init__(self) -> None:
        super().__init__("smtp 451 connection lost during DATA")


def _code_reason(code: int, server_text: str) -> str:
    """`smtp 550 5.1.1`: the reply code and enhanced status code, never the server's free text
    (it often quotes the recipient's address)."""
    enhanced = _ENHANCED_STATUS.match(server_text or "")
    return f"smtp {code} {enhanced.group(1)}" if enhanced else f"smtp {code}"


def classify_smtp_error(
    exc: BaseException,
) -> RetryableError | EmailRejected | SmtpConfigurationError:
    """The outcome of one failed SMTP conversation (docs/providers.md, "SMTP"), the one place
    that decides it.

    Who a 5xx is about depends on the command it answers, so the stage decides, not the code:

    * RCPT TO refused (550, 553, 554…) → `EmailRejected(bounce=True)`: the one reply about the
      recipient's address, the only one counted against it (`EmailBounced`);
    * DATA refused (554 5.7.1 spam, 552 too big…) → `EmailRejected(bounce=False)`: this e-mail
      is refused for good (failed, not retried), but the address took nothing wrong;
    * greeting, EHLO/HELO, STARTTLS, MAIL FROM refused, and 530/534/535/538 or an authentication
      error anywhere → `SmtpConfigurationError` (deferred, the workflow's MISCONFIGURED verdict):
      the server refuses our host, our credentials or our sender (EMAIL_FROM), not this
      recipient; it refuses every e-mail alike until an operator acts, so the jobs wait without
      spending attempts instead of each being reported as its recipient's bounce;
    * 4xx (421, 450, 451, 452…) at any stage, refused or reset connections, timeouts, a
      connection dropped in the middle of DATA → `RetryableError`.
    """
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused) and exc.recipients:
        exc = exc.recipients[0]
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        reason = _code_reason(exc.code, exc.message)
        if isinstance(exc, aiosmtplib.SMTPAuthenticationError) or exc.code in AUTH_CODES:
            return SmtpConfigurationError(f"{reason} (authentication)")
        if not 500 <= exc.code < 600:
            return RetryableError(reason)
        if isinstance(exc, aiosmtplib.SMTPRecipientRefused):
            return EmailRejected(reason, bounce=True)
        if isinstance(exc, aiosmtplib.SMTPDataError):
            return EmailRejected(reason, bounce=False)
        if isinstance(exc, aiosmtplib.SMTPSenderRefused):
            return SmtpConfigurationError(f"{reason} (sender)", check="EMAIL_FROM")
        if isinstance(exc, aiosmtplib.SMTPConnectResponseError):
            return SmtpConfigurationError(
                f"{reason} (greeting)", check="SMTP_HOST and this host's standing at the server"
            )
        if isinstance(exc, aiosmtplib.SMTPHeloError):
            return SmtpConfigurationError(f"{reason} (helo)", check="SMTP_HOST and SMTP_TLS")
        # STARTTLS, RSET, NOOP: the session, not a message.
        return SmtpConfigurationError(f"{reason} (session)", check="SMTP_HOST and SMTP_TLS")
    if isinstance(exc, aiosmtplib.SMTPNotSupported):
        return SmtpConfigurationError("smtp extension not supported by the server")
    if isinstance(exc, aiosmtplib.SMTPServerDisconnected):
        return RetryableError("smtp connection lost")
    if isinstance(exc, TimeoutError):  # aiosmtplib's timeouts and our overall deadline
        return RetryableError("smtp timeout")
    if isinstance(exc, aiosmtplib.SMTPConnectError | OSError):
        cause = exc.__cause__ or exc
        return RetryableError(f"smtp connection failed ({type(cause).__name__})")
    return RetryableError(f"smtp error ({type(exc).__name__})")


def _reusable_after(exc: BaseException) -> bool:
    """After a reply to MAIL, RCPT or DATA, aiosmtplib resets the envelope (RSET) and the session
    goes on; a 421 means the server is closing it, and anything else leaves it in doubt."""
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused) and exc.recipients:
        exc = exc.recipients[0]
    return isinstance(exc, aiosmtplib.SMTPResponseException) and exc.code != 421


class SmtpBackend:
    """Sends over pooled connections; `close` (at shutdown) ends the idle ones politely."""

    name = "smtp"

    def __init__(
        self, settings: SmtpConfig, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        self.pool = SmtpPool(settings, clock=clock)

    async def close(self) -> None:
        await self.pool.close()

    async def send(self, email: RenderedEmail, *, notification_id: uuid.UUID) -> None:
        settings = self.settings
        waiting = True
        try:
            async with asyncio.timeout(settings.timeout), self.pool.slot():
                waiting = False
                await self._send(email)
        except TimeoutError:
            if waiting:  # every connection busy for the whole deadline: not this message's fault
                raise DeferredError("smtp connections busy") from None
            raise RetryableError("smtp timeout") from None
        except ConnectionLostDuringData:
            raise
        except (aiosmtplib.SMTPException, OSError) as exc:
            error = classify_smtp_error(exc)
            if isinstance(error, SmtpConfigurationError):
                logger.error(
                    "email.smtp.configuration_error notification_id=%s host=%s port=%d error=%s "
                    "(check %s)",
                    notification_id,
                    settings.host,
                    settings.port,
                    error.reason,
                    error.check,
                )
            # Not chained: the original's text may quote the server's reply and the address.
            raise error from None

    async def _send(self, email: RenderedEmail) -> None:
        """One message over a pooled connection (within a slot and the deadline)."""
        connection, reused = await self.pool.checkout()
        while True:
            try:
                await connection.sendmail(email.sender, [email.recipient], email.data)
            except aiosmtplib.SMTPServerDisconnected:
                await self.pool.checkin(connection, reusable=False)
                if connection.data_started:
                    raise ConnectionLostDuringData() from None
                if not reused:
                    raise
                # A kept session the server had closed, and nothing of this message sent yet.
                connection, reused = await self.pool.open(), False
                continue
            except BaseException as exc:
                if connection.data_started and isinstance(exc, OSError):
                    await self.pool.checkin(connection, reusable=False)
                    raise ConnectionLostDuringData() from None
                await self.pool.checkin(connection, reusable=_reusable_after(exc))
                raise
            connection.messages += 1
            await self.pool.checkin(connection, reusable=True)
            return
