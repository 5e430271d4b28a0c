"""push-sender's own Prometheus series (FastStream's middleware adds the per-message ones)."""

from __future__ import annotations

from enum import StrEnum

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class PushOutcome(StrEnum):
    DELIVERED = "delivered"  # accepted by the provider
    # The device's token is dead; the device is invalidated.
    TOKEN_INVALID = "token_invalid"  # noqa: S105 - a label, not a secret
    REJECTED = "rejected"  # refused for good by the provider; dead-lettered
    RETRY = "retry"  # a transient failure; the job comes back
    MISCONFIGURED = "misconfigured"  # our credentials or permissions; the job comes back
    DUPLICATE = "duplicate"  # already final: acknowledged without calling the provider
    IN_PROGRESS = "in_progress"  # another worker is sending it right now: comes back later
    # The provider's circuit breaker is open: comes back later, unsent and without spending an
    # attempt.
    BREAKER_OPEN = "breaker_open"
    DEFERRED = "deferred"  # not now and not the push's fault (a dependency down): comes back
    UNSUPPORTED = "unsupported"  # no provider is configured for the device's platform


class PushMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.pushes = Counter(
            "herald_pushes",
            "Push jobs handled, by provider and outcome",
            ["provider", "outcome"],
            registry=registry,
        )
        self.provider_seconds = Histogram(
            "herald_push_provider_duration_seconds",
            "Duration of one provider call (token included), whatever its answer",
            ["provider"],
            registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.breaker_state = Gauge(
            "herald_push_breaker_state",
            "Circuit breaker of each push provider: 0 closed, 1 half-open, 2 open",
            ["provider"],
            registry=registry,
        )

    def count(self, provider: str, outcome: str) -> None:
        """`outcome`: a `PushOutcome` (the sender workflow's outcome labels)."""
        self.pushes.labels(provider=provider, outcome=outcome).inc()

    def observe_send(self, provider: str, seconds: float) -> None:
        self.provider_seconds.labels(provider=provider).observe(seconds)
