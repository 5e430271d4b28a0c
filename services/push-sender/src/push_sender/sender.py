"""One batch of push jobs end to end, except publishing: find the provider of the batch's
platform, get each job past its bulkhead and circuit breaker, claim the jobs in the ledger, call
the provider for each claimed one (concurrently), record the outcomes. The decisions are
`delivery`'s and `resilience`'s; this is their I/O, a few statements per batch rather than per
job."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncEngine

from herald_shared.events import Platform, PushRequested, utc_now
from herald_shared.ledger import AlreadyFinal, Busy, Claimed, DeliveryLedger, DeliveryStatus
from herald_shared.retry import describe_error
from push_sender import delivery
from push_sender.delivery import Plan
from push_sender.metrics import PushMetrics, PushOutcome
from push_sender.providers.base import ProviderAnswer, PushProvider
from push_sender.registry import ProviderRegistry, settings_hint
from push_sender.resilience import GuardedProvider, Pass, Refusal, call_result
from push_sender.tables import Failure, push_deliveries

logger = logging.getLogger("push_sender.delivery")

# How long a claim outlives the provider's deadline before another worker may take the send over.
LEASE_MARGIN = timedelta(seconds=15)
# The `provider` label of jobs for a platform that has no provider.
UNSUPPORTED_LABEL = "none"


def lease_for(provider: PushProvider) -> timedelta:
    """How long a claim of a push to `provider` lasts: its deadline and a margin."""
    return timedelta(seconds=provider.deadline) + LEASE_MARGIN


class PushSender:
    """Calls a job's provider at most once per attempt of a notification that is not final yet,
    and not at all while that provider's breaker is open or its bulkhead full."""

    def __init__(
        self,
        *,
        engine: AsyncEngine,
        providers: ProviderRegistry,
        metrics: PushMetrics,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.engine = engine
        self.ledger = DeliveryLedger(engine, push_deliveries)
        self.providers = providers
        self.metrics = metrics
        self.clock = clock

    async def deliver_batch(
        self, platform: Platform, jobs: Sequence[PushRequested], *, claimed_at: datetime
    ) -> list[Plan]:
        """The plan of each of `jobs` (all for `platform`), in their order, with its ledger part
        done (final outcomes are committed). Leases this takes are stamped `claimed_at` (what
        `abandon` needs to drop them)."""
        guard = self.providers.for_platform(platform)
        if guard is None:
            return [self._unsupported(job) for job in jobs]
        passes: dict[uuid.UUID, Pass] = {}
        try:
            plans, claimed = await self._admit(guard, jobs, passes, claimed_at=claimed_at)
            if claimed:
                plans.update(await self._send_and_record(guard, claimed, passes))
        finally:
            # Each job gives its place back as soon as it no longer needs it; this is for a
            # failure on the way (leaving twice is leaving once).
            for entry in passes.values():
                entry.leave()
        return [plans[job.notification_id] for job in jobs]

    async def _admit(
        self,
        guard: GuardedProvider,
        jobs: Sequence[PushRequested],
        passes: dict[uuid.UUID, Pass],
        *,
        claimed_at: datetime,
    ) -> tuple[dict[uuid.UUID, Plan], list[tuple[PushRequested, int]]]:
        """Get `jobs` past `guard` (their places go in `passes`) and claim those that passed, in
        one statement: the plans of the jobs that will not be sent, and the claimed jobs with
        their attempt numbers.

        A job that passed but is not claimed (final already, or being sent elsewhere) gives its
        place back at once, and the jobs refused for want of it try again (with one more claim
        statement). Otherwise the jobs a batch had finished would take the same places on every
        retry (a bulkhead smaller than the batch, a half-open breaker's one probe) and the rest
        of the batch would never get them.
        """
        plans: dict[uuid.UUID, Plan] = {}
        claimed: list[tuple[PushRequested, int]] = []
        waiting = jobs
        while True:
            admitted, refused = self._enter(guard, waiting, passes)
            not_claimed: dict[uuid.UUID, Plan] = {}
            if admitted:
                newly_claimed, not_claimed = await self._claim(
                    guard, admitted, passes, claimed_at=claimed_at
                )
                claimed.extend(newly_claimed)
                plans.update(not_claimed)
            if not (not_claimed and refused):
                break
            waiting = [job for job, _ in refused]
        for job, refusal in refused:
            plans[job.notification_id] = self._refused(job, guard, refusal)
        return plans, claimed

    @staticmethod
    def _enter(
        guard: GuardedProvider, jobs: Sequence[PushRequested], passes: dict[uuid.UUID, Pass]
    ) -> tuple[list[PushRequested], list[tuple[PushRequested, Refusal]]]:
        """Each of `jobs` through `guard`, in order: those that passed (their places go in
        `passes`) and those refused, with why."""
        admitted: list[PushRequested] = []
        refused: list[tuple[PushRequested, Refusal]] = []
        for job in jobs:
            entry = guard.enter()
            if isinstance(entry, Refusal):
                refused.append((job, entry))
            else:
                passes[job.notification_id] = entry
                admitted.append(job)
        return admitted, refused

    async def _claim(
        self,
        guard: GuardedProvider,
        jobs: Sequence[PushRequested],
        passes: Mapping[uuid.UUID, Pass],
        *,
        claimed_at: datetime,
    ) -> tuple[list[tuple[PushRequested, int]], dict[uuid.UUID, Plan]]:
        """Claim `jobs` in one statement: the claimed ones with their attempt numbers, and the
        plans of the others, whose places go back at once."""
        claims = await self.ledger.claim_many(
            jobs,
            provider=guard.name,
            now=claimed_at,
            lease=lease_for(guard.provider),
            extra=lambda job: {"device_id": job.device_id},
        )
        claimed: list[tuple[PushRequested, int]] = []
        not_claimed: dict[uuid.UUID, Plan] = {}
        for job in jobs:
            claim = claims[job.notification_id]
            if isinstance(claim, Claimed):
                claimed.append((job, claim.attempt))
            else:
                passes[job.notification_id].leave()
                not_claimed[job.notification_id] = self._not_claimed(
                    job, claim, provider=guard.name
                )
        return claimed, not_claimed

    async def _send_and_record(
        self,
        guard: GuardedProvider,
        claimed: Sequence[tuple[PushRequested, int]],
        passes: Mapping[uuid.UUID, Pass],
    ) -> dict[uuid.UUID, Plan]:
        """Send the claimed jobs (with their attempt numbers) at once, then record the outcomes:
        one statement per distinct final outcome, a release per transient one."""
        answers = await asyncio.gather(
            *(self._call(guard, job, passes[job.notification_id]) for job, _ in claimed)
        )
        breaker_retry_in = guard.breaker.retry_in()
        plans = {
            job.notification_id: delivery.plan_for_answer(
                job, answer, breaker_retry_in=breaker_retry_in
            )
            for (job, _), answer in zip(claimed, answers, strict=True)
        }
        await self._record(plans)
        for job, attempt in claimed:
            plan = plans[job.notification_id]
            self.metrics.count(guard.name, plan.outcome)
            probe = passes[job.notification_id].probe
            self._log(job, plan, provider=guard.name, attempt=attempt, probe=probe)
        return plans

    async def _call(
        self, guard: GuardedProvider, job: PushRequested, entry: Pass
    ) -> ProviderAnswer:
        """Send `job` and tell the breaker how the provider did; its place goes back however the
        call ends (cancelled without an answer: a probe's turn goes to the next job)."""
        try:
            answer = await self._send(guard.provider, job)
            entry.record(call_result(answer.verdict))
            return answer
        finally:
            entry.leave()

    async def _send(self, provider: PushProvider, job: PushRequested) -> ProviderAnswer:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(provider.deadline):
                return await provider.send(job)
        except TimeoutError:
            return ProviderAnswer.transient(f"{provider.name} deadline exceeded")
        except Exception as exc:
            # A bug rather than an answer. Raised, it would take the outcomes of the batch's other
            # jobs with it (recorded but unpublished, they would wait for their leases to run
            # out); as a transient answer its claim is released, the others are reported, and
            # the batch's retry sends this job again (and dead-letters it if the bug persists).
            logger.error(
                "push.provider_error notification_id=%s provider=%s error=%s",
                job.notification_id,
                provider.name,
                describe_error(exc),
            )
            return ProviderAnswer.transient(f"{provider.name} error ({type(exc).__name__})")
        finally:
            self.metrics.provider_seconds.labels(provider=provider.name).observe(
                time.perf_counter() - started
            )

    async def _record(self, plans: Mapping[uuid.UUID, Plan]) -> None:
        """Final outcomes in one statement per (status, failure, reason): on the happy path one
        for the whole batch. Transient ones hand their claims back, one by one (rare)."""
        finals: dict[tuple[DeliveryStatus, Failure | None, str | None], list[uuid.UUID]] = {}
        transients: list[tuple[uuid.UUID, str]] = []
        for notification_id, plan in plans.items():
            if plan.status is None:
                transients.append((notification_id, plan.reason or "transient failure"))
            else:
                finals.setdefault((plan.status, plan.failure, plan.reason), []).append(
                    notification_id
                )
        for (status, failure, reason), ids in finals.items():
            await self.ledger.finish_many(
                ids, status=status, failure=failure, reason=reason, now=self.clock()
            )
        for notification_id, reason in transients:
            await self._release(notification_id, reason)

    def _unsupported(self, job: PushRequested) -> Plan:
        plan = delivery.plan_for_unsupported(job)
        self.metrics.count(UNSUPPORTED_LABEL, plan.outcome)
        logger.warning(
            "push.unsupported notification_id=%s message_id=%s platform=%s",
            job.notification_id,
            job.message_id,
            job.platform,
        )
        return plan

    def _refused(self, job: PushRequested, guard: GuardedProvider, refusal: Refusal) -> Plan:
        # Neither claimed nor sent: nothing stays leased while the job waits.
        plan = delivery.plan_for_refusal(refusal)
        self.metrics.count(guard.name, plan.outcome)
        logger.info(
            "push.%s notification_id=%s provider=%s retry_after=%s",
            plan.outcome,
            job.notification_id,
            guard.name,
            "-" if refusal.retry_after is None else f"{refusal.retry_after:.1f}s",
        )
        return plan

    def _not_claimed(
        self, job: PushRequested, claim: AlreadyFinal | Busy, *, provider: str
    ) -> Plan:
        plan = delivery.plan_for_claim(job, claim, now=self.clock())
        self.metrics.count(provider, plan.outcome)
        logger.debug(
            "push.%s notification_id=%s message_id=%s provider=%s republish=%s",
            plan.outcome,
            job.notification_id,
            job.message_id,
            provider,
            bool(plan.events),
        )
        return plan

    async def abandon(
        self, platform: Platform, jobs: Sequence[PushRequested], *, claimed_at: datetime
    ) -> None:
        """Best effort, for a handler that was cancelled: drop the leases it took at `claimed_at`
        now, so the redelivered batch is not `Busy` until they run out. Only those leases are
        dropped, so `jobs` may be the whole batch, claimed or not."""
        guard = self.providers.for_platform(platform)
        name = guard.name if guard is not None else "push"
        try:
            await self.ledger.abandon_many(
                [job.notification_id for job in jobs],
                claimed_at=claimed_at,
                reason=f"{name} send interrupted",
                now=self.clock(),
            )
        except Exception:
            logger.warning("push.abandon_failed %s", _ids_of(jobs), exc_info=True)

    async def mark_reported(self, jobs: Sequence[PushRequested]) -> None:
        await self.ledger.mark_reported_many(
            [job.notification_id for job in jobs], now=self.clock()
        )

    async def publishing_failed(self, jobs: Sequence[PushRequested]) -> None:
        """Best effort: let the retry publish the events at once (else it waits for the leases)."""
        try:
            await self.ledger.unclaim_many([job.notification_id for job in jobs], now=self.clock())
        except Exception:
            logger.warning("push.unclaim_failed %s", _ids_of(jobs), exc_info=True)

    async def _release(self, notification_id: uuid.UUID, reason: str) -> None:
        try:
            await self.ledger.release(notification_id, reason=reason, now=self.clock())
        except Exception:
            # The lease then runs out on its own; the retry waits for it.
            logger.warning("push.release_failed notification_id=%s", notification_id, exc_info=True)

    def _log(
        self, job: PushRequested, plan: Plan, *, provider: str, attempt: int, probe: bool
    ) -> None:
        level = {
            # One line per push is thousands a second under load: successes are in the metrics.
            PushOutcome.DELIVERED: logging.DEBUG,
            PushOutcome.RETRY: logging.WARNING,
            PushOutcome.TOKEN_INVALID: logging.WARNING,
            PushOutcome.REJECTED: logging.WARNING,
            PushOutcome.MISCONFIGURED: logging.ERROR,
        }.get(plan.outcome, logging.INFO)
        hint = (
            f" (the provider refuses our credentials: its breaker is open and its pushes wait; "
            f"check {settings_hint(provider)})"
            if plan.outcome is PushOutcome.MISCONFIGURED
            else ""
        )
        logger.log(
            level,
            "push.%s notification_id=%s message_id=%s device_id=%s provider=%s attempt=%d "
            "probe=%s reason=%s%s",
            plan.outcome,
            job.notification_id,
            job.message_id,
            job.device_id,
            provider,
            attempt,
            probe,
            plan.reason or "-",
            hint,
        )


def _ids_of(jobs: Sequence[PushRequested]) -> str:
    """The ids a log line about a batch's ledger rows carries."""
    message = jobs[0].message_id if jobs else "-"
    return f"message_id={message} notifications={len(jobs)}"
