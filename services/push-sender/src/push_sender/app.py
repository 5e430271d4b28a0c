"""Assembly: settings in, a runnable ASGI FastStream application out."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from faststream import AsyncAPI
from faststream.asgi import AsgiFastStream
from faststream.rabbit import RabbitBroker
from faststream.rabbit.subscriber import RabbitSubscriber
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from herald_shared.broker import make_broker
from herald_shared.database import database_healthy, make_engine, run_migrations
from herald_shared.ops import asyncapi_spec, consumer_app, service_version
from herald_shared.retry import DeadLetterHooks
from herald_shared.topology import PUSH_NOTIFICATIONS, declare_topology
from push_sender.handlers import PushDeps, make_publishers, register_handlers, report_given_up
from push_sender.metrics import PushMetrics
from push_sender.providers import LogProvider, PushProvider, make_provider
from push_sender.sender import PushSender
from push_sender.settings import SERVICE_NAME, Settings

TITLE = SERVICE_NAME
DESCRIPTION = (
    "Sends push notifications (FCM HTTP v1, or a JSON-lines file for local runs) for "
    "`notification.push.send` jobs, once per notification_id as far as the provider allows; "
    "reports each outcome on `notification.push.delivered` / `notification.push.failed` and "
    "dead device tokens on `device.invalidated`."
)


@dataclass(frozen=True)
class PushService:
    """Everything `create_app` wires together, for tests and tools that need the parts."""

    settings: Settings
    broker: RabbitBroker
    engine: AsyncEngine
    registry: CollectorRegistry
    provider: PushProvider
    deps: PushDeps
    subscriber: RabbitSubscriber
    app: AsgiFastStream


def _wire(
    settings: Settings, engine: AsyncEngine, registry: CollectorRegistry, provider: PushProvider
) -> tuple[RabbitBroker, PushDeps, RabbitSubscriber]:
    hooks = DeadLetterHooks()
    broker = make_broker(
        settings.rabbitmq,
        service_name=SERVICE_NAME,
        registry=registry,
        description=DESCRIPTION,
        dead_letter_hooks=hooks,
    )
    delivered, failed, invalidated = make_publishers(broker)
    deps = PushDeps(
        sender=PushSender(engine=engine, provider=provider, metrics=PushMetrics(registry)),
        delivered=delivered,
        failed=failed,
        invalidated=invalidated,
        publish_timeout=settings.rabbitmq.publish_timeout,
    )
    hooks.register(PUSH_NOTIFICATIONS.name, functools.partial(report_given_up, deps))
    return broker, deps, register_handlers(broker, deps)


def build_service(settings: Settings, *, provider: PushProvider | None = None) -> PushService:
    """The service's parts. `provider` replaces the one `PUSH_PROVIDER` selects (tests); either
    way the service closes it at shutdown."""
    registry = CollectorRegistry()
    provider = provider or make_provider(settings)
    # Every in-flight message may hold a connection; make_engine adds as much overflow again.
    engine = make_engine(settings.database_url, pool_size=settings.rabbitmq.prefetch)
    broker, deps, subscriber = _wire(settings, engine, registry, provider)

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

    async def close() -> None:
        try:
            await provider.aclose()
        finally:
            await engine.dispose()

    app = consumer_app(
        broker,
        title=TITLE,
        version=service_version(SERVICE_NAME),
        description=DESCRIPTION,
        registry=registry,
        checks={"database": functools.partial(database_healthy, engine)},
        on_startup=[migrate, declare],
        after_shutdown=[close],
    )
    return PushService(settings, broker, engine, registry, provider, deps, subscriber, app)


def create_app(settings: Settings) -> AsgiFastStream:
    return build_service(settings).app


def specification(settings: Settings) -> AsyncAPI:
    """The AsyncAPI document of the service: no database, broker or provider credentials needed."""
    # The document needs the subscriber and publishers only; neither of these is ever used.
    engine = create_async_engine("sqlite+aiosqlite://")
    broker, _, _ = _wire(settings, engine, CollectorRegistry(), LogProvider(Path(".")))
    return asyncapi_spec(
        broker, title=TITLE, version=service_version(SERVICE_NAME), description=DESCRIPTION
    )
