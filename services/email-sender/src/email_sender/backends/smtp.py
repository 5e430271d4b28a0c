"""Delivery over SMTP with aiosmtplib.

One connection per e-mail for now: simple and robust (no idle connection to keep alive or to find
dead), at the cost of a handshake (and TLS negotiation) per message. A pool is the next step if
throughput ever needs it. No retries here: a failure is classified and raised, and the shared
retry middleware decides.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from email.message import EmailMessage

import aiosmtplib

from email_sender.backends.base import EmailRejected
from email_sender.settings import SmtpConfig, SmtpTls
from herald_shared.retry import RetryableError

logger = logging.getLogger("email_sender.smtp")

# 530 authentication required, 534 mechanism too weak, 535 credentials invalid,
# 538 encryption required for the mechanism: our configuration, not the message.
AUTH_CODES = frozenset({530, 534, 535, 538})
_ENHANCED_STATUS = re.compile(r"^\s*([245]\.\d{1,3}\.\d{1,3})\b")


class SmtpConfigurationError(RetryableError):
    """The server refuses us, not the message (authentication, missing extension).

    Retryable, so that messages wait for a fixed configuration instead of being burnt; logged at
    ERROR because an operator has to act.
    """


def _code_reason(code: int, server_text: str) -> str:
    """`smtp 550 5.1.1`: the reply code and enhanced status code, never the server's free text
    (it often quotes the recipient's address)."""
    enhanced = _ENHANCED_STATUS.match(server_text or "")
    return f"smtp {code} {enhanced.group(1)}" if enhanced else f"smtp {code}"


def classify_smtp_error(exc: BaseException) -> RetryableError | EmailRejected:
    """The outcome of one failed SMTP conversation (see notes/reliability.md's table):

    * 5xx (550, 553, 554…) → `EmailRejected` (permanent, a bounce);
    * 530/534/535/538 and authentication errors → `SmtpConfigurationError` (retryable);
    * 4xx (421, 450, 451, 452…), refused or reset connections, timeouts, a connection dropped in
      the middle of DATA → `RetryableError`.
    """
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused) and exc.recipients:
        exc = exc.recipients[0]
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        reason = _code_reason(exc.code, exc.message)
        if isinstance(exc, aiosmtplib.SMTPAuthenticationError) or exc.code in AUTH_CODES:
            return SmtpConfigurationError(f"{reason} (authentication)")
        if 500 <= exc.code < 600:
            return EmailRejected(reason)
        return RetryableError(reason)
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


class SmtpBackend:
    name = "smtp"

    def __init__(self, settings: SmtpConfig) -> None:
        self.settings = settings

    async def send(self, message: EmailMessage, *, notification_id: uuid.UUID) -> None:
        settings = self.settings
        sender = message["From"].addresses[0].addr_spec
        recipients = [address.addr_spec for address in message["To"].addresses]
        try:
            async with asyncio.timeout(settings.timeout):
                await aiosmtplib.send(
                    message,
                    sender=sender,
                    recipients=recipients,
                    hostname=settings.host,
                    port=settings.port,
                    username=settings.username,
                    password=(
                        settings.password.get_secret_value()
                        if settings.password is not None
                        else None
                    ),
                    use_tls=settings.tls is SmtpTls.TLS,
                    # STARTTLS exactly when asked for: required then, never attempted otherwise.
                    start_tls=settings.tls is SmtpTls.STARTTLS,
                    timeout=settings.timeout,
                )
        except (aiosmtplib.SMTPException, OSError) as exc:  # TimeoutError is an OSError
            error = classify_smtp_error(exc)
            if isinstance(error, SmtpConfigurationError):
                logger.error(
                    "email.smtp.configuration_error notification_id=%s host=%s port=%d error=%s "
                    "(check SMTP_USERNAME, SMTP_PASSWORD and SMTP_TLS)",
                    notification_id,
                    settings.host,
                    settings.port,
                    error.reason,
                )
            # Not chained: the original's text may quote the server's reply and the address.
            raise error from None
