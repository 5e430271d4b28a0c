"""push-sender's configuration: the shared service settings plus the push provider's."""

from __future__ import annotations

import ipaddress
from enum import StrEnum
from pathlib import Path

import httpx
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from herald_shared.config import LOCAL_STATE_DIR, ServiceSettings, default_sqlite_url

SERVICE_NAME = "push-sender"

FCM_DEFAULT_BASE_URL = "https://fcm.googleapis.com"


class PushProviderKind(StrEnum):
    LOG = "log"  # zero-setup default: one JSON line per push in PUSH_LOG_FILE
    FCM = "fcm"  # Firebase Cloud Messaging, HTTP v1 API


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


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


class Settings(ServiceSettings):
    """`PORT`, `HOST`, `DATABASE_URL`, `LOG_LEVEL` and `RABBITMQ_*` (shared), plus `PUSH_PROVIDER`,
    `PUSH_LOG_FILE` and `FCM_*`."""

    port: int = 8002
    database_url: str = default_sqlite_url(SERVICE_NAME)

    push_provider: PushProviderKind = PushProviderKind.LOG
    # The log provider's file: one JSON line per push (never the full device token).
    push_log_file: Path = Path(LOCAL_STATE_DIR) / "pushes.jsonl"
    fcm: FcmSettings = Field(default_factory=FcmSettings)

    @model_validator(mode="after")
    def _provider_is_configured(self) -> Settings:
        if self.push_provider is PushProviderKind.FCM and self.fcm.credentials_file is None:
            raise ValueError("PUSH_PROVIDER=fcm needs FCM_CREDENTIALS_FILE")
        return self
