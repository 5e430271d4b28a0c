"""A batch of e-mail jobs from the ledger's point of view: claim, build, send, record, report.

Plain functions and objects, no broker: the handler calls `EmailDeliveries.deliver_batch`,
publishes the reports it returns (`herald_shared.events.batch_reports`), marks them reported (or,
if publishing failed, calls `publishing_failed`) and raises the batch's error
(`herald_shared.retry.batch_error` of the jobs' errors). The ledger and its lease rule are
`herald_shared.ledger`'s; this module makes a few ledger statements per batch rather than per job.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncEngine

from email_sender.backends import EmailBackend, EmailRejected
from email_sender.metrics import EmailMetrics, EmailOutcome
from email_sender.rendering import EmailRenderer, UnrenderableEmail
from email_sender.tables import Failure, email_deliveries
from herald_shared.events import (
    Channel,
    DeliveryOutcome,
    DeliveryReported,
    EmailBatchRequested,
    EmailRequested,
    utc_now,
)
from herald_shared.ledger import AlreadyFinal, Busy, Claimed, DeliveryLedger, DeliveryStatus
from herald_shared.retry import (
    DeferredError,
    ItemError,
    PermanentError,
    RetryableError,
    describe_error,
    is_deferred,
)

logger = logging.getLogger("email_sender.delivery")

# Report ids derive from the notifications, so a report published twice (after a crash between
# publishing and recording it) carries the same event_id and is easy to deduplicate.
_REPORT_NAMESPACE = uuid.UUID("0b9f4f7e-4f0e-4a6b-9a59-2d3c1f3e5a10")


@dataclass(frozen=True)
class Outcome:
    """How one job of a batch ended: `report` to publish (then mark it reported), if any, and
    `error`, the job's part in how the batch ends (`batch_error`)."""

    report: DeliveryReported | None = None
    error: ItemError | None = None


def jobs_of(job: EmailRequested | EmailBatchRequested) -> list[EmailRequested]:
    """The jobs a message carries: a batch's, or a single job (from a router of an earlier
    version, or replayed from the dead-letter queue) as a batch of one."""
    return list(job.jobs) if isinstance(job, EmailBatchRequested) else [job]


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


@dataclass(frozen=True)
class _SendResult:
    """What building and sending one claimed job came to, before it is recorded: a final
    `status` (with its `failure` and `reason`), or none (a transient failure: the claim goes
    back, `reason` says why)."""

    label: EmailOutcome  # the metric's outcome
    status: DeliveryStatus | None
    failure: Failure | None = None
    reason: str | None = None
    error: ItemError | None = None

    @classmethod
    def delivered(cls) -> _SendResult:
        return cls(EmailOutcome.DELIVERED, DeliveryStatus.DELIVERED)

    @classmethod
    def failed(cls, label: EmailOutcome, failure: Failure, reason: str) -> _SendResult:
        return cls(label, DeliveryStatus.FAILED, failure, reason, _permanent(reason))

    @classmethod
    def transient(cls, reason: str, error: RetryableError | DeferredError) -> _SendResult:
        return cls(EmailOutcome.RETRY, None, reason=reason, error=error)

    def outcome_for(self, job: EmailRequested) -> Outcome:
        if self.status is DeliveryStatus.DELIVERED:
            return Outcome(report=report_for(job, DeliveryOutcome.DELIVERED))
        if self.status is DeliveryStatus.FAILED:
            report = report_for(job, DeliveryOutcome.FAILED, self.reason)
            return Outcome(report=report, error=self.error)
        return Outcome(error=self.error)


def _permanent(reason: str) -> PermanentError:
    return PermanentError(f"e-mail failed: {reason}")


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

    async def deliver_batch(
        self, jobs: Sequence[EmailRequested], *, claimed_at: datetime
    ) -> list[Outcome]:
        """The outcome of each of `jobs`, in their order, with its ledger part done (final
        outcomes are committed). Jobs that are final or being sent elsewhere are not sent; the
        others are sent at once (the backend bounds its connections). Leases this takes are
        stamped `claimed_at` (what `abandon` needs to drop them)."""
        claims = await self.ledger.claim_many(
            jobs, provider=self.backend.name, now=claimed_at, lease=self.lease
        )
        outcomes: dict[uuid.UUID, Outcome] = {}
        claimed: list[tuple[EmailRequested, int]] = []
        for job in jobs:
            claim = claims[job.notification_id]
            if isinstance(claim, Claimed):
                claimed.append((job, claim.attempt))
            elif isinstance(claim, AlreadyFinal):
                outcomes[job.notification_id] = self._already_final(job, claim)
            else:
                outcomes[job.notification_id] = self._busy(claim)
        if claimed:
            outcomes.update(await self._send_and_record(claimed))
        return [outcomes[job.notification_id] for job in jobs]

    async def _send_and_record(
        self, claimed: Sequence[tuple[EmailRequested, int]]
    ) -> dict[uuid.UUID, Outcome]:
        """Send the claimed jobs (with their attempt numbers) concurrently, then record the
        outcomes: one statement per distinct final outcome, a release per transient one."""
        results = await asyncio.gather(*(self._send(job) for job, _ in claimed))
        sent = [(job, result) for (job, _), result in zip(claimed, results, strict=True)]
        await self._record(sent)
        outcomes: dict[uuid.UUID, Outcome] = {}
        for (job, attempt), result in zip(claimed, results, strict=True):
            self.metrics.count(self.backend.name, result.label)
            self._log(job, result, attempt)
            outcomes[job.notification_id] = result.outcome_for(job)
        return outcomes

    async def _send(self, job: EmailRequested) -> _SendResult:
        """Build and send one claimed job. Every way it can end is a `_SendResult`, so that one
        job never takes the outcomes of the batch's others with it."""
        try:
            message = self.renderer.render(job)
        except UnrenderableEmail as exc:
            return _SendResult.failed(EmailOutcome.INVALID, Failure.INVALID, exc.reason)

        backend = self.backend.name
        started = time.perf_counter()
        try:
            await self.backend.send(message, notification_id=job.notification_id)
        except EmailRejected as exc:
            return _SendResult.failed(EmailOutcome.BOUNCED, Failure.BOUNCED, exc.reason)
        except (RetryableError, DeferredError) as exc:
            return _SendResult.transient(exc.reason, exc)
        except Exception as exc:
            # Not an answer from the backend (a bug, most likely). Raised, it would leave the
            # outcomes of the batch's other jobs recorded but unpublished under their leases, so
            # the retry would find them `Busy` until the leases ran out. Instead this job is
            # handled as it always was, on its own: its claim is released and it comes back with
            # the batch's retry (deferred, spending no attempt, when the exception says a
            # dependency is unreachable, as the retry middleware would have judged it), while the
            # others are reported now. Described without its text, which may quote an address.
            logger.error(
                "email.backend_error notification_id=%s backend=%s error=%s",
                job.notification_id,
                backend,
                describe_error(exc),
            )
            reason = type(exc).__name__
            kind = DeferredError if is_deferred(exc) else RetryableError
            return _SendResult.transient(reason, kind(f"{backend} error ({reason})"))
        finally:
            self.metrics.send_seconds.labels(backend=backend).observe(time.perf_counter() - started)
        return _SendResult.delivered()

    async def _record(self, sent: Sequence[tuple[EmailRequested, _SendResult]]) -> None:
        """Final outcomes in one statement per (status, failure, reason): on the happy path one
        for the whole batch. Transient ones hand their claims back one by one (rare)."""
        finals: dict[tuple[DeliveryStatus, Failure | None, str | None], list[uuid.UUID]] = {}
        for job, result in sent:
            if result.status is not None:
                key = (result.status, result.failure, result.reason)
                finals.setdefault(key, []).append(job.notification_id)
        for (status, failure, reason), ids in finals.items():
            await self.ledger.finish_many(
                ids, status=status, failure=failure, reason=reason, now=self.clock()
            )
        for job, result in sent:
            if result.status is None:
                await self._release(job, result.reason or "transient failure")

    async def _release(self, job: EmailRequested, reason: str) -> None:
        """Best effort: hand the claim back after a transient failure, so the retry can claim at
        once."""
        try:
            await self.ledger.release(job.notification_id, reason=reason, now=self.clock())
        except Exception:
            # The lease then runs out on its own; the retry waits for it.
            logger.warning(
                "email.release_failed notification_id=%s", job.notification_id, exc_info=True
            )

    async def abandon(self, jobs: Sequence[EmailRequested], *, claimed_at: datetime) -> None:
        """Best effort, for a handler that was cancelled: drop the leases it took at
        `claimed_at` now, in one statement, so the redelivered batch is not `Busy` until they run
        out. Only those leases are dropped, so `jobs` may be the whole batch, claimed or not."""
        try:
            await self.ledger.abandon_many(
                _ids(jobs),
                claimed_at=claimed_at,
                reason=f"{self.backend.name} send interrupted",
                now=self.clock(),
            )
        except Exception:
            logger.warning("email.abandon_failed %s", _batch_ids(jobs), exc_info=True)

    async def mark_reported(self, jobs: Sequence[EmailRequested]) -> None:
        await self.ledger.mark_reported_many(_ids(jobs), now=self.clock())

    async def publishing_failed(self, jobs: Sequence[EmailRequested]) -> None:
        """Best effort: let the retry publish the reports at once (else it waits for the
        leases)."""
        try:
            await self.ledger.unclaim_many(_ids(jobs), now=self.clock())
        except Exception:
            logger.warning("email.unclaim_failed %s", _batch_ids(jobs), exc_info=True)

    def _busy(self, claim: Busy) -> Outcome:
        self.metrics.count(self.backend.name, EmailOutcome.IN_PROGRESS)
        wait = max((claim.lease_expires_at - self.clock()).total_seconds(), 0.0)
        return Outcome(error=DeferredError("delivery in progress elsewhere", retry_after=wait))

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
            report=report_for(job, DeliveryOutcome.FAILED, reason), error=_permanent(reason)
        )

    def _log(self, job: EmailRequested, result: _SendResult, attempt: int) -> None:
        if result.status is DeliveryStatus.DELIVERED:
            # One line per e-mail is too many under load: successes are in the metrics.
            logger.debug(
                "email.delivered notification_id=%s message_id=%s backend=%s attempt=%d",
                job.notification_id,
                job.message_id,
                self.backend.name,
                attempt,
            )
        elif result.status is DeliveryStatus.FAILED:
            logger.warning(
                "email.failed notification_id=%s message_id=%s backend=%s outcome=%s reason=%s",
                job.notification_id,
                job.message_id,
                self.backend.name,
                result.label,
                result.reason,
            )


def _ids(jobs: Sequence[EmailRequested]) -> list[uuid.UUID]:
    return [job.notification_id for job in jobs]


def _batch_ids(jobs: Sequence[EmailRequested]) -> str:
    """The ids a log line about a batch's ledger rows carries."""
    message = jobs[0].message_id if jobs else "-"
    return f"message_id={message} notifications={len(jobs)}"
