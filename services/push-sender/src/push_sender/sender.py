"""One push job end to end, except publishing: claim it in the ledger, call the provider,
record the outcome. The decisions are `delivery`'s; this is their I/O."""

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
from push_sender.providers.base import ProviderAnswer, PushProvider
from push_sender.tables import push_deliveries

logger = logging.getLogger("push_sender.delivery")

# How long a claim outlives the provider's deadline before another worker may take the send over.
LEASE_MARGIN = timedelta(seconds=15)


class PushSender:
    """Calls the provider at most once per attempt of a notification that is not final yet."""

    def __init__(
        self,
        *,
        engine: AsyncEngine,
        provider: PushProvider,
        metrics: PushMetrics,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.engine = engine
        self.ledger = DeliveryLedger(engine, push_deliveries)
        self.provider = provider
        self.metrics = metrics
        self.clock = clock
        self.lease = timedelta(seconds=provider.deadline) + LEASE_MARGIN

    async def deliver(self, job: PushRequested, *, claimed_at: datetime) -> Plan:
        """The plan for `job`, its ledger part done (a final outcome is committed). A lease this
        takes is stamped `claimed_at` (what `abandon` needs to drop it)."""
        provider = self.provider.name
        claim = await self.ledger.claim(
            job,
            provider=provider,
            now=claimed_at,
            lease=self.lease,
            extra={"device_id": job.device_id},
        )
        if not isinstance(claim, Claimed):
            plan = delivery.plan_for_claim(job, claim, now=self.clock())
            self.metrics.count(provider, plan.outcome)
            logger.info(
                "push.%s notification_id=%s message_id=%s provider=%s republish=%s",
                plan.outcome,
                job.notification_id,
                job.message_id,
                provider,
                bool(plan.events),
            )
            return plan

        answer = await self._send(job)
        plan = delivery.plan_for_answer(job, answer)
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
        self._log(job, plan, attempt=claim.attempt)
        return plan

    async def abandon(self, job: PushRequested, *, claimed_at: datetime) -> None:
        """Best effort, for a handler that was cancelled: drop its lease now, so the redelivered
        job is not `Busy` until the lease runs out."""
        try:
            await self.ledger.abandon(
                job.notification_id,
                claimed_at=claimed_at,
                reason=f"{self.provider.name} send interrupted",
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

    async def _send(self, job: PushRequested) -> ProviderAnswer:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.provider.deadline):
                return await self.provider.send(job)
        except TimeoutError:
            return ProviderAnswer.transient(f"{self.provider.name} deadline exceeded")
        except Exception as exc:
            # A bug rather than an answer: free the claim so the retry need not wait for the lease.
            await self._release(job, f"{self.provider.name} error ({type(exc).__name__})")
            raise
        finally:
            self.metrics.provider_seconds.labels(provider=self.provider.name).observe(
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

    def _log(self, job: PushRequested, plan: Plan, *, attempt: int) -> None:
        level = {
            PushOutcome.DELIVERED: logging.INFO,
            PushOutcome.RETRY: logging.WARNING,
            PushOutcome.TOKEN_INVALID: logging.WARNING,
            PushOutcome.REJECTED: logging.WARNING,
            PushOutcome.MISCONFIGURED: logging.ERROR,
        }.get(plan.outcome, logging.INFO)
        hint = (
            " (check FCM_CREDENTIALS_FILE, FCM_PROJECT_ID and FCM_BASE_URL)"
            if plan.outcome is PushOutcome.MISCONFIGURED
            else ""
        )
        logger.log(
            level,
            "push.%s notification_id=%s message_id=%s device_id=%s provider=%s attempt=%d "
            "reason=%s%s",
            plan.outcome,
            job.notification_id,
            job.message_id,
            job.device_id,
            self.provider.name,
            attempt,
            plan.reason or "-",
            hint,
        )
