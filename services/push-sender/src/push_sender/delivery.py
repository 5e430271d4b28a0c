"""The decisions of push-sender, as plain functions without I/O: given what the ledger says about
a job, or what the provider answered, what to record, what to publish and how the job ends.

`sender.PushSender` performs a `Plan`'s ledger part; the handler publishes its events and raises
its error. Event ids derive from the notification (a batch report's from its outcome and its
notifications), so events published again (after a crash between publishing and recording that
they went out) carry the same ids and deduplicate.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from herald_shared.events import (
    Channel,
    DeliveryOutcome,
    DeliveryReported,
    DeviceInvalidated,
    PushRequested,
)
from herald_shared.ledger import AlreadyFinal, Busy, DeliveryStatus
from herald_shared.retry import DeferredError, PermanentError, RetryableError
from push_sender.metrics import PushOutcome
from push_sender.providers.base import ProviderAnswer, Verdict
from push_sender.resilience import Refusal, RefusalKind
from push_sender.tables import Failure

_EVENT_NAMESPACE = uuid.UUID("5c0f3d2e-8a41-4b7e-9c6d-2f1e0a9b8c73")


@dataclass(frozen=True)
class Plan:
    """What happens to one job.

    `status` (with `failure` and `reason`) is committed to the ledger before anything is
    published; `None` means nothing final to record. Then `invalidation` and `report` are
    published, and `error`, if any, is raised for the shared retry middleware.
    """

    outcome: PushOutcome
    status: DeliveryStatus | None = None
    failure: Failure | None = None
    reason: str | None = None
    invalidation: DeviceInvalidated | None = None
    report: DeliveryReported | None = None
    error: RetryableError | DeferredError | PermanentError | None = None

    @property
    def events(self) -> tuple[DeviceInvalidated | DeliveryReported, ...]:
        return tuple(event for event in (self.invalidation, self.report) if event is not None)


def report_for(
    job: PushRequested, outcome: DeliveryOutcome, reason: str | None = None
) -> DeliveryReported:
    return DeliveryReported(
        event_id=uuid.uuid5(_EVENT_NAMESPACE, f"{job.notification_id}:report:{outcome}"),
        notification_id=job.notification_id,
        message_id=job.message_id,
        recipient_id=job.recipient_id,
        channel=Channel.PUSH,
        outcome=outcome,
        reason=reason,
    )


def invalidation_for(job: PushRequested, reason: str) -> DeviceInvalidated:
    return DeviceInvalidated(
        event_id=uuid.uuid5(_EVENT_NAMESPACE, f"{job.notification_id}:device-invalidated"),
        user_id=job.recipient_id,
        device_id=job.device_id,
        reason=reason,
    )


def refused(reason: str) -> PermanentError:
    return PermanentError(f"push refused: {reason}")


def plan_for_claim(job: PushRequested, claim: AlreadyFinal | Busy, *, now: datetime) -> Plan:
    """A job this worker may not send: a copy of one that ended before (a no-op, or its events go
    out again if they had not), or of one another worker is sending right now (it comes back
    after that worker's lease)."""
    if isinstance(claim, Busy):
        wait = max((claim.lease_expires_at - now).total_seconds(), 0.0)
        return Plan(
            PushOutcome.IN_PROGRESS,
            error=DeferredError("delivery in progress elsewhere", retry_after=wait),
        )
    if claim.reported:
        return Plan(PushOutcome.DUPLICATE)
    # The last attempt recorded the outcome but did not get to publish it: publish it now.
    if claim.status is DeliveryStatus.DELIVERED:
        return Plan(PushOutcome.DUPLICATE, report=report_for(job, DeliveryOutcome.DELIVERED))
    reason = claim.reason or "failed"
    if claim.failure == Failure.TOKEN_INVALID:
        return Plan(
            PushOutcome.DUPLICATE,
            invalidation=invalidation_for(job, reason),
            report=report_for(job, DeliveryOutcome.FAILED, reason),
        )
    return Plan(
        PushOutcome.DUPLICATE,
        report=report_for(job, DeliveryOutcome.FAILED, reason),
        error=refused(reason),
    )


def plan_for_unsupported(job: PushRequested) -> Plan:
    """No provider is configured for the device's platform: reported failed and dead-lettered
    at once (no retry can help), without a ledger row, so that a job replayed from the
    dead-letter queue once the provider is configured is sent as usual."""
    reason = f"unsupported platform {job.platform}"
    return Plan(
        PushOutcome.UNSUPPORTED,
        reason=reason,
        report=report_for(job, DeliveryOutcome.FAILED, reason),
        error=refused(reason),
    )


def plan_for_refusal(refusal: Refusal) -> Plan:
    """The provider may not be called now (its breaker is open, its bulkhead full): the job
    waits in the delayed-retry path without being claimed or spending an attempt."""
    outcome = (
        PushOutcome.BREAKER_OPEN
        if refusal.kind is RefusalKind.BREAKER_OPEN
        else PushOutcome.BULKHEAD_FULL
    )
    return Plan(
        outcome,
        reason=refusal.reason,
        error=DeferredError(refusal.reason, retry_after=refusal.retry_after),
    )


def plan_for_answer(
    job: PushRequested, answer: ProviderAnswer, *, breaker_retry_in: float | None = None
) -> Plan:
    """The provider's answer → ledger, events and outcome (notes/reliability.md's table).

    `breaker_retry_in`: how long the provider's breaker stays open after this answer; a
    configuration problem waits at least that long (it opened the breaker).
    """
    reason = answer.reason
    match answer.verdict:
        case Verdict.ACCEPTED:
            return Plan(
                PushOutcome.DELIVERED,
                status=DeliveryStatus.DELIVERED,
                report=report_for(job, DeliveryOutcome.DELIVERED),
            )
        case Verdict.TOKEN_INVALID:
            # Nothing to retry: the device is gone. The job is done (acknowledged).
            return Plan(
                PushOutcome.TOKEN_INVALID,
                status=DeliveryStatus.FAILED,
                failure=Failure.TOKEN_INVALID,
                reason=reason,
                invalidation=invalidation_for(job, reason),
                report=report_for(job, DeliveryOutcome.FAILED, reason),
            )
        case Verdict.REJECTED:
            return Plan(
                PushOutcome.REJECTED,
                status=DeliveryStatus.FAILED,
                failure=Failure.REJECTED,
                reason=reason,
                report=report_for(job, DeliveryOutcome.FAILED, reason),
                error=refused(reason),
            )
        case Verdict.MISCONFIGURED:
            # Our credentials or permissions, not this push: it waits for the fix (deferred,
            # no attempt spent) instead of burning its retries.
            waits = [w for w in (answer.retry_after, breaker_retry_in) if w is not None]
            return Plan(
                PushOutcome.MISCONFIGURED,
                reason=reason,
                error=DeferredError(
                    f"{reason} (provider configuration)", retry_after=max(waits, default=None)
                ),
            )
        case Verdict.TRANSIENT:
            return Plan(
                PushOutcome.RETRY,
                reason=reason,
                error=RetryableError(reason, retry_after=answer.retry_after),
            )
