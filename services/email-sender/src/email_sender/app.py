"""email-sender's FastStream application."""

from __future__ import annotations

from datetime import timedelta
from importlib.metadata import version

from faststream import AsyncAPI
from faststream.asgi import AsgiFastStream
from faststream.rabbit import RabbitBroker
from prometheus_client import CollectorRegistry

from email_sender.backends import EmailBackend, make_backend
from email_sender.delivery import EmailDeliveries
from email_sender.handlers import DELIVERIES_KEY, register_handlers
from email_sender.metrics import EmailMetrics
from email_sender.rendering import EmailRenderer, UnsubscribeLinks
from email_sender.settings import SERVICE_NAME, Settings
from herald_shared.broker import make_broker
from herald_shared.database import database_healthy, make_engine, run_migrations
from herald_shared.ops import asyncapi_spec, consumer_app
from herald_shared.retry import DeadLetterHooks
from herald_shared.topology import declare_topology
from herald_shared.unsubscribe import unsubscribe_tokens

VERSION = version("email-sender")
DESCRIPTION = (
    "Sends the e-mail notifications of `notification.email.send` batches, one message's jobs each"
    " (SMTP, or .eml files for local runs), once per notification_id: a redelivered job is"
    " acknowledged without sending. Reports each batch's outcomes, one event per outcome, on"
    " `notification.email.delivered` / `notification.email.failed`."
)
# How long a claim outlives the SMTP deadline before another worker may take the send over.
LEASE_MARGIN = timedelta(seconds=15)


def build_broker(settings: Settings, *, registry: CollectorRegistry | None = None) -> RabbitBroker:
    hooks = DeadLetterHooks()
    broker = make_broker(
        settings.rabbitmq,
        service_name=SERVICE_NAME,
        registry=registry,
        description=DESCRIPTION,
        dead_letter_hooks=hooks,
    )
    register_handlers(
        broker, publish_timeout=settings.rabbitmq.publish_timeout, dead_letter_hooks=hooks
    )
    return broker


def specification(settings: Settings) -> AsyncAPI:
    """The AsyncAPI document of the service (no connection, no database, no side effects)."""
    return asyncapi_spec(
        build_broker(settings), title=SERVICE_NAME, version=VERSION, description=DESCRIPTION
    )


def create_app(settings: Settings, *, backend: EmailBackend | None = None) -> AsgiFastStream:
    """The service: broker, subscriber, publishers, ledger, backend and ops endpoints.

    `backend` replaces the one `EMAIL_BACKEND` selects (tests).
    """
    registry = CollectorRegistry()
    broker = build_broker(settings, registry=registry)
    engine = make_engine(settings.database_url, pool_size=settings.rabbitmq.prefetch)
    backend = backend or make_backend(settings)
    broker.context.set_global(
        DELIVERIES_KEY,
        EmailDeliveries(
            engine=engine,
            backend=backend,
            renderer=EmailRenderer(
                sender=settings.email_from,
                message_id_domain=settings.email_message_id_domain,
                unsubscribe=UnsubscribeLinks(
                    url=settings.unsubscribe_url,
                    tokens=unsubscribe_tokens(settings.unsubscribe_secret),
                    lifetime=timedelta(days=settings.unsubscribe_token_days),
                ),
            ),
            metrics=EmailMetrics(registry),
            lease=timedelta(seconds=settings.smtp_timeout) + LEASE_MARGIN,
        ),
    )

    async def migrate() -> None:
        await run_migrations(
            engine, script_location="email_sender:migrations", service_name=SERVICE_NAME
        )

    async def declare() -> None:
        await declare_topology(broker, retry_delays=settings.rabbitmq.retry_delays)

    async def database_ready() -> bool:
        return await database_healthy(engine)

    async def dispose() -> None:
        await backend.close()  # the SMTP pool's idle connections
        await engine.dispose()

    return consumer_app(
        broker,
        title=SERVICE_NAME,
        version=VERSION,
        description=DESCRIPTION,
        registry=registry,
        checks={"database": database_ready},
        on_startup=[migrate, declare],
        after_shutdown=[dispose],
    )
