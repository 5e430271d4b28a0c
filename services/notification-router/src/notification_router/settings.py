"""notification-router's settings, read from the environment once, in `main()`."""

from __future__ import annotations

from pydantic import Field

from herald_shared.config import ServiceSettings, default_sqlite_url

SERVICE_NAME = "notification-router"


class Settings(ServiceSettings):
    """`PORT`, `HOST`, `DATABASE_URL`, `LOG_LEVEL` and `RABBITMQ_*` (shared), plus the limits of
    what a push notification shows."""

    port: int = 8001
    database_url: str = default_sqlite_url(SERVICE_NAME)
    # Characters (not bytes) a push title / body may have; FCM caps the whole payload at 4096
    # bytes, and a phone shows a line or two anyway.
    push_title_max_chars: int = Field(default=100, ge=10, le=500)
    push_body_max_chars: int = Field(default=200, ge=10, le=1000)
    # E-mail waits until a user has had no real-time stream open for this many seconds
    # (`EMAIL_AFTER_OFFLINE_SECONDS`): they are reading, or just were.
    email_after_offline_seconds: float = Field(default=60.0, ge=0, le=86400)
