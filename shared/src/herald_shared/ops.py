"""Health, readiness, metrics and AsyncAPI endpoints for the FastStream consumer services."""

from __future__ import annotations

import gc
import json
import logging
import signal
import sys
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import uvicorn
from faststream import AsyncAPI
from faststream.asgi import AsgiFastStream, AsgiResponse, get
from faststream.asgi.types import ASGIApp, Scope
from faststream.rabbit import RabbitBroker
from prometheus_client import CollectorRegistry

from herald_shared.asyncapi_docs import asyncapi_routes
from herald_shared.metrics import UncancelledQuestion, metrics_app

ReadinessCheck = Callable[[], Awaitable[bool]]
# Something worth seeing in `/health/ready` that never makes the service unready (a degraded
# part that the service works around): returns a JSON-serialisable value.
ReadinessDetail = Callable[[], Any]

logger = logging.getLogger("herald.ops")

# Each broker's consumer check, asked once at a time and never cancelled (`consumers_ready`).
_consumer_questions: weakref.WeakKeyDictionary[RabbitBroker, UncancelledQuestion[bool]] = (
    weakref.WeakKeyDictionary()
)


def _json(payload: Mapping[str, Any], status: int = 200) -> AsgiResponse:
    return AsgiResponse(
        json.dumps(payload).encode(), status, headers={"content-type": "application/json"}
    )


async def broker_healthy(broker: RabbitBroker, timeout: float = 3.0) -> bool:
    try:
        return bool(await broker.ping(timeout))
    except Exception:  # a failed ping is an answer, not an error of the health endpoint
        return False


async def consumers_ready(broker: RabbitBroker, timeout: float = 3.0) -> bool:
    """Every subscriber of this process consumes on an open channel, and RabbitMQ agrees that
    its queue has a consumer.

    After a lost connection aio-pika reconnects and re-creates the consumers; until then (or if
    the server cancelled a consumer) the process is alive but not doing its work, which is what
    readiness must say. FastStream 0.7.8 keeps the consumer state on private attributes; the
    version is pinned and `tests/integration/shared/test_readiness.py` breaks if they move.

    RabbitMQ is asked on each consumer's own channel, and a late answer is never cancelled
    (`UncancelledQuestion`): aiormq would close that channel, and the check would cause the
    fault it looks for.
    """
    question = _consumer_questions.get(broker)
    if question is None:
        question = _consumer_questions[broker] = UncancelledQuestion()
    try:
        return await question.ask(lambda: _every_consumer_counted(broker), timeout)
    except Exception:  # a failed or late check is an answer: not ready
        return False


async def _every_consumer_counted(broker: RabbitBroker) -> bool:
    for subscriber in broker.subscribers:
        queue: Any = getattr(subscriber, "_queue_obj", None)
        if queue is None or getattr(subscriber, "_consumer_tag", None) is None:
            return False
        if queue.channel.is_closed:
            return False
        channel = await queue.channel.get_underlay_channel()
        declared = await channel.queue_declare(queue.name, passive=True)
        if not declared.consumer_count:
            return False
    return True


def health_routes(
    broker: RabbitBroker,
    registry: CollectorRegistry,
    checks: Mapping[str, ReadinessCheck],
    details: Mapping[str, ReadinessDetail] | None = None,
) -> list[tuple[str, ASGIApp]]:
    """`/health` (alive), `/health/ready` (RabbitMQ answers, every consumer is consuming, and
    every named check passes; `details` are reported beside, never failing it),
    `/health/rabbitmq` (the specification's), `/metrics` (Prometheus)."""

    @get(include_in_schema=False)
    async def liveness(scope: Scope) -> AsgiResponse:
        return _json({"status": "ok"})

    @get(include_in_schema=False)
    async def rabbitmq(scope: Scope) -> AsgiResponse:
        healthy = await broker_healthy(broker)
        return _json({"status": "healthy" if healthy else "unhealthy"}, 200 if healthy else 503)

    @get(include_in_schema=False)
    async def readiness(scope: Scope) -> AsgiResponse:
        results = {
            "rabbitmq": await broker_healthy(broker),
            "consumers": await consumers_ready(broker),
        }
        for name, check in checks.items():
            try:
                results[name] = await check()
            except Exception:
                results[name] = False
        ready = all(results.values())
        body: dict[str, Any] = {"status": "ready" if ready else "not ready", "checks": results}
        if details:
            body["details"] = {name: detail() for name, detail in details.items()}
        return _json(body, 200 if ready else 503)

    return [
        ("/health", liveness),
        ("/health/ready", readiness),
        ("/health/rabbitmq", rabbitmq),
        # Refreshes queue depth and consumer gauges from RabbitMQ first.
        ("/metrics", metrics_app(broker, registry)),
    ]


def service_version(distribution: str) -> str:
    """The installed version of a service, for its AsyncAPI document."""
    try:
        return version(distribution)
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "0.0.0"


def asyncapi_spec(broker: RabbitBroker, *, title: str, version: str, description: str) -> AsyncAPI:
    return AsyncAPI(broker, title=title, version=version, description=description)


def consumer_app(
    broker: RabbitBroker,
    *,
    title: str,
    version: str,
    description: str,
    registry: CollectorRegistry,
    checks: Mapping[str, ReadinessCheck],
    details: Mapping[str, ReadinessDetail] | None = None,
    on_startup: Sequence[Callable[..., Any]] = (),
    after_startup: Sequence[Callable[..., Any]] = (),
    after_shutdown: Sequence[Callable[..., Any]] = (),
    routes: Sequence[tuple[str, ASGIApp]] = (),
) -> AsgiFastStream:
    """The ASGI application of a consumer service: its broker plus the operational endpoints,
    the AsyncAPI page (served with its script and style, no CDN; no try-it-out) and the
    service's own `routes`."""
    specification = asyncapi_spec(broker, title=title, version=version, description=description)
    return AsgiFastStream(
        broker,
        specification=specification,
        asgi_routes=[
            *health_routes(broker, registry, checks, details),
            *asyncapi_routes(specification),
            *routes,
        ],
        on_startup=on_startup,
        after_startup=after_startup,
        after_shutdown=after_shutdown,
    )


# uvicorn's exit code for a start-up that failed (uvicorn.main.STARTUP_FAILURE).
STARTUP_FAILURE = 3


# A full collection after this many collections of the middle generation (CPython's default:
# 10).
FULL_COLLECTION_EVERY = 100


class _Server(uvicorn.Server):
    """uvicorn's server, telling the application when its graceful shutdown begins: uvicorn
    waits for every open response to finish before the lifespan's shutdown, and a response
    that never ends by itself (a real-time stream) must be ended then, not after."""

    def __init__(self, config: uvicorn.Config, on_shutdown: Callable[[], None] | None) -> None:
        super().__init__(config)
        self._on_shutdown = on_shutdown

    async def startup(self, sockets: list[Any] | None = None) -> None:
        await super().startup(sockets)
        # What exists once the application has started (modules, classes, schemas, metadata,
        # the app itself: most of the heap) lives as long as the process. Frozen, it is left out
        # of every later collection, so a full one scans only what came since. And full
        # collections come a tenth as often (the young generations are collected as before):
        # under load each still scans the work in flight (tens of thousands of jobs in a
        # sender) and finds almost nothing to free. Measured with the lanes benchmark and a probe
        # of `gc.callbacks`, full collections over 100 ms went from ~25 per service to 0-1
        # (docs/performance.md).
        gc.collect()
        gc.freeze()
        young, middle, _ = gc.get_threshold()
        gc.set_threshold(young, middle, FULL_COLLECTION_EVERY)

    async def shutdown(self, sockets: list[Any] | None = None) -> None:
        if self._on_shutdown is not None:
            self._on_shutdown()
        await super().shutdown(sockets)


def serve(
    app: ASGIApp, *, host: str, port: int, on_shutdown: Callable[[], None] | None = None
) -> None:
    """Run an ASGI app until SIGINT/SIGTERM, which drains in-flight messages before exiting;
    `on_shutdown` runs as the drain begins (to end responses that would never end by
    themselves).

    uvicorn re-raises the signal it caught once its graceful shutdown is done, which would end
    the process "killed by SIGTERM" (exit code -15/143); these no-op handlers, restored by
    uvicorn before it re-raises, turn a completed drain into exit code 0.
    """
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: None)
    # log_config=None: uvicorn's records go to the handler `configure_logging` set up (JSON or
    # text, access lines without query strings) instead of uvicorn's own. uvloop and httptools:
    # the event loop and the HTTP parser in C, a fifth or so of a busy service's CPU.
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="info",
        log_config=None,
        lifespan="on",
        loop="uvloop",
        http="httptools",
    )
    server = _Server(config, on_shutdown)
    server.run()
    if not server.started:
        # As `uvicorn.run` does: a start-up that failed (the lifespan raised) exits non-zero.
        sys.exit(STARTUP_FAILURE)
