"""What every e-mail backend is: one `send` that succeeds, or raises one of two outcomes."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Protocol

from herald_shared.retry import PermanentError

if TYPE_CHECKING:
    from email_sender.rendering import RenderedEmail


class EmailRejected(PermanentError):
    """The provider refused this e-mail for good (an SMTP 5xx): record it failed, never retry.

    `bounce`: the refusal is about the recipient's address (SMTP: its RCPT TO refused), so it
    counts against the address (`EmailBounced`); otherwise only this e-mail is refused (its
    content, at DATA). `reason` holds codes only, never the server's text (which often quotes
    the address).
    """

    def __init__(self, reason: str, *, bounce: bool) -> None:
        super().__init__(reason)
        self.bounce = bounce


class EmailBackend(Protocol):
    """Delivers one rendered message.

    Raises `herald_shared.retry.RetryableError` for anything transient (try again later),
    `EmailRejected` for a permanent refusal, and a `herald_shared.retry.DeferredError` (such as
    `SmtpConfigurationError`) for a refusal of our own set-up; it never retries by itself.
    """

    @property
    def name(self) -> str:
        """The backend's label in the ledger and in metrics."""
        ...

    async def send(self, email: RenderedEmail, *, notification_id: uuid.UUID) -> None: ...

    async def close(self) -> None:
        """Release what the backend holds open (at shutdown)."""
        ...
