"""The schedule's dispatcher: a periodic task of every router replica that sends what waited,
for each window that ended (an e-mail digest after the user's delay; the pushes held for quiet
hours or a snooze, one summary per room; one recall per device of what a read made stale).

One pass: `repository.close_due_windows` takes the due windows (SKIP LOCKED, so replicas share
them), composes each (`routing.compose_digest`, `routing.compose_push_summaries`) and records it
as `sending` with its jobs, in one transaction; then the jobs are published (waiting for the
broker's confirms), and the windows marked `sent`. A replica that dies between the two leaves
its windows `sending`: after `RESEND_AFTER` another pass publishes the same jobs again (same
notification ids), which the senders dedupe. Nothing is sent twice and nothing waiting is lost
across restarts.
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from faststream.rabbit.publisher import RabbitPublisher
from sqlalchemy.ext.asyncio import AsyncEngine

from herald_shared.events import Channel, EmailRequested, utc_now
from herald_shared.periodic import PeriodicTask
from herald_shared.publishing import publish_events
from notification_router import repository, routing
from notification_router.metrics import RouterMetrics

logger = logging.getLogger("notification_router.schedule")

# What windows gather: e-mail for a digest, pushes for quiet hours, recalls.
WINDOW_CHANNELS = (str(Channel.EMAIL), str(Channel.PUSH), repository.RECALL_WINDOW)
# A window `sending` for this long was left by a dispatcher that stopped mid-way.
RESEND_AFTER = timedelta(seconds=30)

Clock = Callable[[], datetime]


def compose(
    window_id: uuid.UUID,
    channel: str,
    recipient: routing.Recipient | None,
    entries: Sequence[Any],
    read_markers: Mapping[uuid.UUID, datetime],
    changes: Mapping[uuid.UUID, routing.MessageChange],
    unread: int,
    *,
    now: datetime,
    limits: routing.ContentLimits = routing.DEFAULT_LIMITS,
) -> routing.WindowPlan:
    """What a window that ended sends, from its entries as recorded; `unread`: the recipient's
    unread count of now, the badge of what it pushes."""
    if channel == repository.RECALL_WINDOW:
        recalled = [routing.RecalledPushes.model_validate(entry) for entry in entries]
        return routing.compose_recalls(window_id, recipient, recalled, badge=unread, now=now)
    if channel == Channel.PUSH:
        held = [routing.HeldPushes.model_validate(entry) for entry in entries]
        return routing.compose_push_summaries(
            window_id,
            recipient,
            held,
            read_markers=read_markers,
            now=now,
            limits=limits,
            changes=changes,
            badge=unread,
        )
    emails = [EmailRequested.model_validate(entry) for entry in entries]
    return routing.compose_digest(
        window_id, recipient, emails, read_markers=read_markers, now=now, changes=changes
    )


class WindowDispatcher:
    def __init__(
        self,
        *,
        engine: AsyncEngine,
        publishers: Mapping[str, RabbitPublisher],
        metrics: RouterMetrics,
        publish_timeout: float,
        interval: float,
        batch_size: int,
        limits: routing.ContentLimits = routing.DEFAULT_LIMITS,
        resend_after: timedelta = RESEND_AFTER,
        clock: Clock = utc_now,
    ) -> None:
        self._engine = engine
        self._publishers = publishers
        self._metrics = metrics
        self._publish_timeout = publish_timeout
        self._batch_size = batch_size
        self._limits = limits
        self._resend_after = resend_after
        self._clock = clock
        self._loop = PeriodicTask(
            self.dispatch_once,
            interval=interval,
            name="notification-router-schedule",
            logger=logger,
            failure="router.schedule.dispatch_failed",
        )

    async def dispatch_once(self) -> int:
        """One pass over the due windows, in batches until none is left; how many jobs were
        published."""
        published = 0
        while True:
            now = self._clock()
            closed = await repository.close_due_windows(
                self._engine,
                now=now,
                limit=self._batch_size,
                resend_after=self._resend_after,
                compose=functools.partial(compose, now=now, limits=self._limits),
            )
            if not closed:
                break
            jobs = [job for window in closed for job in window.jobs]
            await publish_events(
                routing.batch_jobs(jobs, now=now), self._publishers, timeout=self._publish_timeout
            )
            await repository.mark_windows_sent(
                self._engine, [window.window_id for window in closed if window.jobs]
            )
            self._observe(closed)
            published += len(jobs)
            if len(closed) < self._batch_size:
                break
        backlog = await repository.window_backlog(self._engine, now=self._clock())
        for channel in WINDOW_CHANNELS:
            self._metrics.notifications_waiting.labels(channel=channel).set(
                backlog.waiting_entries.get(channel, 0)
            )
        self._metrics.window_overdue.set(backlog.overdue_seconds)
        return published

    def _observe(self, closed: list[repository.ClosedWindow]) -> None:
        metrics = self._metrics
        for window in closed:
            if window.resent:
                metrics.windows.labels(channel=window.channel, outcome="resent").inc()
                continue
            outcome = "sent" if window.jobs else "cancelled"
            metrics.windows.labels(channel=window.channel, outcome=outcome).inc()
            if window.jobs:
                metrics.window_size.labels(channel=window.channel).observe(window.sent)
        reasons = Counter(
            (window.channel, state.removeprefix("cancelled:"))
            for window in closed
            for state in window.cancelled.values()
        )
        for (channel, reason), count in reasons.items():
            metrics.window_entries_cancelled.labels(channel=channel, reason=reason).inc(count)
        logger.debug(
            "router.windows.closed windows=%d sent=%d",
            len(closed),
            sum(1 for window in closed if window.jobs),
        )

    @property
    def running(self) -> bool:
        return self._loop.running

    def wake(self, after: float) -> None:
        """A pass `after` seconds from now: a window due sooner than the next poll (a recall)
        goes out when due."""
        self._loop.wake(after)

    def start(self) -> None:
        """A pass every `interval`, in the background, until `stop()`; a failed pass (a
        database or broker outage) is logged and tried again next time, and what it left
        `sending` is resent."""
        self._loop.start()

    async def stop(self, timeout: float = 5.0) -> None:
        await self._loop.stop(timeout)
