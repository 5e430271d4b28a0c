"""Assembly: settings in, a runnable ASGI FastStream application out."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from faststream import AsyncAPI
from faststream.asgi import AsgiFastStream
from faststream.rabbit import RabbitBroker
from faststream.rabbit.publisher import RabbitPublisher
from faststream.rabbit.subscriber import RabbitSubscriber
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from herald_shared.broker import make_broker
from herald_shared.database import database_healthy, make_engine, run_migrations
from herald_shared.events import Platform, PushRequested
from herald_shared.ledger import DeliveryLedger
from herald_shared.ops import asyncapi_spec, consumer_app, service_version
from herald_shared.resilience import BreakerState, CircuitBreaker
from herald_shared.retry import DeadLetterHooks
from herald_shared.sending import Sender
from herald_shared.topology import declare_topology
from push_sender.channel import PushChannel
from push_sender.handlers import make_publishers, register_handlers
from push_sender.metrics import PushMetrics
from push_sender.providers import LogProvider, PushProvider
from push_sender.registry import ProviderRegistry, make_registry
from push_sender.settings import SERVICE_NAME, Settings
from push_sender.tables import push_deliveries

TITLE = SERVICE_NAME
DESCRIPTION = (
    "Sends push notifications (FCM HTTP v1, APNs and Web Push, chosen by the device's "
    "platform, or a JSON-lines file for local runs) for "
    "`notification.push.send` jobs (pushes of one or more messages to one platform's devices), "
    "once per notification_id as far as the provider allows; reports the outcomes, one event per "
    "outcome for many jobs at once, on `notification.push.delivered` / "
    "`notification.push.failed` and dead device tokens on `device.invalidated`."
)


@dataclass(frozen=True)
class PushService:
    """Everything `create_app` wires together, for tests and tools that need the parts."""

    settings: Settings
    broker: RabbitBroker
    engine: AsyncEngine
    registry: CollectorRegistry
    providers: ProviderRegistry
    publishers: dict[str, RabbitPublisher]
    sender: Sender[PushRequested]
    subscribers: tuple[RabbitSubscriber, ...]
    app: AsgiFastStream


def _wire(
    settings: Settings,
    engine: AsyncEngine,
    registry: CollectorRegistry,
    providers: ProviderRegistry,
    metrics: PushMetrics,
) -> tuple[
    RabbitBroker, dict[str, RabbitPublisher], Sender[PushRequested], tuple[RabbitSubscriber, ...]
]:
    hooks = DeadLetterHooks()
    broker = make_broker(
        settings.rabbitmq,
        service_name=SERVICE_NAME,
        registry=registry,
        description=DESCRIPTION,
        dead_letter_hooks=hooks,
    )
    publishers = make_publishers(broker)
    sender = Sender(
        spec=PushChannel(providers),
        ledger=DeliveryLedger(engine, push_deliveries),
        publishers=publishers,
        publish_timeout=settings.rabbitmq.publish_timeout,
        metrics=metrics,
        tuning=settings.sender_tuning(),
    )
    sender.export_gauges(registry)
    return broker, publishers, sender, register_handlers(broker, sender, hooks)


def build_service(
    settings: Settings,
    *,
    provider: PushProvider | None = None,
    providers: Mapping[Platform, PushProvider] | None = None,
    breaker_clock: Callable[[], float] = time.monotonic,
) -> PushService:
    """The service's parts. `provider` (one provider for every platform) or `providers` (per
    platform) replace those the settings select (tests); either way the service closes them at
    shutdown. `breaker_clock` times the circuit breakers' cool-downs (tests)."""
    registry = CollectorRegistry()
    metrics = PushMetrics(registry)

    def breaker_changed(
        name: str, old: BreakerState, new: BreakerState, breaker: CircuitBreaker
    ) -> None:
        metrics.breaker_state.labels(provider=name).set(int(new))

    if provider is not None:
        providers = dict.fromkeys(Platform, provider)
    guarded = make_registry(settings, providers, clock=breaker_clock, on_change=breaker_changed)
    for gate in guarded.gates:
        if gate.breaker is not None:
            metrics.breaker_state.labels(provider=gate.name).set(int(gate.breaker.state))
    # Every in-flight message may hold a connection; make_engine adds as much overflow again.
    engine = make_engine(settings.database_url, pool_size=settings.rabbitmq.prefetch)
    broker, publishers, sender, subscribers = _wire(settings, engine, registry, guarded, metrics)

    async def migrate() -> None:
        await run_migrations(
            engine, script_location="push_sender:migrations", service_name=SERVICE_NAME
        )

    async def declare() -> None:
        # Here, before the subscriber consumes, rather than in after_startup: FastStream runs
        # after_startup hooks once the subscribers already consume (and AsgiFastStream even after
        # reporting the startup complete), so the first deliveries would race the declaration: a
        # report published before the queue bound to its key exists is unroutable, and a retry
        # before the wait queues exist is rejected and, in a fresh vhost, lost.
        await broker.connect()
        await declare_topology(broker, retry_delays=settings.rabbitmq.retry_delays)

    async def announce() -> None:
        guarded.log_start()

    async def close() -> None:
        try:
            await sender.aclose(timeout=settings.rabbitmq.graceful_timeout)
            await guarded.aclose()
        finally:
            await engine.dispose()

    app = consumer_app(
        broker,
        title=TITLE,
        version=service_version(SERVICE_NAME),
        description=DESCRIPTION,
        registry=registry,
        checks={"database": functools.partial(database_healthy, engine)},
        # An open breaker degrades one provider; the others (and retries) go on, so it is
        # reported here without making the service unready.
        details={"push": guarded.describe},
        on_startup=[announce, migrate, declare],
        after_shutdown=[close],
    )
    return PushService(
        settings, broker, engine, registry, guarded, publishers, sender, subscribers, app
    )


def create_app(settings: Settings) -> AsgiFastStream:
    return build_service(settings).app


def specification(settings: Settings) -> AsyncAPI:
    """The AsyncAPI document of the service: no database, broker or provider credentials needed."""
    # The document needs the subscriber and publishers only; neither of these is ever used.
    engine = create_async_engine("sqlite+aiosqlite://")
    registry = CollectorRegistry()
    providers = make_registry(settings, dict.fromkeys(Platform, LogProvider(Path("."))))
    broker, _, _, _ = _wire(settings, engine, registry, providers, PushMetrics(registry))
    return asyncapi_spec(
        broker, title=TITLE, version=service_version(SERVICE_NAME), description=DESCRIPTION
    )
