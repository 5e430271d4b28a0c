"""One e-mail job from the ledger's point of view: claim, build, send, record, report.

Plain functions and objects, no broker: the handler calls `EmailDeliveries.deliver`, publishes
the report it returns, marks it reported (or, if publishing failed, calls `publishing_failed`) and
raises the error it returns. The ledger and its lease rule are `herald_shared.ledger`'s.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncEngine

from email_sender.backends import EmailBackend, EmailRejected
from email_sender.metrics import EmailMetrics, EmailOutcome
from email_sender.rendering import EmailRenderer, UnrenderableEmail
from email_sender.tables import Failure, email_deliveries
from herald_shared.events import Channel, DeliveryOutcome, DeliveryReported, EmailRequested, utc_now
from herald_shared.ledger import AlreadyFinal, Busy, DeliveryLedger, DeliveryStatus
from herald_shared.retry import DeferredError, PermanentError, RetryableError

logger = logging.getLogger("email_sender.delivery")

# Report ids derive from the notification, so a report published twice (after a crash between
# publishing and recording it) carries the same event_id and is easy to deduplicate.
_REPORT_NAMESPACE = uuid.UUID("0b9f4f7e-4f0e-4a6b-9a59-2d3c1f3e5a10")


@dataclass(frozen=True)
class Outcome:
    """What the handler does next: publish `report` (then mark it reported), raise `error`."""

    report: DeliveryReported | None = None
    error: PermanentError | None = None


def report_for(
    job: EmailRequested, outcome: DeliveryOutcome, reason: str | None = None
) -> DeliveryReported:
    return DeliveryReported(
        event_id=uuid.uuid5(_REPORT_NAMESPACE, f"{job.notification_id}:{outcome}"),
        notification_id=job.notification_id,
        message_id=job.message_id,
        recipient_id=job.recipient_id,
        channel=Channel.EMAIL,
        outcome=outcome,
        reason=reason,
    )


class EmailDeliveries:
    """Sends each notification at most once per successful attempt, recorded in the ledger.

    `lease` is how long a claim protects a send (and then the publishing of its report) in
    progress; it must exceed the longest send (the SMTP deadline), after which a worker that died
    mid-send is taken over.
    """

    def __init__(
        self,
        *,
        engine: AsyncEngine,
        backend: EmailBackend,
        renderer: EmailRenderer,
        metrics: EmailMetrics,
        lease: timedelta,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.engine = engine
        self.ledger = DeliveryLedger(engine, email_deliveries)
        self.backend = backend
        self.renderer = renderer
        self.metrics = metrics
        self.lease = lease
        self.clock = clock

    async def deliver(self, job: EmailRequested, *, claimed_at: datetime) -> Outcome:
        """Send `job` unless it is final or being sent elsewhere; a lease this takes is stamped
        `claimed_at` (what `abandon` needs to drop it)."""
        backend = self.backend.name
        claim = await self.ledger.claim(job, provider=backend, now=claimed_at, lease=self.lease)
        if isinstance(claim, AlreadyFinal):
            return self._already_final(job, claim)
        if isinstance(claim, Busy):
            self.metrics.count(backend, EmailOutcome.IN_PROGRESS)
            wait = max((claim.lease_expires_at - self.clock()).total_seconds(), 0.0)
            raise DeferredError("delivery in progress elsewhere", retry_after=wait)

        try:
            message = self.renderer.render(job)
        except UnrenderableEmail as exc:
            return await self._failed(job, exc.reason, EmailOutcome.INVALID, Failure.INVALID)

        started = time.perf_counter()
        try:
            await self.backend.send(message, notification_id=job.notification_id)
        except EmailRejected as exc:
            return await self._failed(job, exc.reason, EmailOutcome.BOUNCED, Failure.BOUNCED)
        except Exception as exc:
            self.metrics.count(backend, EmailOutcome.RETRY)
            reason = (
                exc.reason
                if isinstance(exc, RetryableError | DeferredError)
                else type(exc).__name__
            )
            try:
                await self.ledger.release(job.notification_id, reason=reason, now=self.clock())
            except Exception:
                # The lease then runs out on its own; the retry waits for it.
                logger.warning(
                    "email.release_failed notification_id=%s", job.notification_id, exc_info=True
                )
            raise
        finally:
            self.metrics.send_seconds.labels(backend=backend).observe(time.perf_counter() - started)

        await self.ledger.finish(
            job.notification_id,
            status=DeliveryStatus.DELIVERED,
            reason=None,
            now=self.clock(),
        )
        self.metrics.count(backend, EmailOutcome.DELIVERED)
        # One line per e-mail is too many under load: successes are in the metrics.
        logger.debug(
            "email.delivered notification_id=%s message_id=%s backend=%s attempt=%d",
            job.notification_id,
            job.message_id,
            backend,
            claim.attempt,
        )
        return Outcome(report=report_for(job, DeliveryOutcome.DELIVERED))

    async def abandon(self, job: EmailRequested, *, claimed_at: datetime) -> None:
        """Best effort, for a handler that was cancelled: drop its lease now."""
        try:
            await self.ledger.abandon(
                job.notification_id,
                claimed_at=claimed_at,
                reason=f"{self.backend.name} send interrupted",
                now=self.clock(),
            )
        except Exception:
            logger.warning(
                "email.abandon_failed notification_id=%s", job.notification_id, exc_info=True
            )

    async def mark_reported(self, job: EmailRequested) -> None:
        await self.ledger.mark_reported(job.notification_id, now=self.clock())

    async def publishing_failed(self, job: EmailRequested) -> None:
        """Best effort: let the retry publish the report at once (else it waits for the lease)."""
        try:
            await self.ledger.unclaim(job.notification_id, now=self.clock())
        except Exception:
            logger.warning(
                "email.unclaim_failed notification_id=%s", job.notification_id, exc_info=True
            )

    async def _failed(
        self, job: EmailRequested, reason: str, outcome: EmailOutcome, failure: Failure
    ) -> Outcome:
        await self.ledger.finish(
            job.notification_id,
            status=DeliveryStatus.FAILED,
            failure=failure,
            reason=reason,
            now=self.clock(),
        )
        self.metrics.count(self.backend.name, outcome)
        logger.warning(
            "email.failed notification_id=%s message_id=%s backend=%s outcome=%s reason=%s",
            job.notification_id,
            job.message_id,
            self.backend.name,
            outcome,
            reason,
        )
        return Outcome(
            report=report_for(job, DeliveryOutcome.FAILED, reason),
            error=PermanentError(f"e-mail failed: {reason}"),
        )

    def _already_final(self, job: EmailRequested, claim: AlreadyFinal) -> Outcome:
        self.metrics.count(self.backend.name, EmailOutcome.DUPLICATE)
        logger.info(
            "email.duplicate notification_id=%s status=%s reported=%s",
            job.notification_id,
            claim.status,
            claim.reported,
        )
        if claim.reported:
            return Outcome()  # a redelivered job: nothing to do, acknowledge it
        # The last attempt recorded the outcome but did not get to publish it: publish it now,
        # and a failure still ends in the dead-letter queue as it would have.
        if claim.status is DeliveryStatus.DELIVERED:
            return Outcome(report=report_for(job, DeliveryOutcome.DELIVERED))
        reason = claim.reason or "failed"
        return Outcome(
            report=report_for(job, DeliveryOutcome.FAILED, reason),
            error=PermanentError(f"e-mail failed: {reason}"),
        )
