"""One push job end to end, except publishing: find the provider of the job's platform, get past
its bulkhead and circuit breaker, claim the job in the ledger, call the provider, record the
outcome. The decisions are `delivery`'s and `resilience`'s; this is their I/O."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncEngine

from herald_shared.events import PushRequested, utc_now
from herald_shared.ledger import Claimed, DeliveryLedger
from push_sender import delivery
from push_sender.delivery import Plan
from push_sender.metrics import PushMetrics, PushOutcome
from push_sender.providers.base import ProviderAnswer
from push_sender.registry import ProviderRegistry, settings_hint
from push_sender.resilience import CallResult, GuardedProvider, Pass, Refusal, call_result
from push_sender.tables import push_deliveries

logger = logging.getLogger("push_sender.delivery")

# How long a claim outlives the provider's deadline before another worker may take the send over.
LEASE_MARGIN = timedelta(seconds=15)
# The `provider` label of jobs for a platform that has no provider.
UNSUPPORTED_LABEL = "none"


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

    def lease_for(self, job: PushRequested) -> timedelta:
        """How long a claim of `job` lasts: its provider's deadline and a margin."""
        guard = self.providers.for_platform(job.platform)
        deadline = guard.provider.deadline if guard is not None else 0.0
        return timedelta(seconds=deadline) + LEASE_MARGIN

    async def deliver(self, job: PushRequested, *, claimed_at: datetime) -> Plan:
        """The plan for `job`, its ledger part done (a final outcome is committed). A lease this
        takes is stamped `claimed_at` (what `abandon` needs to drop it)."""
        guard = self.providers.for_platform(job.platform)
        if guard is None:
            plan = delivery.plan_for_unsupported(job)
            self.metrics.count(UNSUPPORTED_LABEL, plan.outcome)
            logger.warning(
                "push.unsupported notification_id=%s message_id=%s platform=%s",
                job.notification_id,
                job.message_id,
                job.platform,
            )
            return plan
        entry = guard.enter()
        if isinstance(entry, Refusal):
            # Neither claimed nor sent: nothing stays leased while the job waits.
            plan = delivery.plan_for_refusal(entry)
            self.metrics.count(guard.name, plan.outcome)
            logger.info(
                "push.%s notification_id=%s provider=%s retry_after=%s",
                plan.outcome,
                job.notification_id,
                guard.name,
                "-" if entry.retry_after is None else f"{entry.retry_after:.1f}s",
            )
            return plan
        try:
            return await self._deliver(job, guard, entry, claimed_at=claimed_at)
        finally:
            entry.leave()

    async def _deliver(
        self, job: PushRequested, guard: GuardedProvider, entry: Pass, *, claimed_at: datetime
    ) -> Plan:
        provider = guard.name
        claim = await self.ledger.claim(
            job,
            provider=provider,
            now=claimed_at,
            lease=self.lease_for(job),
            extra={"device_id": job.device_id},
        )
        if not isinstance(claim, Claimed):
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

        try:
            answer = await self._send(guard, job)
        except Exception:
            entry.record(CallResult.FAILURE)
            raise
        entry.record(call_result(answer.verdict))
        plan = delivery.plan_for_answer(job, answer, breaker_retry_in=guard.breaker.retry_in())
        if plan.status is not None:
            await self.ledger.finish(
                job.notification_id,
                status=plan.status,
                failure=plan.failure,
                reason=plan.reason,
                now=self.clock(),
            )
        else:
            await self._release(job, answer.reason)
        self.metrics.count(provider, plan.outcome)
        self._log(job, plan, provider=provider, attempt=claim.attempt, probe=entry.probe)
        return plan

    async def abandon(self, job: PushRequested, *, claimed_at: datetime) -> None:
        """Best effort, for a handler that was cancelled: drop its lease now, so the redelivered
        job is not `Busy` until the lease runs out."""
        guard = self.providers.for_platform(job.platform)
        name = guard.name if guard is not None else "push"
        try:
            await self.ledger.abandon(
                job.notification_id,
                claimed_at=claimed_at,
                reason=f"{name} send interrupted",
                now=self.clock(),
            )
        except Exception:
            logger.warning(
                "push.abandon_failed notification_id=%s", job.notification_id, exc_info=True
            )

    async def mark_reported(self, job: PushRequested) -> None:
        await self.ledger.mark_reported(job.notification_id, now=self.clock())

    async def publishing_failed(self, job: PushRequested) -> None:
        """Best effort: let the retry publish the events at once (else it waits for the lease)."""
        try:
            await self.ledger.unclaim(job.notification_id, now=self.clock())
        except Exception:
            logger.warning(
                "push.unclaim_failed notification_id=%s", job.notification_id, exc_info=True
            )

    async def _send(self, guard: GuardedProvider, job: PushRequested) -> ProviderAnswer:
        provider = guard.provider
        started = time.perf_counter()
        try:
            async with asyncio.timeout(provider.deadline):
                return await provider.send(job)
        except TimeoutError:
            return ProviderAnswer.transient(f"{provider.name} deadline exceeded")
        except Exception as exc:
            # A bug rather than an answer: free the claim so the retry need not wait for the lease.
            await self._release(job, f"{provider.name} error ({type(exc).__name__})")
            raise
        finally:
            self.metrics.provider_seconds.labels(provider=provider.name).observe(
                time.perf_counter() - started
            )

    async def _release(self, job: PushRequested, reason: str) -> None:
        try:
            await self.ledger.release(job.notification_id, reason=reason, now=self.clock())
        except Exception:
            # The lease then runs out on its own; the retry waits for it.
            logger.warning(
                "push.release_failed notification_id=%s", job.notification_id, exc_info=True
            )

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
