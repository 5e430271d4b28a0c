"""message-service's settings, read from the environment once, in `main()`."""

from __future__ import annotations

from pydantic import Field

from herald_shared.config import ServiceSettings, default_sqlite_url

SERVICE_NAME = "message-service"


class Settings(ServiceSettings):
    """`PORT`, `HOST`, `DATABASE_URL`, `LOG_LEVEL` and `RABBITMQ_*` (shared), plus the outbox
    relay's pace and the API's limits."""

    port: int = 8000
    database_url: str = default_sqlite_url(SERVICE_NAME)
    # The relay wakes on every commit that wrote an event; this is its heartbeat for anything left
    # over (a nudge lost in a crash, rows written by another replica, a broker that came back).
    outbox_relay_interval: float = Field(default=1.0, gt=0, le=3600)
    outbox_batch_size: int = Field(default=100, ge=1, le=1000)
    # Consecutive publish failures double the wait up to this many seconds.
    outbox_max_backoff: float = Field(default=30.0, gt=0)
    # Published rows hold e-mail addresses and message text: they are deleted after this long.
    outbox_retention: float = Field(default=86400.0, gt=0)
    max_devices_per_user: int = Field(default=20, ge=1, le=1000)
    # Largest request body accepted (413 beyond); the biggest legitimate one, a room of 1000
    # members, is about 40 KiB.
    max_body_bytes: int = Field(default=256 * 1024, ge=1024)
