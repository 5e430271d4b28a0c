"""The digest dispatcher: a periodic task of every router replica that sends the e-mail of each
window that ended.

One pass: `repository.close_due_digests` takes the due digests (SKIP LOCKED, so replicas share
them), composes each with `routing.compose_digest` and records it as `sending` with its e-mail,
in one transaction; then the e-mails are published (waiting for the broker's confirms), and the
digests marked `sent`. A replica that dies between the two leaves its digests `sending`: after
`RESEND_AFTER` another pass publishes the same e-mails again (same notification id), which the
e-mail-sender dedupes. Nothing is sent twice and nothing waiting is lost across restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta

from faststream.rabbit.publisher import RabbitPublisher
from sqlalchemy.ext.asyncio import AsyncEngine

from herald_shared.events import EmailRequested, utc_now
from herald_shared.publishing import publish_events
from herald_shared.retry import describe_error
from notification_router import repository, routing
from notification_router.metrics import RouterMetrics

logger = logging.getLogger("notification_router.digests")

# A digest `sending` for this long was left by a dispatcher that stopped mid-way.
RESEND_AFTER = timedelta(seconds=30)

Clock = Callable[[], datetime]


def _compose(
    window_id: uuid.UUID,
    recipient: routing.Recipient | None,
    waiting: Sequence[EmailRequested],
    read_markers: Mapping[uuid.UUID, datetime],
    *,
    now: datetime,
) -> routing.DigestPlan:
    return routing.compose_digest(window_id, recipient, waiting, read_markers=read_markers, now=now)


class DigestDispatcher:
    def __init__(
        self,
        *,
        engine: AsyncEngine,
        publishers: Mapping[str, RabbitPublisher],
        metrics: RouterMetrics,
        publish_timeout: float,
        interval: float,
        batch_size: int,
        resend_after: timedelta = RESEND_AFTER,
        clock: Clock = utc_now,
    ) -> None:
        self._engine = engine
        self._publishers = publishers
        self._metrics = metrics
        self._publish_timeout = publish_timeout
        self._interval = interval
        self._batch_size = batch_size
        self._resend_after = resend_after
        self._clock = clock
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def dispatch_once(self) -> int:
        """One pass over the due digests, in batches until none is left; how many e-mails were
        published."""
        published = 0
        while True:
            now = self._clock()
            closed = await repository.close_due_digests(
                self._engine,
                now=now,
                limit=self._batch_size,
                resend_after=self._resend_after,
                compose=functools.partial(_compose, now=now),
            )
            if not closed:
                break
            jobs = [digest.job for digest in closed if digest.job is not None]
            await publish_events(
                routing.batch_jobs(jobs, now=now), self._publishers, timeout=self._publish_timeout
            )
            await repository.mark_digests_sent(
                self._engine, [digest.window_id for digest in closed if digest.job is not None]
            )
            self._observe(closed)
            published += len(jobs)
            if len(closed) < self._batch_size:
                break
        backlog = await repository.digest_backlog(self._engine, now=self._clock())
        self._metrics.digest_waiting.set(backlog.waiting_entries)
        self._metrics.digest_overdue.set(backlog.overdue_seconds)
        return published

    def _observe(self, closed: list[repository.ClosedDigest]) -> None:
        metrics = self._metrics
        for digest in closed:
            if digest.resent:
                metrics.digests.labels(outcome="resent").inc()
                continue
            metrics.digests.labels(outcome="sent" if digest.job else "cancelled").inc()
            if digest.job is not None:
                metrics.digest_size.observe(digest.sent)
        reasons = Counter(
            state.removeprefix("cancelled:")
            for digest in closed
            for state in digest.cancelled.values()
        )
        for reason, count in reasons.items():
            metrics.window_entries_cancelled.labels(reason=reason).inc(count)
        logger.debug(
            "router.digests.closed digests=%d sent=%d",
            len(closed),
            sum(1 for digest in closed if digest.job is not None),
        )

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        if self.running:
            return
        self._stopping.clear()
        self._task = asyncio.create_task(self.run(), name="notification-router-digests")

    async def stop(self, timeout: float = 5.0) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping.set()
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def run(self) -> None:
        """A pass every `interval`; no exception ends it (a database or broker outage is tried
        again next time, and what it left `sending` is resent), only `stop()` does."""
        while not self._stopping.is_set():
            try:
                await self.dispatch_once()
            except Exception as exc:
                logger.error("router.digests.dispatch_failed error=%s", describe_error(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=self._interval)
