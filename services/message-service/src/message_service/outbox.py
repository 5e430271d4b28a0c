"""The transactional outbox relay: the only bridge between this service's database and RabbitMQ.

Use cases stage events as outbox rows in their own transaction (`repository.add_outbox_event`).
After a commit that wrote one, `session_scope` nudges the relay; the relay also wakes every
`interval` for anything left over. Each cycle claims a batch of pending rows in created order
(PostgreSQL: `FOR UPDATE SKIP LOCKED`, so replicas never publish the same row concurrently),
publishes them all at once with their confirms in flight together (a confirm at a time would cap
the relay at one round trip per event), marks those confirmed published and commits. A failed
publish leaves its row pending and, if the broker failed, backs off; nothing ever waits for
RabbitMQ inside an HTTP request. A row that cannot be published through no fault of the broker
(not a valid event, or a type this version has no publisher for: a newer replica's relay may
have one during a rolling upgrade) is neither dropped nor retried at every cycle: it is held
(`retry_at`) for a while before it is claimed again, so that such rows never fill every batch
and hold back the ones behind them. Consumers do not depend on the order of events (a user's
snapshots carry a version, the router keeps the highest). A publish that timed out may still have
reached the broker, so delivery is at least once and consumers deduplicate on the event id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

import pydantic
from faststream.rabbit.publisher import RabbitPublisher
from prometheus_client import CollectorRegistry, Counter, Gauge
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from herald_shared.database import autocommit
from herald_shared.events import EVENT_ADAPTER, utc_now
from herald_shared.logs import ids_from_body, log_context
from herald_shared.publishing import publish_json
from herald_shared.retry import describe_error
from herald_shared.tracing import continued_trace
from message_service import repository
from message_service.repository import PendingEvent

logger = logging.getLogger("message_service.outbox")

# Published rows are purged at most this often.
PURGE_EVERY = timedelta(seconds=60)
# The pending-rows gauges are read from the database at most this often (a count over the
# pending rows, not something to do after every message).
GAUGES_EVERY = timedelta(seconds=5)
# A row that failed through no fault of the broker is not claimed again for this long, doubled
# at each attempt up to the maximum (a newer replica still gets to publish a type this version
# does not know within minutes).
UNPUBLISHABLE_HOLD = timedelta(seconds=30)
UNPUBLISHABLE_MAX_HOLD = timedelta(minutes=5)


def unpublishable_hold(attempts: int) -> timedelta:
    """How long a row that failed through no fault of the broker, after `attempts` earlier
    attempts, is held before it is claimed again."""
    return min(UNPUBLISHABLE_HOLD * (1 << min(max(attempts, 0), 16)), UNPUBLISHABLE_MAX_HOLD)


class Nudge(Protocol):
    def __call__(self) -> None: ...


@asynccontextmanager
async def session_scope(
    sessions: async_sessionmaker[AsyncSession], nudge: Nudge
) -> AsyncIterator[AsyncSession]:
    """A session for one use case; if it wrote to the outbox, the relay is nudged once the session
    is closed (so after the commit, and never on an error)."""
    async with sessions() as session:
        yield session
        written = session.info.pop(repository.OUTBOX_WRITTEN, False)
    if written:
        nudge()


class OutboxMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.published = Counter(
            "herald_message_outbox_published",
            "Outbox events published and confirmed by RabbitMQ.",
            ["event_type"],
            registry=registry,
        )
        self.failed = Counter(
            "herald_message_outbox_publish_failures",
            "Outbox publish attempts that failed (the row stays pending and is retried).",
            ["event_type"],
            registry=registry,
        )
        # Held rows (`unpublishable_hold`) count as pending in both gauges: they are not
        # published, and a stuck one shows here as an oldest pending age that keeps growing.
        self.pending = Gauge(
            "herald_message_outbox_pending",
            "Outbox rows not yet published.",
            registry=registry,
        )
        self.oldest_pending_age = Gauge(
            "herald_message_outbox_oldest_pending_age_seconds",
            "Age of the oldest unpublished outbox row (0 when none).",
            registry=registry,
        )


@dataclass(frozen=True)
class _Failure:
    error: str  # safe to log and store
    # True: the broker failed (back off; the row is retried in its turn); False: the row itself
    # cannot be published, and is held (`unpublishable_hold`) so as not to block the ones
    # behind it.
    broker: bool


@dataclass(frozen=True)
class BatchResult:
    claimed: int
    published: int
    failed: bool


class OutboxRelay:
    def __init__(
        self,
        *,
        engine: AsyncEngine,
        publishers: Mapping[str, RabbitPublisher],
        metrics: OutboxMetrics,
        publish_timeout: float,
        batch_size: int = 100,
        interval: float = 1.0,
        max_backoff: float = 30.0,
        retention: float = 86400.0,
    ) -> None:
        self._engine = engine
        self._publishers = dict(publishers)
        self._metrics = metrics
        self._publish_timeout = publish_timeout
        self._batch_size = batch_size
        self._interval = interval
        self._max_backoff = max(max_backoff, interval)
        self._retention = timedelta(seconds=retention)
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_purge = utc_now() - PURGE_EVERY
        self._last_gauges = utc_now() - GAUGES_EVERY

    def nudge(self) -> None:
        """Something was committed to the outbox: publish soon. Never blocks, never fails."""
        self._wake.set()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        if self.running:
            return
        self._stopping.clear()
        self._task = asyncio.create_task(self.run(), name="message-service-outbox-relay")

    async def stop(self, timeout: float | None = None) -> None:
        """Let the publish in flight finish (bounded by the publish timeout), then stop; after
        `timeout` it is cancelled, and its row stays pending for the next start."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping.set()
        self._wake.set()
        grace = self._publish_timeout + 1.0 if timeout is None else timeout
        done, _ = await asyncio.wait({task}, timeout=grace)
        if not done:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def run(self) -> None:
        """The relay loop. No exception ends it; only `stop()` (or cancellation) does."""
        failures = 0
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                result = await self.publish_pending()
            except Exception as exc:
                logger.error("message_service.outbox.cycle_failed error=%s", describe_error(exc))
                result = BatchResult(claimed=0, published=0, failed=True)
            await self._housekeeping()
            if result.failed:
                failures += 1
                backoff = min(self._interval * 2 ** min(failures - 1, 16), self._max_backoff)
                # Nudges do not cut a back-off short: every commit would otherwise hammer a
                # broker that is down.
                await self._wait(backoff, wake_on_nudge=False)
            else:
                failures = 0
                # A full batch that made progress means more may be waiting: go on at once.
                if result.claimed < self._batch_size or not result.published:
                    await self._wait(self._interval, wake_on_nudge=True)

    async def publish_pending(self) -> BatchResult:
        """One cycle: claim, publish every row at once, mark, commit."""
        async with self._engine.connect() as connection:
            rows = await repository.claim_pending(connection, limit=self._batch_size, now=utc_now())
            if not repository.claims_lock_rows(connection):
                # SQLite: a transaction holds the whole database, so it must not stay open while
                # a publish waits for a broker that is down (every request would wait too). One
                # relay per SQLite file, so nothing else can claim these rows meanwhile.
                await connection.commit()
            outcomes = await asyncio.gather(*(self._publish_in_context(row) for row in rows))
            published = [
                row.seq for row, failure in zip(rows, outcomes, strict=True) if not failure
            ]
            failures = [
                (row, failure)
                for row, failure in zip(rows, outcomes, strict=True)
                if failure is not None
            ]
            now = utc_now()
            await repository.mark_published(connection, seqs=published, at=now)
            for row, failure in failures:
                retry_at = None if failure.broker else now + unpublishable_hold(row.attempts)
                await repository.record_failure(
                    connection, seq=row.seq, error=failure.error, retry_at=retry_at
                )
            await connection.commit()
        broker_failed = any(failure.broker for _, failure in failures)
        return BatchResult(claimed=len(rows), published=len(published), failed=broker_failed)

    async def _publish_in_context(self, row: PendingEvent) -> _Failure | None:
        """Within the trace of the request that staged the row, with its ids in the logs."""
        body = row.payload.encode()
        with (
            log_context(**ids_from_body(body), correlation_id=row.event_id),
            continued_trace(row.traceparent),
        ):
            return await self._publish(row, body)

    async def _publish(self, row: PendingEvent, body: bytes) -> _Failure | None:
        """Publish one row (`body`: its stored JSON); None on success. What goes out is the
        stored JSON itself, once it has been validated as an event (a row that is not one must
        not reach a consumer)."""
        publisher = self._publishers.get(row.event_type)
        try:
            EVENT_ADAPTER.validate_json(body)
        except pydantic.ValidationError as exc:
            publisher, error = None, describe_error(exc)
        else:
            error = f"no publisher for event type {row.event_type}"
        if publisher is None:
            logger.error(
                "message_service.outbox.unpublishable event_id=%s type=%s error=%s",
                row.event_id,
                row.event_type,
                error,
            )
            self._metrics.failed.labels(row.event_type).inc()
            return _Failure(error, broker=False)
        try:
            await publish_json(
                publisher,
                body,
                message_id=str(row.event_id),
                timeout=self._publish_timeout,
            )
        except Exception as exc:
            error = describe_error(exc)
            logger.warning(
                "message_service.outbox.publish_failed event_id=%s type=%s attempt=%d error=%s",
                row.event_id,
                row.event_type,
                row.attempts + 1,
                error,
            )
            self._metrics.failed.labels(row.event_type).inc()
            return _Failure(error, broker=True)
        logger.debug(
            "message_service.outbox.published event_id=%s type=%s", row.event_id, row.event_type
        )
        self._metrics.published.labels(row.event_type).inc()
        return None

    async def refresh_gauges(self) -> None:
        async with autocommit(self._engine) as connection:
            count, oldest = await repository.pending_stats(connection)
        self._metrics.pending.set(count)
        age = 0.0 if oldest is None else max(0.0, (utc_now() - oldest).total_seconds())
        self._metrics.oldest_pending_age.set(age)

    async def purge(self) -> int:
        """Delete published rows older than the retention (they hold personal data)."""
        async with self._engine.begin() as connection:
            deleted = await repository.purge_published(
                connection, before=utc_now() - self._retention
            )
        if deleted:
            logger.info("message_service.outbox.purged rows=%d", deleted)
        return deleted

    async def _housekeeping(self) -> None:
        try:
            if utc_now() - self._last_gauges >= GAUGES_EVERY:
                self._last_gauges = utc_now()
                await self.refresh_gauges()
            if utc_now() - self._last_purge >= PURGE_EVERY:
                self._last_purge = utc_now()
                await self.purge()
        except Exception as exc:
            logger.error("message_service.outbox.housekeeping_failed error=%s", describe_error(exc))

    async def _wait(self, seconds: float, *, wake_on_nudge: bool) -> None:
        waiters = [asyncio.ensure_future(self._stopping.wait())]
        if wake_on_nudge:
            waiters.append(asyncio.ensure_future(self._wake.wait()))
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
