"""What every e-mail backend is: one `send` that succeeds, or raises one of two outcomes."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Protocol

from herald_shared.retry import PermanentError

if TYPE_CHECKING:
    from email_sender.rendering import RenderedEmail


class EmailRejected(PermanentError):
    """The provider refused this e-mail for good (an SMTP 5xx): record it failed, never retry.

    `reason` holds codes only, never the server's text (which often quotes the address).
    """


class EmailBackend(Protocol):
    """Delivers one rendered message.

    Raises `herald_shared.retry.RetryableError` for anything transient (try again later) and
    `EmailRejected` for a permanent refusal; it never retries by itself.
    """

    @property
    def name(self) -> str:
        """The backend's label in the ledger and in metrics."""
        ...

    async def send(self, email: RenderedEmail, *, notification_id: uuid.UUID) -> None: ...

    async def close(self) -> None:
        """Release what the backend holds open (at shutdown)."""
        ...
