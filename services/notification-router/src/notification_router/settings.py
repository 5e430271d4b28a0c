"""notification-router's settings, read from the environment once, in `main()`."""

from __future__ import annotations

from pydantic import Field, SecretStr

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
    # The schedule of what waits: how often a router looks for windows that ended
    # (`SCHEDULE_POLL_INTERVAL`, seconds), and how many it takes at once.
    schedule_poll_interval: float = Field(default=1.0, gt=0, le=60)
    schedule_batch_size: int = Field(default=100, ge=1, le=1000)
    # `RECALL_LINGER`: seconds a recall waits for more reads of the same user, so that rooms
    # read together are recalled by one push per device.
    recall_linger: float = Field(default=0.5, ge=0, le=10)
    # `EMAIL_DELAY_SCALE`: multiplies every user's e-mail delay. For demos and tests that cannot
    # wait two minutes; leave it at 1 in production.
    email_delay_scale: float = Field(default=1.0, gt=0, le=1)
    # `OPS_TOKEN`: the bearer token of the operators' "why (not)?" endpoint
    # (`/ops/notifications`); unset, the endpoint answers 404. Never a user's token.
    ops_token: SecretStr | None = None
    # The inbox relay (`inbox.py`): how often a router publishes the inbox items that changed
    # (`INBOX_RELAY_INTERVAL`, seconds: the inbox lags the ledger by about this much), and how
    # many changes one publication takes at most (`INBOX_RELAY_BATCH`).
    inbox_relay_interval: float = Field(default=0.2, gt=0, le=60)
    inbox_relay_batch: int = Field(default=500, ge=1, le=5000)
    # Retention (`NOTIFICATION_RETENTION_DAYS`): decisions, their deliveries and the windows
    # that ended are deleted this many days on, in batches, every `RETENTION_PRUNE_INTERVAL` s.
    notification_retention_days: int = Field(default=90, ge=1, le=3650)
    retention_prune_interval: float = Field(default=3600.0, gt=0)
