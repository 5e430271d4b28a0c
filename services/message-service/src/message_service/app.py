"""Assembly: settings in, the FastAPI application out (API, broker, outbox relay, ops endpoints)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from fastapi import FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.telemetry import TelemetryConfig
from faststream import AsyncAPI
from faststream.rabbit import RabbitBroker
from faststream.rabbit.publisher import RabbitPublisher
from opentelemetry.trace import TracerProvider
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from herald_shared.asyncapi_docs import (
    ASSET_MEDIA_TYPES,
    ASYNCAPI_JSON_PATH,
    ASYNCAPI_PATH,
    asset,
    asset_headers,
    asset_url,
    asyncapi_html,
)
from herald_shared.broker import make_broker
from herald_shared.database import database_healthy, make_engine, run_migrations
from herald_shared.events import (
    EmailVerificationRequested,
    InvitationCreated,
    MessageCreated,
    MessageDeleted,
    MessageEdited,
    PresenceChanged,
    RoomLeft,
    RoomRead,
    UserUpdated,
)
from herald_shared.metrics import herald_metrics, refresh_broker_gauges
from herald_shared.ops import broker_healthy, consumers_ready, service_version
from herald_shared.publishing import event_publisher, publish_event
from herald_shared.retention import RetentionTask
from herald_shared.retry import describe_error
from herald_shared.topology import (
    EMAIL_VERIFY,
    MESSAGE_DELETED,
    MESSAGE_NEW,
    MESSAGE_UPDATED,
    PRESENCE_CHANGED,
    ROOM_INVITATION_CREATED,
    ROOM_LEFT,
    ROOM_READ,
    USER_UPDATED,
    declare_topology,
)
from message_service import openapi_pages, repository
from message_service.api import router
from message_service.api.deps import ApiDeps, ApiMetrics
from message_service.api.responses import clipped, with_common_answers
from message_service.docs_index import DOCS_INDEX_PATH, docs_index_html, herald_services
from message_service.email_verification import (
    EmailVerification,
    email_verification_tokens,
)
from message_service.handlers import HandlerDeps, Subscribers, register_handlers
from message_service.outbox import OutboxMetrics, OutboxRelay
from message_service.passwords import PasswordParameters, Passwords
from message_service.pruning import DevicePruner, SessionSweeper
from message_service.ratelimit import RateLimited, RateLimiter, RateLimitMetrics
from message_service.service import ServiceError
from message_service.settings import SERVICE_NAME, Settings
from message_service.stream import StreamHub, StreamMetrics

if TYPE_CHECKING:
    from message_service.oidc import OidcVerifier

logger = logging.getLogger("message_service.app")


def email_verification_of(settings: Settings) -> EmailVerification:
    """How addresses are verified, from the settings (the key is loaded on first use)."""
    return EmailVerification(
        tokens=email_verification_tokens(settings.unsubscribe_secret),
        enabled=settings.email_verification,
        interval=timedelta(seconds=settings.email_verification_interval),
        lifetime=timedelta(hours=settings.email_verification_token_hours),
        bounce_limit=settings.email_bounce_limit,
    )


TITLE = SERVICE_NAME
DESCRIPTION = (
    "Chat users, rooms and messages over HTTP. Every stored message and every change to what "
    "notification routing needs about a user is published from a transactional outbox; the "
    "service consumes device invalidations from the push provider and e-mail bounces from the "
    "mail server."
)
# The ASGI interface, as the middleware below uses it.
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class StartupError(RuntimeError):
    """A dependency the service cannot run without is unavailable (already logged)."""


@dataclass(frozen=True)
class MessageService:
    """Everything `build_service` wires together, for tests and tools that need the parts."""

    settings: Settings
    broker: RabbitBroker
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    registry: CollectorRegistry
    publishers: Mapping[str, RabbitPublisher]
    subscribers: Subscribers
    relay: OutboxRelay
    specification: AsyncAPI
    pruner: DevicePruner
    session_sweeper: SessionSweeper
    oidc: OidcVerifier | None
    retention: RetentionTask
    streams: StreamHub
    limiter: RateLimiter
    app: FastAPI


def service_of(app: FastAPI) -> MessageService:
    service: MessageService = app.state.service
    return service


def _broker(
    settings: Settings, registry: CollectorRegistry, tracer_provider: TracerProvider | None = None
) -> tuple[RabbitBroker, dict[str, RabbitPublisher]]:
    broker = make_broker(
        settings.rabbitmq,
        service_name=SERVICE_NAME,
        registry=registry,
        description=DESCRIPTION,
        tracer_provider=tracer_provider,
    )
    publishers = {
        "new_message": event_publisher(
            broker,
            MessageCreated,
            MESSAGE_NEW,
            description="A chat message was stored; its recipients may need to be notified.",
        ),
        "invitation_created": event_publisher(
            broker,
            InvitationCreated,
            ROOM_INVITATION_CREATED,
            description=(
                "A user was invited to a group room: the one notification they get from it "
                "until they join."
            ),
        ),
        "presence_changed": event_publisher(
            broker,
            PresenceChanged,
            PRESENCE_CHANGED,
            description=(
                "Who has a real-time stream open, and which room they look at: streams opening "
                "and ending, and every heartbeat. Published directly, never through the outbox."
            ),
        ),
        "room_read": event_publisher(
            broker,
            RoomRead,
            ROOM_READ,
            description=(
                "A user read a room up to a message, on some device (a marker that only moves "
                "forward): nothing up to there needs telling them any more."
            ),
        ),
        "room_left": event_publisher(
            broker,
            RoomLeft,
            ROOM_LEFT,
            description=(
                "A user left a group room, or declined its invitation: what still waits of it "
                "is cancelled, and what their devices show of it recalled."
            ),
        ),
        "message_edited": event_publisher(
            broker,
            MessageEdited,
            MESSAGE_UPDATED,
            description=(
                "Its author changed a message's text: what still waits to tell of it tells the "
                "new one."
            ),
        ),
        "message_deleted": event_publisher(
            broker,
            MessageDeleted,
            MESSAGE_DELETED,
            description="Its author deleted a message: what still waits to tell of it is not sent.",
        ),
        "user_updated": event_publisher(
            broker,
            UserUpdated,
            USER_UPDATED,
            description="Full snapshot of a user's contact points and notification preferences.",
        ),
        "email_verification_requested": event_publisher(
            broker,
            EmailVerificationRequested,
            EMAIL_VERIFY,
            description=(
                "A user's new address is to be sent the link that verifies it (at most one per "
                "address per EMAIL_VERIFICATION_INTERVAL)."
            ),
        ),
    }
    return broker, publishers


def _spec(broker: RabbitBroker) -> AsyncAPI:
    return AsyncAPI(
        broker, title=TITLE, version=service_version(SERVICE_NAME), description=DESCRIPTION
    )


def specification(settings: Settings) -> AsyncAPI:
    """The AsyncAPI document of the service (publishers and subscriber), without touching a
    database or a broker."""
    broker, _ = _broker(settings, CollectorRegistry())
    # The document needs the subscriber's signature only: these sessions are never opened.
    register_handlers(
        broker, HandlerDeps(sessions=async_sessionmaker(class_=AsyncSession), nudge=lambda: None)
    )
    return _spec(broker)


def create_app(settings: Settings, *, tracer_provider: TracerProvider | None = None) -> FastAPI:
    return build_service(settings, tracer_provider=tracer_provider).app


def build_service(
    settings: Settings, *, tracer_provider: TracerProvider | None = None
) -> MessageService:
    """The service's parts. `tracer_provider`: where spans go (tests); by default the global
    one, which `herald_shared.tracing.configure_tracing` installs when an OTLP endpoint is
    configured."""
    registry = CollectorRegistry()
    engine = make_engine(settings.database_url, pool_size=settings.rabbitmq.prefetch)
    sessions = async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)
    broker, publishers = _broker(settings, registry, tracer_provider)
    relay = OutboxRelay(
        engine=engine,
        publishers=publishers,
        metrics=OutboxMetrics(registry),
        publish_timeout=settings.rabbitmq.publish_timeout,
        batch_size=settings.outbox_batch_size,
        interval=settings.outbox_relay_interval,
        max_backoff=settings.outbox_max_backoff,
        retention=settings.outbox_retention,
    )
    subscribers = register_handlers(
        broker,
        HandlerDeps(
            sessions=sessions, nudge=relay.nudge, email_bounce_limit=settings.email_bounce_limit
        ),
    )
    presence_publisher = publishers["presence_changed"]

    async def publish_presence(event: PresenceChanged) -> None:
        await publish_event(presence_publisher, event, timeout=settings.rabbitmq.publish_timeout)

    streams = StreamHub(
        engine=engine,
        publish_presence=publish_presence,
        metrics=StreamMetrics(registry),
        poll_interval=settings.stream_poll_interval,
        heartbeat=settings.stream_heartbeat,
        presence_ttl=settings.presence_ttl,
    )
    limiter = RateLimiter(
        budgets=settings.rate_limit_budgets(),
        metrics=RateLimitMetrics(registry),
        redis_url=settings.redis_url,
        key_prefix=settings.rate_limit_key_prefix,
        redis_timeout=settings.rate_limit_redis_timeout,
        enabled=settings.rate_limits,
    )
    oidc: OidcVerifier | None = None
    if settings.oidc_issuer is not None:
        # Imported only when an identity provider is configured (`message_service.identity`).
        from message_service.oidc import OidcVerifier

        oidc = OidcVerifier(
            issuer=settings.oidc_issuer,
            audience=settings.oidc_audience or "",
            algorithms=settings.oidc_algorithms,
            jwks_url=settings.oidc_jwks_url,
            cache_seconds=settings.oidc_jwks_cache_seconds,
        )
    app = FastAPI(
        title=TITLE,
        version=service_version(SERVICE_NAME),
        description=DESCRIPTION,
        lifespan=_lifespan,
        telemetry=_telemetry(tracer_provider),
        # Served by _add_docs_routes, with their scripts from here rather than a CDN.
        docs_url=None,
        redoc_url=None,
    )
    service = MessageService(
        settings=settings,
        broker=broker,
        engine=engine,
        sessions=sessions,
        registry=registry,
        publishers=publishers,
        subscribers=subscribers,
        relay=relay,
        specification=_spec(broker),
        pruner=DevicePruner(
            sessions=sessions,
            nudge=relay.nudge,
            stale_after=timedelta(days=settings.device_stale_after_days),
            interval=settings.device_prune_interval,
        ),
        oidc=oidc,
        session_sweeper=SessionSweeper(
            sessions=sessions, nudge=relay.nudge, interval=settings.session_sweep_interval
        ),
        retention=RetentionTask(
            {
                "inbox_items": lambda before, batch: repository.prune_inbox(
                    engine, before=before, batch=batch
                )
            },
            keep=timedelta(days=settings.notification_retention_days),
            interval=settings.retention_prune_interval,
            name="message-service-retention",
        ),
        streams=streams,
        limiter=limiter,
        app=app,
    )
    app.state.service = service
    app.state.email_verification = email_verification_of(settings)
    app.state.api_deps = ApiDeps(
        engine=engine,
        sessions=sessions,
        nudge=relay.nudge,
        max_devices_per_user=settings.max_devices_per_user,
        webpush_allowed_hosts=settings.webpush_allowed_hosts,
        streams=streams,
        limiter=limiter,
        trusted_proxies=settings.trusted_proxies,
        registration_min_seconds=settings.registration_min_seconds,
        session_ttl=settings.session_ttl,
        passwords=Passwords(
            PasswordParameters(
                time_cost=settings.password_hash_time_cost,
                memory_kib=settings.password_hash_memory_kib,
                parallelism=settings.password_hash_parallelism,
            )
        ),
        metrics=ApiMetrics(registry),
        oidc=oidc,
        builtin_accounts=settings.builtin_accounts,
    )
    app.include_router(router)
    _add_ops_routes(app, service)
    _document_common_answers(app)
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RateLimited, _rate_limited)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    # Added last = outermost: a body too large never reaches the app, and no unhandled error
    # reaches the server's logger with its message (which may quote personal data).
    app.add_middleware(SafeErrors)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    return service


def _telemetry(tracer_provider: TracerProvider | None) -> TelemetryConfig:
    """FastAPI's own OpenTelemetry support: a server span per API request (continuing a caller's
    `traceparent`), with the global provider unless one is given; nothing when there is none.
    Spans only: metrics are Prometheus's, and its log records would quote exception messages."""
    return {
        "tracer_provider": tracer_provider,
        "tracing": True,
        "metrics": False,
        "logs": False,
        # The exporter is `configure_tracing`'s, never a second one from FASTAPI_OTEL_* variables.
        "auto_configure": False,
        "exclude": _untraced,
    }


def _untraced(scope: MutableMapping[str, Any]) -> bool:
    """Probes, scrapes and documentation: frequent, and no part of any notification's trace."""
    path = str(scope.get("path", ""))
    return path.startswith(("/health", "/metrics", "/docs", "/redoc", "/openapi.json"))


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    runtime = service_of(app)
    settings = runtime.settings
    try:
        await run_migrations(
            runtime.engine,
            script_location="message_service:migrations",
            service_name=SERVICE_NAME,
        )
    except Exception as exc:
        where = make_url(settings.database_url).render_as_string(hide_password=True)
        logger.error(
            "message_service.startup.database_unavailable database=%s error=%s",
            where,
            describe_error(exc),
        )
        await runtime.engine.dispose()
        raise StartupError(f"database unavailable at {where}") from None
    try:
        # The topology first (it connects): the subscriber must not consume before the
        # queues its retries and dead letters need exist.
        await declare_topology(runtime.broker, retry_delays=settings.rabbitmq.retry_delays)
        await runtime.broker.start()
    except Exception as exc:
        address = ",".join(rabbitmq_address(url) for url in settings.rabbitmq.addresses)
        logger.error(
            "message_service.startup.rabbitmq_unreachable address=%s error=%s (check RABBITMQ_URL)",
            address,
            type(exc).__name__,
        )
        await runtime.broker.stop()
        await runtime.engine.dispose()
        raise StartupError(f"RabbitMQ unreachable at {address}") from None
    runtime.relay.start()
    runtime.pruner.start()
    runtime.session_sweeper.start()
    runtime.retention.start()
    runtime.streams.start()
    logger.info(
        "message_service.started port=%d rate_limits=%s",
        settings.port,
        ("redis" if runtime.limiter.shared else "in-process") if runtime.limiter.enabled else "off",
    )
    try:
        yield
    finally:
        # The streams first (their goodbyes need the broker), the pruner, then the relay: the
        # relay needs the broker to finish the publish in flight, and publishes what the
        # pruner staged.
        await runtime.streams.stop()
        await runtime.pruner.stop()
        await runtime.session_sweeper.stop()
        await runtime.retention.stop()
        await runtime.relay.stop()
        await runtime.broker.stop()
        await runtime.engine.dispose()
        await runtime.limiter.close()
        if runtime.oidc is not None:
            await runtime.oidc.close()
        app.state.api_deps.passwords.close()
        logger.info("message_service.stopped")


def rabbitmq_address(url: str) -> str:
    """`host:port` of an AMQP URL, for logs (never the credentials)."""
    parsed = urlsplit(url)
    default_port = 5671 if parsed.scheme == "amqps" else 5672
    return f"{parsed.hostname}:{parsed.port or default_port}"


def _document_common_answers(app: FastAPI) -> None:
    """The OpenAPI document FastAPI generates, plus the answers no route declares itself (401,
    400, 413: `responses.with_common_answers`), made once on first request."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = with_common_answers(
                get_openapi(
                    title=app.title,
                    version=app.version,
                    description=app.description,
                    routes=app.routes,
                )
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend it


# pydantic's message quotes the whole regular expression.
_PATTERN_MISMATCH = "String does not match the pattern of this field (in the OpenAPI document)"


async def _invalid_request(_request: Request, exc: Exception) -> Response:
    """422 with where and why each part is wrong, never the input itself: an answer must not
    echo back what it refused (an address, a token), and a NaN in it is not even JSON. A place
    may be named by a key the caller sent (an unknown field): clipped."""
    if not isinstance(exc, RequestValidationError):  # registered for it only
        raise exc
    errors = [
        {
            "type": error["type"],
            "loc": [clipped(part) if isinstance(part, str) else part for part in error["loc"]],
            "msg": _PATTERN_MISMATCH
            if error["type"] == "string_pattern_mismatch"
            else clipped(error["msg"]),
        }
        for error in exc.errors()
    ]
    return JSONResponse({"detail": errors}, status_code=422)


async def _service_error(_request: Request, exc: Exception) -> Response:
    if not isinstance(exc, ServiceError):  # registered for ServiceError only
        raise exc
    # A detail may list what the caller sent (unknown user ids): clipped.
    return JSONResponse({"detail": clipped(exc.detail)}, status_code=exc.status_code)


async def _rate_limited(_request: Request, exc: Exception) -> Response:
    """429 with when to come back (`Retry-After`) and the budget that ran out."""
    if not isinstance(exc, RateLimited):  # registered for it only
        raise exc
    return JSONResponse(
        {"detail": f"rate limit reached ({exc.budget}): retry after {exc.retry_after} s"},
        status_code=429,
        headers=exc.headers(),
    )


_HTTP_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


async def _http_error(request: Request, exc: Exception) -> Response:
    """FastAPI's answer, except that a 405's `Allow` names every method of the path: Starlette
    names those of the first route matching the path only (GET, not the PATCH beside it)."""
    if not isinstance(exc, StarletteHTTPException):  # registered for it only
        raise exc
    if exc.status_code != 405:
        return await http_exception_handler(request, exc)
    # Each method asked of every route (included routers answer for their own routes).
    allowed = [
        method
        for method in _HTTP_METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] is Match.FULL
            for route in request.app.router.routes
        )
    ]
    return JSONResponse(
        {"detail": "Method Not Allowed"},
        status_code=405,
        headers={"Allow": ", ".join(allowed)},
    )


# --- operational endpoints ----------------------------------------------------------------------


def _add_ops_routes(app: FastAPI, runtime: MessageService) -> None:
    @app.get("/health", include_in_schema=False)
    async def liveness() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/health/ready", include_in_schema=False)
    async def readiness() -> Response:
        checks = {
            "database": await database_healthy(runtime.engine),
            "rabbitmq": await broker_healthy(runtime.broker),
            "consumers": await consumers_ready(runtime.broker),
        }
        ready = all(checks.values())
        return JSONResponse(
            {"status": "ready" if ready else "not ready", "checks": checks},
            status_code=200 if ready else 503,
        )

    @app.get("/health/rabbitmq", include_in_schema=False)
    async def rabbitmq_health() -> Response:
        healthy = await broker_healthy(runtime.broker)
        return JSONResponse(
            {"status": "healthy" if healthy else "unhealthy"}, status_code=200 if healthy else 503
        )

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        # Queue depth and consumer gauges are asked from RabbitMQ at scrape time.
        await refresh_broker_gauges(runtime.broker, herald_metrics(runtime.registry))
        return Response(generate_latest(runtime.registry), media_type=CONTENT_TYPE_LATEST)

    _add_docs_routes(app, runtime)


def _add_docs_routes(app: FastAPI, runtime: MessageService) -> None:
    """The AsyncAPI page (its script and style served from here: no CDN, no try-it-out), its
    document, the index of every service's documentation, and Swagger UI and ReDoc (their
    scripts served from here too)."""
    # Rendered once, from the channels declared in `create_app`.
    document = runtime.specification.to_specification()
    document_json = document.to_json()
    page = asyncapi_html(document.title, document_json)
    settings = runtime.settings
    index = docs_index_html(
        herald_services(
            notification_router_url=settings.notification_router_docs_url,
            push_sender_url=settings.push_sender_docs_url,
            email_sender_url=settings.email_sender_docs_url,
        )
    )

    @app.get(ASYNCAPI_PATH, include_in_schema=False)
    async def asyncapi_page() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get(ASYNCAPI_JSON_PATH, include_in_schema=False)
    async def asyncapi_document() -> Response:
        return Response(document_json, media_type="application/json")

    @app.get(DOCS_INDEX_PATH, include_in_schema=False)
    async def docs_index() -> HTMLResponse:
        return HTMLResponse(index)

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return openapi_pages.swagger_ui_page(TITLE, "/openapi.json")

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return openapi_pages.redoc_page(TITLE, "/openapi.json")

    for name in openapi_pages.ASSET_MEDIA_TYPES:
        app.add_api_route(
            openapi_pages.asset_url(name),
            _openapi_asset_endpoint(name),
            methods=["GET"],
            include_in_schema=False,
        )

    for name in ASSET_MEDIA_TYPES:
        app.add_api_route(
            asset_url(name),
            _asset_endpoint(name),
            methods=["GET"],
            include_in_schema=False,
        )


def _openapi_asset_endpoint(name: str) -> Callable[[], Awaitable[Response]]:
    async def serve_asset() -> Response:
        return Response(openapi_pages.asset(name), headers=openapi_pages.asset_headers(name))

    return serve_asset


def _asset_endpoint(name: str) -> Callable[[], Awaitable[Response]]:
    async def serve_asset() -> Response:
        return Response(asset(name), headers=asset_headers(name))

    return serve_asset


# --- ASGI middleware ----------------------------------------------------------------------------


class _BodyTooLarge(HTTPException):
    """An HTTPException, so that FastAPI answers 413 rather than "error parsing the body"."""

    def __init__(self) -> None:
        super().__init__(413, "request body too large")


class BodySizeLimit:
    """413 for a request body over `max_bytes`, announced or streamed."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await _too_large(scope, receive, send)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge()
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await _too_large(scope, receive, send)


async def _too_large(scope: Scope, receive: Receive, send: Send) -> None:
    response = JSONResponse({"detail": "request body too large"}, status_code=413)
    await response(scope, receive, send)


class SafeErrors:
    """Unhandled errors become a bare 500 and one log line naming the error's class and where it
    was raised, never its message."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except _BodyTooLarge:
            raise
        except Exception as exc:
            logger.error(
                "message_service.http.unhandled method=%s path=%s error=%s",
                scope.get("method"),
                scope.get("path"),
                describe_error(exc),
            )
            if not started:
                response = JSONResponse({"detail": "internal error"}, status_code=500)
                await response(scope, receive, send)
