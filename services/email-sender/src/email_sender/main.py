"""The `email-sender` console script."""

from __future__ import annotations

from email_sender.app import create_app
from email_sender.settings import SERVICE_NAME, Settings
from herald_shared.config import configure_logging
from herald_shared.ops import serve
from herald_shared.tracing import configure_tracing


def main() -> None:
    settings = Settings()
    configure_logging(settings, SERVICE_NAME)
    # Before the application is built: its broker and HTTP layer trace only if this installed
    # a provider (OTEL_EXPORTER_OTLP_ENDPOINT set).
    configure_tracing(SERVICE_NAME)
    serve(create_app(settings), host=settings.host, port=settings.port)


if __name__ == "__main__":
    main()
