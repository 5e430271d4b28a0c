"""The Prometheus series every Herald service exports, whatever it does.

One `HeraldMetrics` per registry (`herald_metrics(registry)`), fed from three places:

* `metrics_middleware`, a broker middleware (the outermost, so it sees the final outcome of a
  delivery after the retry middleware decided it): messages processed by queue and outcome,
  processing time by queue, and the events published on the `notifications` exchange by routing
  key; `error_middleware` (the innermost, so it sees the handler's own error): handler errors by
  queue and error class;
* the retry middleware (`herald_shared.retry`): retries, deferrals and dead letters by queue
  (and reason);
* `refresh_broker_gauges`, run by the `/metrics` endpoint before each scrape: queue depth and
  RabbitMQ's consumer count (a passive `queue.declare` on a channel of its own), and whether
  this process's own consumers are alive;
* `EventLoopLag`, started and stopped with the broker: how late the event loop runs a timer,
  which is how long every delivery, request and publish of the process waited for the loop.

It replaces FastStream's `RabbitPrometheusMiddleware`, so nothing is counted twice: FastStream's
series are labelled by `<exchange>.<binding>` rather than by queue, count a message that Herald
scheduled for a retry as `acked`, and count the retry middleware's own republishes as published
events.

Why the services measure queue depth themselves rather than relying on RabbitMQ's Prometheus
plugin: it works on any broker (this machine's has no management or Prometheus plugin), with the
least-privilege users (a passive declare needs no management tag), and the value sits next to the
drain rate it is divided by. In production the plugin (scraped too, see
`deploy/prometheus/prometheus.yml`) is the authority when every replica of a service is down.

Labels carry no user data: queue names, routing keys, outcomes, error class names and reason
codes only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Generic, Protocol, TypeVar

from faststream import BaseMiddleware
from faststream.exceptions import AckMessage, HandlerException, SkipMessage
from faststream.message import StreamMessage
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_asgi_app

from herald_shared.topology import EXCHANGE, queue_by_name, queue_for_routing_key

logger = logging.getLogger("herald.metrics")

# Seconds; a handler that calls a provider may take tens of seconds.
PROCESSING_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# How often the event-loop lag is sampled: a 50 ms timer costs nothing measurable.
LAG_INTERVAL = 0.05
# A scrape must answer even when RabbitMQ does not.
PROBE_TIMEOUT = 2.0

OUTCOME_SUCCESS = "success"  # the handler returned: acked
OUTCOME_ERROR = "error"  # the handler raised: retried, deferred or dead-lettered (see below)
OUTCOME_SKIPPED = "skipped"
UNKNOWN_QUEUE = "unknown"  # a routing key no Herald queue binds (should not happen)


class HeraldMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.published = Counter(
            "herald_messages_published",
            "Events published on the notifications exchange, by routing key and result (ok: "
            "confirmed by the broker; error: refused, unroutable or timed out).",
            ["routing_key", "result"],
            registry=registry,
        )
        self.processed = Counter(
            "herald_messages_processed",
            "Deliveries handled, by queue and outcome (success, error, skipped); an error is "
            "retried, deferred or dead-lettered by the retry middleware.",
            ["queue", "outcome"],
            registry=registry,
        )
        self.event_loop_lag = Histogram(
            "herald_event_loop_lag_seconds",
            "How late the event loop ran a timer due every 50 ms: how long other work held the "
            "loop, which every delivery, request and publish of the process waits too.",
            buckets=LAG_BUCKETS,
            registry=registry,
        )
        self.processing_seconds = Histogram(
            "herald_message_processing_seconds",
            "Time from the delivery to its outcome (retry or dead-letter republish included).",
            ["queue"],
            buckets=PROCESSING_BUCKETS,
            registry=registry,
        )
        self.errors = Counter(
            "herald_message_errors",
            "Handler failures, by queue and the class of the error.",
            ["queue", "error_type"],
            registry=registry,
        )
        self.retries = Counter(
            "herald_message_retries",
            "Deliveries sent to a wait queue for another attempt, by queue.",
            ["queue"],
            registry=registry,
        )
        self.deferrals = Counter(
            "herald_message_deferrals",
            "Deliveries sent to a wait queue without spending an attempt (a dependency down, "
            "a lease held elsewhere, a breaker open), by queue.",
            ["queue"],
            registry=registry,
        )
        self.dead_lettered = Counter(
            "herald_messages_dead_lettered",
            "Deliveries moved to the queue's dead-letter queue, by queue and reason "
            "(permanent, unparsable, retries-exhausted, deferred-too-long).",
            ["queue", "reason"],
            registry=registry,
        )
        self.queue_depth = Gauge(
            "herald_queue_depth",
            "Messages ready in a queue (the service's work queues and their .dlq), as RabbitMQ "
            "reported at the last scrape.",
            ["queue"],
            registry=registry,
        )
        self.queue_consumers = Gauge(
            "herald_queue_consumers",
            "Consumers of a work queue according to RabbitMQ, every replica included.",
            ["queue"],
            registry=registry,
        )
        self.consumers = Gauge(
            "herald_consumers",
            "This process's own consumers of a queue that are alive (consuming on an open "
            "channel): 1 or 0.",
            ["queue"],
            registry=registry,
        )
        self._probe: QueueProbe | None = None
        self._depths_question: UncancelledQuestion[list[tuple[str, tuple[int, int]]]] = (
            UncancelledQuestion()
        )

    # Called by the retry middleware.
    def retry_scheduled(self, queue: str) -> None:
        self.retries.labels(queue=queue).inc()

    def deferred(self, queue: str) -> None:
        self.deferrals.labels(queue=queue).inc()

    def dead_letter(self, queue: str, reason: str) -> None:
        self.dead_lettered.labels(queue=queue, reason=reason).inc()


_BY_REGISTRY: weakref.WeakKeyDictionary[CollectorRegistry, HeraldMetrics] = (
    weakref.WeakKeyDictionary()
)


class EventLoopLag:
    """Samples how late the event loop runs a timer due every `interval` seconds into
    `herald_event_loop_lag_seconds`. A busy loop runs everything late by that much: the wait a
    direct message's job has between arriving and being looked at, however urgent it is."""

    def __init__(self, histogram: Histogram, *, interval: float = LAG_INTERVAL) -> None:
        self._histogram = histogram
        self._interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._sample(), name="herald-event-loop-lag")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _sample(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self._interval
            await asyncio.sleep(self._interval)
            self._histogram.observe(max(0.0, loop.time() - due))


def herald_metrics(registry: CollectorRegistry) -> HeraldMetrics:
    """The shared series of `registry`, created on first use (a series can be registered only
    once per registry, and the broker, the retry middleware and `/metrics` all need them)."""
    metrics = _BY_REGISTRY.get(registry)
    if metrics is None:
        metrics = _BY_REGISTRY[registry] = HeraldMetrics(registry)
    return metrics


def queue_label(msg: StreamMessage[Any]) -> str:
    """The consumer queue a delivery came from: each routing key (retry keys included) is bound
    by exactly one queue, and a name from the topology is never user data."""
    routing_key = getattr(msg.raw_message, "routing_key", "") or ""
    queue = queue_for_routing_key(routing_key)
    return queue.name if queue is not None else UNKNOWN_QUEUE


def _failure_of(exc: BaseException) -> BaseException | None:
    """The error behind an outcome exception (the retry middleware raises its outcome `from`
    the failure), or None for an outcome the handler chose itself."""
    if isinstance(exc, HandlerException):
        return exc.__cause__
    return exc


class MetricsMiddleware(BaseMiddleware):
    metrics: HeraldMetrics

    async def consume_scope(
        self, call_next: Callable[[Any], Awaitable[Any]], msg: StreamMessage[Any]
    ) -> Any:
        queue = queue_label(msg)
        started = time.perf_counter()
        outcome = OUTCOME_ERROR
        try:
            result = await call_next(msg)
            outcome = OUTCOME_SUCCESS
            return result
        except SkipMessage:
            outcome = OUTCOME_SKIPPED
            raise
        except Exception as exc:
            # A handler's own AckMessage is a success; anything else that ends here, the retry
            # middleware's outcome for a failed handler included, is an error.
            deliberate_ack = isinstance(exc, AckMessage) and _failure_of(exc) is None
            outcome = OUTCOME_SUCCESS if deliberate_ack else OUTCOME_ERROR
            raise
        finally:
            self.metrics.processing_seconds.labels(queue=queue).observe(
                time.perf_counter() - started
            )
            self.metrics.processed.labels(queue=queue, outcome=outcome).inc()

    async def publish_scope(self, call_next: Callable[[Any], Awaitable[Any]], cmd: Any) -> Any:
        # Only the events on the main exchange: retry and dead-letter republishes are counted by
        # the retry middleware as what they are.
        exchange = getattr(getattr(cmd, "exchange", None), "name", None)
        if exchange != EXCHANGE.name:
            return await call_next(cmd)
        routing_key = str(getattr(cmd, "destination", ""))
        # Both results exist from a routing key's first publish on (at 0): a rate of failed
        # publishes is then 0, not "no data", on a dashboard.
        for each in ("ok", "error"):
            self.metrics.published.labels(routing_key=routing_key, result=each)
        try:
            result = await call_next(cmd)
        except BaseException:
            self.metrics.published.labels(routing_key=routing_key, result="error").inc()
            raise
        self.metrics.published.labels(routing_key=routing_key, result="ok").inc()
        return result


def metrics_middleware(metrics: HeraldMetrics) -> type[MetricsMiddleware]:
    """The middleware class feeding `metrics` (FastStream instantiates it per message)."""
    return type("MetricsMiddleware", (MetricsMiddleware,), {"metrics": metrics})


class ErrorMiddleware(BaseMiddleware):
    """The innermost middleware: counts the handler's own error by class, before the retry
    middleware turns it into an outcome (whose own failures must not be mistaken for it)."""

    metrics: HeraldMetrics

    async def consume_scope(
        self, call_next: Callable[[Any], Awaitable[Any]], msg: StreamMessage[Any]
    ) -> Any:
        try:
            return await call_next(msg)
        except HandlerException:  # a deliberate outcome, not an error
            raise
        except Exception as exc:
            self.metrics.errors.labels(queue=queue_label(msg), error_type=type(exc).__name__).inc()
            raise


def error_middleware(metrics: HeraldMetrics) -> type[ErrorMiddleware]:
    return type("ErrorMiddleware", (ErrorMiddleware,), {"metrics": metrics})


# --- broker gauges, refreshed at scrape time ---------------------------------------------------


T = TypeVar("T")


class UncancelledQuestion(Generic[T]):
    """A question to RabbitMQ that is asked once at a time, waited for at most a timeout, and
    never cancelled.

    aiormq answers the cancellation of a call (`asyncio.timeout` running out) by closing the
    call's channel: on a consumer's channel that drops the deliveries in hand (seen when a
    cluster node died: the readiness check made its process unready). And it closes it before
    the cancelled call returns, with a frame for the broker, so a cancelled call can outlast the
    deadline that cancelled it (a likely cause, not proven, of a `/health/ready` left unanswered
    for 29 s in another such run). So the caller stops waiting and the call goes on; until it
    has its answer, every caller waits on that same call rather than asking again.
    """

    def __init__(self) -> None:
        self._call: asyncio.Task[T] | None = None

    async def ask(self, question: Callable[[], Awaitable[T]], timeout: float) -> T:
        """`question()`'s answer, or `TimeoutError` after `timeout` seconds."""
        if self._call is None or self._call.done():
            self._call = asyncio.ensure_future(question())
            # Read the error of a call nobody waits for any more, so asyncio does not log it.
            self._call.add_done_callback(
                lambda call: None if call.cancelled() else call.exception()
            )
        call = self._call
        done, _ = await asyncio.wait({call}, timeout=timeout)
        if not done:
            raise TimeoutError(f"RabbitMQ did not answer within {timeout} s")
        return call.result()


class QueueProbe(Protocol):
    async def inspect(self, queue: str) -> tuple[int, int]:
        """(messages ready, consumers) of `queue`, as RabbitMQ sees them."""
        ...


class ChannelQueueProbe:
    """Passive declares on a channel of its own: a passive declare of a missing queue closes its
    channel (404), which must never be the channel the consumers or publishers use."""

    def __init__(self, broker: Any) -> None:
        self._broker = broker
        self._channel: Any = None

    async def inspect(self, queue: str) -> tuple[int, int]:
        if self._channel is None or self._channel.is_closed:
            # FastStream 0.7.8 keeps the aio-pika connection private; pinned version.
            connection = getattr(self._broker, "_connection", None)
            if connection is None:
                raise ConnectionError("broker not connected")
            self._channel = await connection.channel(publisher_confirms=False)
        channel = await self._channel.get_underlay_channel()
        declared = await channel.queue_declare(queue, passive=True)
        return int(declared.message_count or 0), int(declared.consumer_count or 0)


def consumed_queues(broker: Any) -> list[str]:
    """The queues this broker's subscribers consume."""
    names = []
    for subscriber in broker.subscribers:
        queue = getattr(subscriber, "queue", None)
        if queue is not None and queue.name:
            names.append(queue.name)
    return names


def fed_queues(broker: Any) -> list[str]:
    """The work queues this broker's publishers feed (consumed by other services): a service
    reports their consumers too, so that a consuming service that is gone entirely still shows
    as a queue without consumers, not as a series that vanished with it."""
    names = []
    for publisher in broker.publishers:
        queue = queue_for_routing_key(getattr(publisher, "routing_key", "") or "")
        if queue is not None and queue.name not in names:
            names.append(queue.name)
    return names


def _consumer_alive(subscriber: Any) -> bool:
    # Same private state as `ops.consumers_ready` (FastStream 0.7.8, pinned).
    queue: Any = getattr(subscriber, "_queue_obj", None)
    if queue is None or getattr(subscriber, "_consumer_tag", None) is None:
        return False
    try:
        return not queue.channel.is_closed
    except Exception:  # a channel that cannot even say whether it is closed is not alive
        return False


def observed_queues(work_queues: Iterable[str]) -> list[str]:
    """The work queues and, for those of the topology, their dead-letter queues."""
    names: list[str] = []
    for name in work_queues:
        names.append(name)
        topology_queue = queue_by_name(name)
        if topology_queue is not None:
            names.append(topology_queue.dead_letter_queue.name)
    return names


async def refresh_broker_gauges(
    broker: Any,
    metrics: HeraldMetrics,
    *,
    probe: QueueProbe | None = None,
    timeout: float = PROBE_TIMEOUT,
) -> None:
    """Set the consumer and queue-depth gauges for the queues `broker` consumes and for those
    its publishers feed.

    If RabbitMQ cannot be asked, the depth and RabbitMQ-consumer samples are removed rather than
    left at their last value: a gap on the dashboard is honest, a frozen number is not.
    """
    for subscriber in broker.subscribers:
        queue = getattr(subscriber, "queue", None)
        if queue is not None and queue.name:
            metrics.consumers.labels(queue=queue.name).set(int(_consumer_alive(subscriber)))
            # The per-queue counters exist (at 0) before their first event: "nothing retried"
            # reads 0 on a dashboard, not "no data" (error classes and dead-letter reasons
            # appear with their first occurrence).
            for outcome in (OUTCOME_SUCCESS, OUTCOME_ERROR, OUTCOME_SKIPPED):
                metrics.processed.labels(queue=queue.name, outcome=outcome)
            metrics.retries.labels(queue=queue.name)
            metrics.deferrals.labels(queue=queue.name)

    consumed = consumed_queues(broker)
    work_queues = [*consumed, *(name for name in fed_queues(broker) if name not in consumed)]
    if probe is None:
        if metrics._probe is None:
            metrics._probe = ChannelQueueProbe(broker)
        probe = metrics._probe
    queues = observed_queues(work_queues)
    inspect = probe.inspect

    async def inspect_all() -> list[tuple[str, tuple[int, int]]]:
        return [(name, await inspect(name)) for name in queues]

    try:
        answers = await metrics._depths_question.ask(inspect_all, timeout)
    except Exception as exc:
        logger.debug("herald.metrics.queue_probe_failed error=%s", type(exc).__name__)
        metrics.queue_depth.clear()
        metrics.queue_consumers.clear()
        return
    for name, (ready, consumers) in answers:
        metrics.queue_depth.labels(queue=name).set(ready)
        if name in work_queues:
            metrics.queue_consumers.labels(queue=name).set(consumers)


def metrics_app(broker: Any, registry: CollectorRegistry) -> Callable[..., Awaitable[None]]:
    """The `/metrics` ASGI app: refreshes the broker gauges, then serves `registry`."""
    serve = make_asgi_app(registry)
    metrics = herald_metrics(registry)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await refresh_broker_gauges(broker, metrics)
        await serve(scope, receive, send)

    return app


__all__ = (
    "ChannelQueueProbe",
    "ErrorMiddleware",
    "EventLoopLag",
    "HeraldMetrics",
    "MetricsMiddleware",
    "QueueProbe",
    "UncancelledQuestion",
    "error_middleware",
    "herald_metrics",
    "metrics_app",
    "metrics_middleware",
    "refresh_broker_gauges",
)
