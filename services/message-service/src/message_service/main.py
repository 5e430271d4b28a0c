"""`message-service`: read the settings, configure logging, serve until SIGTERM."""

from __future__ import annotations

from herald_shared.config import configure_logging
from herald_shared.ops import serve
from herald_shared.tracing import configure_tracing
from message_service.app import build_service
from message_service.settings import SERVICE_NAME, Settings


def main() -> None:
    settings = Settings()
    configure_logging(settings, SERVICE_NAME)
    # Before the application is built: its broker and HTTP layer trace only if this installed
    # a provider (OTEL_EXPORTER_OTLP_ENDPOINT set).
    configure_tracing(SERVICE_NAME)
    # A start-up failure (database or RabbitMQ unavailable) is logged by the lifespan, and
    # uvicorn exits non-zero.
    service = build_service(settings)
    # Real-time streams never end by themselves: they end as the graceful shutdown begins, and
    # their clients reconnect to another replica.
    serve(
        service.app,
        host=settings.host,
        port=settings.port,
        on_shutdown=service.streams.end_all,
    )


if __name__ == "__main__":
    main()
