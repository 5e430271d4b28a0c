"""push-sender's configuration: the shared service settings plus the push provider's."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

import httpx
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from herald_shared.config import LOCAL_STATE_DIR, SenderSettings, default_sqlite_url
from herald_shared.webpush import DEFAULT_ALLOWED_HOSTS, AllowedHosts, is_loopback

SERVICE_NAME = "push-sender"

FCM_DEFAULT_BASE_URL = "https://fcm.googleapis.com"
APNS_DEFAULT_BASE_URL = "https://api.push.apple.com"


class PushProviderKind(StrEnum):
    LOG = "log"  # zero-setup default: every push, whatever its platform, is one JSON line
    # Each platform through its own provider, for every platform whose settings are given
    # (FCM_CREDENTIALS_FILE, APNS_KEY_FILE, WEBPUSH_*); a push to a platform without them is
    # reported failed as "unsupported platform".
    LIVE = "live"
    FCM = "fcm"  # `live`, and FCM_CREDENTIALS_FILE is required (the original single provider)


def check_secure_url(value: str, *, what: str) -> str:
    """An https URL, or http to this machine only: an access token (or the signed assertion that
    buys one) must never cross a network in clear text."""
    try:
        url = httpx.URL(value)
    except httpx.InvalidURL:
        raise ValueError(f"{what} must be an http(s) URL") from None
    if url.scheme not in {"http", "https"} or not url.host:
        raise ValueError(f"{what} must be an http(s) URL")
    if url.scheme == "http" and not is_loopback(url.host):
        raise ValueError(f"{what} must use https (plain http is allowed for loopback hosts only)")
    return value


class FcmSettings(BaseSettings):
    """`FCM_*`: the FCM HTTP v1 provider."""

    model_config = SettingsConfigDict(env_prefix="FCM_", extra="ignore")

    # The service-account JSON file downloaded from the Firebase console (a secret).
    credentials_file: Path | None = None
    # None: the `project_id` of the credentials file.
    project_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9:._-]*$")
    base_url: str = FCM_DEFAULT_BASE_URL
    # Seconds for each HTTP exchange step (connect, write, read, waiting for a pooled connection).
    timeout: float = Field(default=10.0, gt=0, le=120)

    @field_validator("base_url")
    @classmethod
    def _secure_base_url(cls, value: str) -> str:
        return check_secure_url(value, what="FCM_BASE_URL").rstrip("/")


class ApnsSettings(BaseSettings):
    """`APNS_*`: Apple Push Notification service, token-based (JWT) authentication."""

    model_config = SettingsConfigDict(env_prefix="APNS_", extra="ignore")

    # The `AuthKey_<key id>.p8` signing key downloaded from the Apple developer account (a secret).
    key_file: Path | None = None
    # Apple's identifiers are 10 upper-case letters or digits; a typo here fails at start-up.
    key_id: str | None = Field(default=None, pattern=r"^[A-Z0-9]{10}$")
    team_id: str | None = Field(default=None, pattern=r"^[A-Z0-9]{10}$")
    # The app's bundle id (`apns-topic`).
    topic: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9.-]*$")
    # Production; the sandbox is https://api.sandbox.push.apple.com (development builds).
    base_url: str = APNS_DEFAULT_BASE_URL
    # Seconds for each HTTP exchange step (connect, write, read, waiting for a pooled connection).
    timeout: float = Field(default=10.0, gt=0, le=120)

    @field_validator("base_url")
    @classmethod
    def _secure_base_url(cls, value: str) -> str:
        return check_secure_url(value, what="APNS_BASE_URL").rstrip("/")


class WebPushSettings(BaseSettings):
    """`WEBPUSH_*`: Web Push (RFC 8030) with VAPID (RFC 8292) and aes128gcm payloads (RFC 8291)."""

    model_config = SettingsConfigDict(env_prefix="WEBPUSH_", extra="ignore")

    # The VAPID signing key (a secret): a PEM P-256 private key, or the raw 32-byte key in
    # base64url as `web-push generate-vapid-keys` prints it. Its public half is the
    # applicationServerKey the web app subscribes with.
    vapid_private_key_file: Path | None = None
    # Who push services contact about our traffic (RFC 8292 `sub`): mailto: or https: URI.
    vapid_subject: str | None = Field(default=None, pattern=r"^(mailto:|https://)\S+$")
    # Seconds a push service keeps a push for a browser that is offline (RFC 8030 `TTL`).
    ttl: int = Field(default=86400, ge=0, le=28 * 86400)
    # Seconds for each HTTP exchange step (connect, write, read, waiting for a pooled connection).
    timeout: float = Field(default=10.0, gt=0, le=120)
    # The push services endpoints may point at (`herald_shared.webpush`, the rule message-service
    # applies too); comma-separated in the environment. Tests add a loopback host for their local
    # push service.
    allowed_hosts: AllowedHosts = DEFAULT_ALLOWED_HOSTS

    @model_validator(mode="after")
    def _subject_with_key(self) -> WebPushSettings:
        if self.vapid_private_key_file is not None and self.vapid_subject is None:
            raise ValueError("WEBPUSH_VAPID_SUBJECT (mailto: or https: contact) is required")
        return self


class BreakerSettings(BaseSettings):
    """`PUSH_BREAKER_*`: the circuit breaker every provider has (`herald_shared.resilience`)."""

    model_config = SettingsConfigDict(env_prefix="PUSH_BREAKER_", extra="ignore")

    # Consecutive transient failures that open a provider's breaker…
    failures: int = Field(default=5, ge=1)
    # …or this share of failures over the last `window` seconds, once `min_calls` calls were made.
    failure_rate: float = Field(default=0.5, gt=0, le=1)
    window: float = Field(default=60.0, gt=0)
    min_calls: int = Field(default=20, ge=1)
    # Seconds an opened breaker waits before one probe; doubled after each failed probe, up to
    # `max_cool_down`.
    cool_down: float = Field(default=30.0, gt=0)
    max_cool_down: float = Field(default=600.0, gt=0)


class MaxInFlightSettings(BaseSettings):
    """`PUSH_MAX_IN_FLIGHT_<PROVIDER>`: each provider's concurrency limit, the sends in flight to
    it at once per process (unset: 100). Jobs beyond it wait for a place, in turn per message,
    before their deadline starts (`herald_shared.resilience.FairLimiter`)."""

    model_config = SettingsConfigDict(env_prefix="PUSH_MAX_IN_FLIGHT_", extra="ignore")

    fcm: int | None = Field(default=None, ge=1)
    apns: int | None = Field(default=None, ge=1)
    webpush: int | None = Field(default=None, ge=1)
    log: int | None = Field(default=None, ge=1)


class Settings(SenderSettings):
    """`PORT`, `HOST`, `DATABASE_URL`, `LOG_LEVEL` and `RABBITMQ_*` (shared), plus `PUSH_PROVIDER`,
    `PUSH_LOG_FILE`, `FCM_*`, `APNS_*` and `WEBPUSH_*`, and each provider's guards:
    `PUSH_BREAKER_*`, `PUSH_MAX_IN_FLIGHT_*`."""

    port: int = 8002
    database_url: str = default_sqlite_url(SERVICE_NAME)

    push_provider: PushProviderKind = PushProviderKind.LOG
    # The log provider's file: one JSON line per push (never the full device token).
    push_log_file: Path = Path(LOCAL_STATE_DIR) / "pushes.jsonl"
    fcm: FcmSettings = Field(default_factory=FcmSettings)
    apns: ApnsSettings = Field(default_factory=ApnsSettings)
    webpush: WebPushSettings = Field(default_factory=WebPushSettings)
    breaker: BreakerSettings = Field(default_factory=BreakerSettings)
    max_in_flight: MaxInFlightSettings = Field(default_factory=MaxInFlightSettings)

    @model_validator(mode="after")
    def _provider_is_configured(self) -> Settings:
        if self.push_provider is PushProviderKind.FCM and self.fcm.credentials_file is None:
            raise ValueError("PUSH_PROVIDER=fcm needs FCM_CREDENTIALS_FILE")
        return self
