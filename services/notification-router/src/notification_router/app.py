"""Assembly: settings in, a runnable ASGI FastStream application out."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import timedelta

from faststream import AsyncAPI
from faststream.asgi import AsgiFastStream
from faststream.rabbit import RabbitBroker
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from herald_shared.broker import make_broker
from herald_shared.database import database_healthy, make_engine, run_migrations
from herald_shared.events import (
    MAX_ITEMS_PER_EVENT,
    EmailJobsRequested,
    InboxItemsUpdated,
    PushJobsRequested,
)
from herald_shared.ops import asyncapi_spec, consumer_app, service_version
from herald_shared.publishing import event_publisher
from herald_shared.retention import RetentionTask
from herald_shared.topology import (
    EMAIL_SEND,
    EMAIL_SEND_URGENT,
    INBOX_UPDATED,
    PUSH_SEND,
    PUSH_SEND_URGENT,
    declare_topology,
)
from notification_router import repository
from notification_router.handlers import RouterDeps, Subscribers, register_handlers
from notification_router.inbox import InboxRelay
from notification_router.metrics import RouterMetrics
from notification_router.ops_api import explain_route
from notification_router.routing import ContentLimits
from notification_router.schedule import WindowDispatcher
from notification_router.settings import SERVICE_NAME, Settings

TITLE = SERVICE_NAME
DESCRIPTION = (
    "Turns each new chat message into push and e-mail jobs for its recipients, following their "
    "preferences (kept as a projection of user.updated), records every decision in a ledger "
    "and follows the delivery reports."
)


@dataclass(frozen=True)
class RouterService:
    """Everything `create_app` wires together, for tests and tools that need the parts."""

    settings: Settings
    broker: RabbitBroker
    engine: AsyncEngine
    registry: CollectorRegistry
    deps: RouterDeps
    subscribers: Subscribers
    schedule: WindowDispatcher
    inbox: InboxRelay
    retention: RetentionTask
    app: AsgiFastStream


def _wire(
    settings: Settings, engine: AsyncEngine, registry: CollectorRegistry
) -> tuple[RabbitBroker, RouterDeps, Subscribers, WindowDispatcher, InboxRelay]:
    broker = make_broker(
        settings.rabbitmq, service_name=SERVICE_NAME, registry=registry, description=DESCRIPTION
    )
    publishers = {
        PUSH_SEND: event_publisher(
            broker,
            PushJobsRequested,
            PUSH_SEND,
            description=(
                "Push notifications for the devices of one platform, one per device, of one "
                f"or more messages: up to {MAX_ITEMS_PER_EVENT} per event."
            ),
        ),
        EMAIL_SEND: event_publisher(
            broker,
            EmailJobsRequested,
            EMAIL_SEND,
            description=(
                "E-mail notifications, one per recipient, of one or more messages: up to "
                f"{MAX_ITEMS_PER_EVENT} per event."
            ),
        ),
        PUSH_SEND_URGENT: event_publisher(
            broker,
            PushJobsRequested,
            PUSH_SEND_URGENT,
            description=(
                "The urgent lane of push notifications: those of direct messages, "
                "invitations and personal mentions, and recalls, on queues of their own so no "
                "backlog holds them back."
            ),
        ),
        EMAIL_SEND_URGENT: event_publisher(
            broker,
            EmailJobsRequested,
            EMAIL_SEND_URGENT,
            description=(
                "The urgent lane of e-mail notifications: those of direct messages, "
                "invitations and personal mentions."
            ),
        ),
    }
    inbox = InboxRelay(
        engine=engine,
        publishers={
            INBOX_UPDATED: event_publisher(
                broker,
                InboxItemsUpdated,
                INBOX_UPDATED,
                description=(
                    "Users' inbox items whose decisions or deliveries changed, each whole, "
                    f"up to {MAX_ITEMS_PER_EVENT} per event; per item, the highest version "
                    "is the latest."
                ),
            )
        },
        publish_timeout=settings.rabbitmq.publish_timeout,
        interval=settings.inbox_relay_interval,
        batch_size=settings.inbox_relay_batch,
    )
    metrics = RouterMetrics(registry)
    limits = ContentLimits(
        title_max_chars=settings.push_title_max_chars,
        body_max_chars=settings.push_body_max_chars,
    )
    schedule = WindowDispatcher(
        engine=engine,
        publishers=publishers,
        metrics=metrics,
        publish_timeout=settings.rabbitmq.publish_timeout,
        interval=settings.schedule_poll_interval,
        batch_size=settings.schedule_batch_size,
        limits=limits,
    )
    deps = RouterDeps(
        engine=engine,
        publishers=publishers,
        metrics=metrics,
        publish_timeout=settings.rabbitmq.publish_timeout,
        limits=limits,
        email_grace=timedelta(seconds=settings.email_after_offline_seconds),
        email_delay_scale=settings.email_delay_scale,
        recall_linger=timedelta(seconds=settings.recall_linger),
        wake_schedule=schedule.wake,
    )
    return broker, deps, register_handlers(broker, deps, settings.batch), schedule, inbox


def build_service(settings: Settings) -> RouterService:
    registry = CollectorRegistry()
    # Every in-flight message may hold a connection; make_engine adds as much overflow again.
    engine = make_engine(settings.database_url, pool_size=settings.rabbitmq.prefetch)
    broker, deps, subscribers, schedule, inbox = _wire(settings, engine, registry)

    async def migrate() -> None:
        await run_migrations(
            engine, script_location="notification_router:migrations", service_name=SERVICE_NAME
        )

    async def declare() -> None:
        await declare_topology(broker, retry_delays=settings.rabbitmq.retry_delays)

    retention = RetentionTask(
        {
            "notifications": lambda before, batch: repository.prune_decisions(
                engine, before=before, batch=batch
            ),
            "waiting_windows": lambda before, batch: repository.prune_windows(
                engine, before=before, batch=batch
            ),
        },
        keep=timedelta(days=settings.notification_retention_days),
        interval=settings.retention_prune_interval,
        name="notification-router-retention",
    )

    async def start_periodic_work() -> None:
        schedule.start()
        inbox.start()
        retention.start()

    async def dispose() -> None:
        await schedule.stop()
        await inbox.stop()
        await retention.stop()
        await engine.dispose()

    app = consumer_app(
        broker,
        title=TITLE,
        version=service_version(SERVICE_NAME),
        description=DESCRIPTION,
        registry=registry,
        checks={"database": functools.partial(database_healthy, engine)},
        on_startup=[migrate, declare],
        after_startup=[start_periodic_work],
        after_shutdown=[dispose],
        routes=[explain_route(engine, settings.ops_token)],
    )
    return RouterService(
        settings, broker, engine, registry, deps, subscribers, schedule, inbox, retention, app
    )


def create_app(settings: Settings) -> AsgiFastStream:
    return build_service(settings).app


def specification(settings: Settings) -> AsyncAPI:
    """The AsyncAPI document of the service, without touching a database or a broker."""
    # The document needs the subscribers and publishers only; this engine never connects.
    engine = create_async_engine("sqlite+aiosqlite://")
    broker, _, _, _, _ = _wire(settings, engine, CollectorRegistry())
    return asyncapi_spec(
        broker, title=TITLE, version=service_version(SERVICE_NAME), description=DESCRIPTION
    )
