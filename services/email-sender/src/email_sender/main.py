"""The `email-sender` console script."""

from __future__ import annotations

from email_sender.app import create_app
from email_sender.settings import SERVICE_NAME, Settings
from herald_shared.config import configure_logging
from herald_shared.ops import serve


def main() -> None:
    settings = Settings()
    configure_logging(settings, SERVICE_NAME)
    serve(create_app(settings), host=settings.host, port=settings.port)


if __name__ == "__main__":
    main()
