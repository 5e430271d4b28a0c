"""Assembly: settings in, a runnable ASGI FastStream application out."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import timedelta

from faststream import AsyncAPI
from faststream.asgi import AsgiFastStream
from faststream.rabbit import RabbitBroker
from faststream.rabbit.publisher import RabbitPublisher
from faststream.rabbit.subscriber import RabbitSubscriber
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from email_sender.backends import EmailBackend, FileBackend, make_backend
from email_sender.channel import EmailChannel, EmailSending
from email_sender.handlers import make_publishers, register_handlers
from email_sender.metrics import EmailMetrics
from email_sender.rendering import EmailRenderer, UnsubscribeLinks
from email_sender.settings import SERVICE_NAME, Settings
from email_sender.tables import email_deliveries
from email_sender.verification import VerificationMailer, VerificationRenderer
from herald_shared.broker import make_broker
from herald_shared.database import database_healthy, make_engine, run_migrations
from herald_shared.events import EmailRequested
from herald_shared.ledger import DeliveryLedger
from herald_shared.ops import asyncapi_spec, consumer_app, service_version
from herald_shared.retry import DeadLetterHooks
from herald_shared.sending import Sender
from herald_shared.topology import declare_topology
from herald_shared.unsubscribe import unsubscribe_tokens

TITLE = SERVICE_NAME
DESCRIPTION = (
    "Sends the e-mail notifications of `notification.email.send` jobs (of one or more messages;"
    " SMTP, or .eml files for local runs), once per notification_id: a redelivered job is"
    " acknowledged without sending. Reports the outcomes, one event per outcome for many jobs at"
    " once, on `notification.email.delivered` / `notification.email.failed`; a hard bounce also on"
    " `email.bounced`. Sends the links that verify addresses (`notification.email.verify`)."
)
# Seconds a verification e-mail's claim outlasts the backend's timeout.
VERIFICATION_LEASE_MARGIN = 5.0
# E-mails written at once by the file backend (it has no connections to share).
FILE_BACKEND_IN_FLIGHT = 16


@dataclass(frozen=True)
class EmailService:
    """Everything `create_app` wires together, for tests and tools that need the parts."""

    settings: Settings
    broker: RabbitBroker
    engine: AsyncEngine
    registry: CollectorRegistry
    backend: EmailBackend
    publishers: dict[str, RabbitPublisher]
    sender: Sender[EmailRequested]
    subscribers: tuple[RabbitSubscriber, ...]
    app: AsgiFastStream


def renderer_for(settings: Settings) -> EmailRenderer:
    return EmailRenderer(
        sender=settings.email_from,
        message_id_domain=settings.email_message_id_domain,
        unsubscribe=UnsubscribeLinks(
            url=settings.unsubscribe_url,
            tokens=unsubscribe_tokens(settings.unsubscribe_secret),
            lifetime=timedelta(days=settings.unsubscribe_token_days),
        ),
        room_url_template=settings.room_url_template,
    )


def _wire(
    settings: Settings,
    engine: AsyncEngine,
    registry: CollectorRegistry,
    backend: EmailBackend,
) -> tuple[
    RabbitBroker, dict[str, RabbitPublisher], Sender[EmailRequested], tuple[RabbitSubscriber, ...]
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
    ledger = DeliveryLedger(engine, email_deliveries)
    mailer = VerificationMailer(
        backend,
        VerificationRenderer(
            sender=settings.email_from,
            message_id_domain=settings.email_message_id_domain,
            url=settings.verification_url,
        ),
        ledger,
        # The whole of a send: the lease is not renewed while it lasts.
        lease=timedelta(seconds=settings.smtp_timeout + VERIFICATION_LEASE_MARGIN),
    )
    in_flight = (
        FILE_BACKEND_IN_FLIGHT if isinstance(backend, FileBackend) else settings.smtp.pool_size
    )
    sending = EmailSending(backend, renderer_for(settings), timeout=settings.smtp_timeout)
    sender = Sender(
        spec=EmailChannel(sending, max_in_flight=in_flight),
        ledger=ledger,
        publishers=publishers,
        publish_timeout=settings.rabbitmq.publish_timeout,
        metrics=EmailMetrics(registry),
        tuning=settings.sender_tuning(),
    )
    sender.export_gauges(registry)
    return broker, publishers, sender, register_handlers(broker, sender, hooks, mailer)


def build_service(settings: Settings, *, backend: EmailBackend | None = None) -> EmailService:
    """The service's parts. `backend` replaces the one `EMAIL_BACKEND` selects (tests)."""
    registry = CollectorRegistry()
    # Every in-flight message may hold a connection; make_engine adds as much overflow again.
    engine = make_engine(settings.database_url, pool_size=settings.rabbitmq.prefetch)
    backend = backend or make_backend(settings)
    broker, publishers, sender, subscribers = _wire(settings, engine, registry, backend)

    async def migrate() -> None:
        await run_migrations(
            engine, script_location="email_sender:migrations", service_name=SERVICE_NAME
        )

    async def declare() -> None:
        await declare_topology(broker, retry_delays=settings.rabbitmq.retry_delays)

    async def close() -> None:
        try:
            await sender.aclose(timeout=settings.rabbitmq.graceful_timeout)
            await backend.close()  # the SMTP pool's idle connections
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
    return EmailService(
        settings, broker, engine, registry, backend, publishers, sender, subscribers, app
    )


def create_app(settings: Settings, *, backend: EmailBackend | None = None) -> AsgiFastStream:
    return build_service(settings, backend=backend).app


def specification(settings: Settings) -> AsyncAPI:
    """The AsyncAPI document of the service (no connection, no database, no side effects)."""
    # The document needs the subscriber and publishers only; this engine never connects.
    engine = create_async_engine("sqlite+aiosqlite://")
    backend = FileBackend(settings.email_file_dir)
    broker, _, _, _ = _wire(settings, engine, CollectorRegistry(), backend)
    return asyncapi_spec(
        broker, title=TITLE, version=service_version(SERVICE_NAME), description=DESCRIPTION
    )
