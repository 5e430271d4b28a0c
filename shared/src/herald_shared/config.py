"""The settings every Herald service has; each service subclasses them with its own."""

from __future__ import annotations

import logging

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from herald_shared.broker import RabbitSettings

LOCAL_STATE_DIR = ".herald"


def default_sqlite_url(service_name: str) -> str:
    """The zero-setup database: one SQLite file per service under ./.herald/."""
    return f"sqlite+aiosqlite:///{LOCAL_STATE_DIR}/{service_name}.db"


class ServiceSettings(BaseSettings):
    """Built once in the entry point (never at import), then handed down."""

    model_config = SettingsConfigDict(extra="ignore")

    host: str = "127.0.0.1"
    port: int
    database_url: str
    log_level: str = "INFO"
    rabbitmq: RabbitSettings = Field(default_factory=RabbitSettings)

    @field_validator("database_url")
    @classmethod
    def _async_driver(cls, value: str) -> str:
        """Accept the usual `postgresql://` and `sqlite:///` spellings and pick the async driver."""
        for plain, async_driver in (
            ("postgresql://", "postgresql+asyncpg://"),
            ("postgres://", "postgresql+asyncpg://"),
            ("sqlite:///", "sqlite+aiosqlite:///"),
        ):
            if value.startswith(plain):
                return async_driver + value.removeprefix(plain)
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        if not isinstance(logging.getLevelName(value.upper()), int):
            raise ValueError(f"unknown log level {value!r}")
        return value.upper()


def configure_logging(settings: ServiceSettings, service_name: str) -> None:
    """One line per record, with the service name; no payloads are ever logged."""
    logging.basicConfig(
        level=settings.log_level,
        format=f"%(asctime)s %(levelname)s {service_name} %(name)s %(message)s",
        force=True,
    )
    # aiosqlite logs every statement with its parameters (addresses, tokens) at DEBUG.
    logging.getLogger("aiosqlite").setLevel(max(logging.INFO, logging.getLogger().level))
