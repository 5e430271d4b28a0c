"""The settings every Herald service has; each service subclasses them with its own."""

from __future__ import annotations

import logging
import sys
from datetime import timedelta
from typing import IO, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from herald_shared.batching import DEFAULT_LINGER
from herald_shared.broker import RabbitSettings
from herald_shared.events import MAX_ITEMS_PER_EVENT
from herald_shared.logs import (
    CONNECTION_LOSS_LOGGERS,
    ConnectionLossAsWarning,
    JsonFormatter,
    QueryFreeAccessLog,
    TextFormatter,
)
from herald_shared.sending import SenderTuning

LOCAL_STATE_DIR = ".herald"


def default_sqlite_url(service_name: str) -> str:
    """The zero-setup database: one SQLite file per service under ./.herald/."""
    return f"sqlite+aiosqlite:///{LOCAL_STATE_DIR}/{service_name}.db"


class BatchSettings(BaseSettings):
    """`BATCH_*`: how a consumer handles its deliveries together (`herald_shared.batching`)."""

    model_config = SettingsConfigDict(env_prefix="BATCH_", extra="ignore")

    # The most items (jobs, reports, messages) one batch takes: its statements stay bounded.
    max_items: int = Field(default=1000, ge=1)
    # Batches in progress at once per stage: one is built while another waits for its I/O.
    concurrency: int = Field(default=2, ge=1)
    # Seconds a batch that could start at once waits for company: at moderate rates, a little
    # latency for fewer, larger batches (under load they fill up by themselves); why 25 ms:
    # `herald_shared.batching.DEFAULT_LINGER`.
    linger: float = Field(default=DEFAULT_LINGER, ge=0, le=1)


class ServiceSettings(BaseSettings):
    """Built once in the entry point (never at import), then handed down."""

    model_config = SettingsConfigDict(extra="ignore")

    host: str = "127.0.0.1"
    port: int
    database_url: str
    log_level: str = "INFO"
    # json: one JSON object per line, for whatever collects the logs of a container; text: for a
    # person at a terminal (`./scripts/start` asks for it).
    log_format: Literal["json", "text"] = "json"
    rabbitmq: RabbitSettings = Field(default_factory=RabbitSettings)
    batch: BatchSettings = Field(default_factory=BatchSettings)

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

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower_format(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value


class SenderSettings(ServiceSettings):
    """What both senders have besides: the lease of a job in the delivery ledger."""

    # Seconds a claimed job stays this worker's without a renewal (renewed every fifth of it
    # while its send waits or runs): how long a job of a worker that died waits before another
    # worker takes it over. At most the second retry tier (5 s by default), so that the copy
    # that found it busy comes back once the lease has run out rather than a tier later.
    delivery_lease: float = Field(default=5.0, ge=1)
    # Jobs this worker holds at once (claimed, waiting for a place at their provider, sending or
    # being recorded); deliveries past it wait, unclaimed, until jobs end. At least one
    # delivery's worth. Urgent deliveries (DMs, personal mentions) never wait for it.
    delivery_max_jobs: int = Field(default=1000, ge=MAX_ITEMS_PER_EVENT)

    def sender_tuning(self) -> SenderTuning:
        return SenderTuning(
            max_jobs_per_batch=self.batch.max_items,
            concurrent_batches=self.batch.concurrency,
            linger=self.batch.linger,
            lease=timedelta(seconds=self.delivery_lease),
            max_jobs_held=self.delivery_max_jobs,
        )


def configure_logging(
    settings: ServiceSettings, service_name: str, *, stream: IO[str] | None = None
) -> None:
    """One line per record (`LOG_FORMAT`: JSON or text), with the service name and the ids of
    the work in progress (`herald_shared.logs`); no payloads are ever logged.

    `stream` (standard error by default) is for tests.
    """
    formatter: logging.Formatter = (
        JsonFormatter(service_name)
        if settings.log_format == "json"
        else TextFormatter(service_name)
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    logging.basicConfig(level=settings.log_level, handlers=[handler], force=True)
    # aiosqlite logs every statement with its parameters (addresses, tokens) at DEBUG.
    logging.getLogger("aiosqlite").setLevel(max(logging.INFO, logging.getLogger().level))
    # aio-pika's robust channel says only at DEBUG that it could not restore a channel or a
    # consumer the server cancelled (it tries again after the reconnect pause), and that is all
    # it says at that level: what explains a process that stays unready after a node loss.
    if logging.getLogger().level <= logging.INFO:
        logging.getLogger("aio_pika.robust_channel").setLevel(logging.DEBUG)
    # What the RabbitMQ clients and FastStream log as errors while a lost connection is being
    # restored are warnings (see the filter).
    for name in CONNECTION_LOSS_LOGGERS:
        client_logger = logging.getLogger(name)
        if not any(isinstance(item, ConnectionLossAsWarning) for item in client_logger.filters):
            client_logger.addFilter(ConnectionLossAsWarning())
    # uvicorn's records reach the root handler (`herald_shared.ops.serve` keeps uvicorn from
    # installing its own); its access lines would otherwise show links' query strings.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        # Undo a logging config uvicorn may have installed in this process before (its own
        # handlers, its own level, no propagation): every line goes through ours.
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.setLevel(logging.NOTSET)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True
        uvicorn_logger.disabled = False
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(existing, QueryFreeAccessLog) for existing in access.filters):
        access.addFilter(QueryFreeAccessLog())
    if settings.log_format == "json":
        _faststream_loggers_write(formatter, stream)


def _faststream_loggers_write(formatter: logging.Formatter, stream: IO[str] | None) -> None:
    """FastStream's loggers do not propagate and bring their own text handlers: `faststream` on
    standard error, and `faststream.access.rabbit` on standard output, which FastStream creates
    when a broker starts unless it already has a handler on standard output. Give both ours."""
    for name, default_stream in (
        ("faststream", sys.stderr),
        ("faststream.access.rabbit", sys.stdout),
    ):
        logger = logging.getLogger(name)
        for existing in list(logger.handlers):
            logger.removeHandler(existing)
        handler = logging.StreamHandler(stream or default_stream)
        handler.setFormatter(formatter)
        logger.addHandler(handler)
