"""email-sender's own Prometheus series (FastStream's middleware adds the per-message ones)."""

from __future__ import annotations

from enum import StrEnum

from prometheus_client import CollectorRegistry, Counter, Histogram


class EmailOutcome(StrEnum):
    DELIVERED = "delivered"
    BOUNCED = "bounced"  # the recipient's address refused for good (SMTP 5xx to RCPT TO)
    REJECTED = "rejected"  # this e-mail refused for good, not its address (SMTP 5xx to DATA)
    INVALID = "invalid"  # the job cannot become an e-mail
    RETRY = "retry"  # a transient failure; the job will come back
    MISCONFIGURED = "misconfigured"  # the server refuses our credentials: comes back later
    DEFERRED = "deferred"  # not now and not the e-mail's fault (connections busy): comes back
    DUPLICATE = "duplicate"  # already final: acknowledged without sending
    IN_PROGRESS = "in_progress"  # another worker is sending it right now: comes back later


class EmailMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.emails = Counter(
            "herald_emails",
            "E-mail jobs handled, by backend and outcome",
            ["backend", "outcome"],
            registry=registry,
        )
        self.send_seconds = Histogram(
            "herald_email_send_duration_seconds",
            "Duration of one backend send attempt, whatever its result",
            ["backend"],
            registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )

    def count(self, provider: str, outcome: str) -> None:
        """`outcome`: an `EmailOutcome` (the sender workflow's outcome labels); `provider`: the
        backend."""
        self.emails.labels(backend=provider, outcome=outcome).inc()

    def observe_send(self, provider: str, seconds: float) -> None:
        self.send_seconds.labels(backend=provider).observe(seconds)
