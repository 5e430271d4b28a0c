"""What every push provider is: one `send` that returns the provider's answer, classified."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from herald_shared.events import PushRequested


class Verdict(StrEnum):
    """The provider's answer, reduced to what push-sender does about it
    (see docs/providers.md, "Push: the five verdicts")."""

    ACCEPTED = "accepted"  # delivered to the provider: record delivered, report
    # The device's token is dead: invalidate it, report, no retry.
    TOKEN_INVALID = "token_invalid"  # noqa: S105 - a label, not a secret
    REJECTED = "rejected"  # this push is refused for good: report failed, dead-letter
    TRANSIENT = "transient"  # throttled, provider down, timeout: retry later
    MISCONFIGURED = "misconfigured"  # our credentials or permissions: retry later, alert


@dataclass(frozen=True)
class ProviderAnswer:
    """`reason` is safe to log, to store and to publish: codes only, never a token, a text or
    the provider's free-form message."""

    verdict: Verdict
    reason: str
    # Seconds the provider asked us to wait (Retry-After), if it said.
    retry_after: float | None = None

    @classmethod
    def accepted(cls, reason: str = "accepted") -> ProviderAnswer:
        return cls(Verdict.ACCEPTED, reason)

    @classmethod
    def transient(cls, reason: str, retry_after: float | None = None) -> ProviderAnswer:
        return cls(Verdict.TRANSIENT, reason, retry_after)


class PushProvider(Protocol):
    """Sends one push and classifies the answer.

    It never retries by itself (except one access-token refresh) and never raises for an answer
    of the provider: timeouts and connection errors are `TRANSIENT` answers too. An exception
    means a bug, which the sender logs and treats as a `TRANSIENT` answer.
    """

    @property
    def name(self) -> str:
        """The provider's label in the ledger, in metrics and in logs."""
        ...

    @property
    def deadline(self) -> float:
        """The longest one `send` may take, in seconds (the ledger's lease is based on it)."""
        ...

    async def send(self, job: PushRequested) -> ProviderAnswer: ...

    async def aclose(self) -> None:
        """Release connections; called once at shutdown."""
        ...
