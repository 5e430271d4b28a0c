"""`notification-router`: read the settings, configure logging, serve until SIGTERM."""

from __future__ import annotations

from herald_shared.config import configure_logging
from herald_shared.ops import serve
from notification_router.app import create_app
from notification_router.settings import SERVICE_NAME, Settings


def main() -> None:
    settings = Settings()
    configure_logging(settings, SERVICE_NAME)
    serve(create_app(settings), host=settings.host, port=settings.port)


if __name__ == "__main__":
    main()
