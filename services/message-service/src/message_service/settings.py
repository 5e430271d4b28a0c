"""message-service's settings, read from the environment once, in `main()`."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated
from urllib.parse import urlsplit

from limits import RateLimitItem
from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode

from herald_shared.config import ServiceSettings, default_sqlite_url
from herald_shared.unsubscribe import UnsubscribeSecret
from herald_shared.webpush import DEFAULT_ALLOWED_HOSTS, AllowedHosts
from message_service.identity import SUPPORTED_ALGORITHMS, check_issuer_url
from message_service.ratelimit import Budget, TrustedProxies, parse_budget

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
    # The real-time stream (`GET /users/me/events`): how often each replica reads the outbox
    # while a stream is open (`STREAM_POLL_INTERVAL`), how often it sends every stream a
    # heartbeat and renews their presence (`STREAM_HEARTBEAT`), and how long a stream counts as
    # open after its last renewal (`PRESENCE_TTL`: a crashed replica's streams expire then).
    stream_poll_interval: float = Field(default=0.1, gt=0, le=5)
    stream_heartbeat: float = Field(default=15.0, gt=0, le=300)
    presence_ttl: float = Field(default=45.0, gt=0, le=3600)
    # Sessions: `SESSION_TTL` (seconds, or ISO 8601 like `P30D`) after its last use a session
    # expires, and the devices registered under it are removed.
    session_ttl: timedelta = Field(
        default=timedelta(days=30), ge=timedelta(minutes=5), le=timedelta(days=3650)
    )
    # How often expired sessions (and their devices) are swept away; their tokens are refused
    # from the moment they expire.
    session_sweep_interval: float = Field(default=60.0, gt=0)
    # OpenID Connect (`message_service.oidc`): with `OIDC_ISSUER` (and `OIDC_AUDIENCE`, the
    # audience Herald's access tokens are issued for), that provider's access tokens are
    # accepted, users made on first sight. `BUILTIN_ACCOUNTS=false` then switches registration,
    # passwords and Herald's own session tokens off.
    oidc_issuer: str | None = None
    oidc_audience: str | None = None
    oidc_jwks_url: str | None = None
    oidc_algorithms: Annotated[frozenset[str], NoDecode] = frozenset({"RS256", "ES256"})
    oidc_jwks_cache_seconds: float = Field(default=300.0, gt=0, le=86400)
    builtin_accounts: bool = True
    # Argon2id's cost (`message_service.passwords`): OWASP's minimum by default. Raising it
    # later is safe: each stored hash keeps its own, and is redone at its owner's next sign-in.
    password_hash_time_cost: int = Field(default=2, ge=1, le=20)
    password_hash_memory_kib: int = Field(default=19 * 1024, ge=8 * 1024, le=4 * 1024 * 1024)
    password_hash_parallelism: int = Field(default=1, ge=1, le=16)
    max_devices_per_user: int = Field(default=20, ge=1, le=1000)
    # A device whose client has not registered its token again for this many days is removed
    # (`DEVICE_STALE_AFTER_DAYS`); the pruner looks every `device_prune_interval` seconds.
    device_stale_after_days: int = Field(default=60, ge=1, le=3650)
    device_prune_interval: float = Field(default=3600.0, gt=0)
    # Inbox items of messages older than `NOTIFICATION_RETENTION_DAYS` are deleted, in
    # batches, every `RETENTION_PRUNE_INTERVAL` seconds (the router keeps its ledger as long).
    notification_retention_days: int = Field(default=90, ge=1, le=3650)
    retention_prune_interval: float = Field(default=3600.0, gt=0)
    # `WEBPUSH_ALLOWED_HOSTS`, comma-separated: where a Web Push subscription's endpoint may
    # point (https only; plain http to an allowlisted loopback host, for local test servers).
    # push-sender reads the same variable and re-checks every endpoint before a POST.
    webpush_allowed_hosts: AllowedHosts = DEFAULT_ALLOWED_HOSTS
    # Largest request body accepted (413 beyond); the biggest legitimate one, a room of 1000
    # members, is about 40 KiB.
    max_body_bytes: int = Field(default=256 * 1024, ge=1024)
    # Verifies the links of e-mails' List-Unsubscribe headers (`/unsubscribe`); the same secret
    # as email-sender's. Unset: a machine-local one (see herald_shared.unsubscribe).
    unsubscribe_secret: UnsubscribeSecret = None
    # E-mail verification (docs/configuration.md): an address is e-mailed only once its owner
    # followed the link sent to it, signed with UNSUBSCRIBE_SECRET under a label of its own.
    # `EMAIL_VERIFICATION=false`: every address counts as verified when it is set, and no
    # verification e-mail is sent (for operators who verify addresses elsewhere).
    email_verification: bool = True
    # At most one verification e-mail per address in this many seconds.
    email_verification_interval: float = Field(default=600.0, ge=0, le=86400)
    email_verification_token_hours: int = Field(default=24, ge=1, le=24 * 30)
    # Hard bounces (SMTP 5xx) of notification e-mails after which an address is unverified.
    email_bounce_limit: int = Field(default=3, ge=1, le=1000)
    # Where a reader's browser reaches the other services, for the links of the documentation
    # index (/docs/services): `NOTIFICATION_ROUTER_DOCS_URL`, `PUSH_SENDER_DOCS_URL`,
    # `EMAIL_SENDER_DOCS_URL`. The defaults are each service's default port on this machine.
    # Rate limits (docs/configuration.md, README "Security"). `RATE_LIMITS=false` switches them
    # off. `REDIS_URL` (`redis://host:6379/0`): the counts every replica shares; unset, each
    # process counts by itself (one replica). Keys start with `RATE_LIMIT_KEY_PREFIX`; a round
    # trip to Redis gives up after `RATE_LIMIT_REDIS_TIMEOUT` seconds (then: fail open).
    rate_limits: bool = True
    redis_url: str | None = None
    rate_limit_key_prefix: str = Field(default="herald", min_length=1, max_length=100)
    rate_limit_redis_timeout: float = Field(default=0.25, gt=0, le=10)
    # `TRUSTED_PROXIES`: the proxies whose `X-Forwarded-For` names the client; none by default
    # (the socket's peer is the client).
    trusted_proxies: TrustedProxies = ()
    # The budgets, in the `limits` notation ("20 per 10 minutes"): `RATE_LIMIT_<BUDGET>`.
    rate_limit_registration: str = "20 per hour"  # per IP
    rate_limit_auth_failures: str = "20 per 10 minutes"  # per IP
    rate_limit_sign_ins: str = "30 per 10 minutes"  # per IP
    rate_limit_sign_in_failures: str = "10 per 15 minutes"  # per account
    rate_limit_anonymous: str = "60 per minute"  # per IP
    rate_limit_posting: str = "120 per minute"  # per user
    rate_limit_rooms: str = "60 per hour"  # per user
    rate_limit_invitations: str = "1000 per hour"  # per user, one per invitee
    rate_limit_devices: str = "30 per hour"  # per user
    rate_limit_session: str = "600 per minute"  # per session
    # Every registration answer (201, 409) comes this many seconds after the request at the
    # soonest, so that its timing does not tell whether a username exists.
    registration_min_seconds: float = Field(default=0.1, ge=0, le=5)
    notification_router_docs_url: str = "http://127.0.0.1:8001"
    push_sender_docs_url: str = "http://127.0.0.1:8002"
    email_sender_docs_url: str = "http://127.0.0.1:8003"

    @field_validator("oidc_algorithms", mode="before")
    @classmethod
    def _algorithms(cls, value: object) -> object:
        if isinstance(value, str):
            return frozenset(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("oidc_issuer")
    @classmethod
    def _issuer(cls, value: str | None) -> str | None:
        return None if value is None else check_issuer_url(value)

    @model_validator(mode="after")
    def _accounts(self) -> Settings:
        if self.oidc_issuer is not None and not self.oidc_audience:
            raise ValueError("OIDC_ISSUER needs OIDC_AUDIENCE")
        if not self.builtin_accounts and self.oidc_issuer is None:
            raise ValueError("BUILTIN_ACCOUNTS=false needs OIDC_ISSUER: no one could sign in")
        unsupported = self.oidc_algorithms - SUPPORTED_ALGORITHMS
        if unsupported:
            raise ValueError(f"OIDC_ALGORITHMS: not supported: {sorted(unsupported)}")
        return self

    @field_validator(*(f"rate_limit_{budget.value}" for budget in Budget))
    @classmethod
    def _rate_limit(cls, value: str) -> str:
        parse_budget(value)
        return value

    @field_validator(
        "notification_router_docs_url", "push_sender_docs_url", "email_sender_docs_url"
    )
    @classmethod
    def _http_base_url(cls, value: str) -> str:
        parsed = urlsplit(value)
        if parsed.scheme not in {"http", "https"} or not parsed.hostname:
            raise ValueError(f"not an http(s) base URL: {value!r}")
        return value.rstrip("/")

    def rate_limit_budgets(self) -> dict[Budget, RateLimitItem]:
        return {
            budget: parse_budget(getattr(self, f"rate_limit_{budget.value}")) for budget in Budget
        }
