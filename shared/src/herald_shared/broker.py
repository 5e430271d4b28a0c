"""The one way a Herald service connects to RabbitMQ."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from faststream import AckPolicy
from faststream.rabbit import Channel, RabbitBroker
from faststream.security import BaseSecurity
from opentelemetry.trace import TracerProvider
from prometheus_client import CollectorRegistry
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from yarl import URL

from herald_shared.logs import LogContextMiddleware
from herald_shared.metrics import error_middleware, herald_metrics, metrics_middleware
from herald_shared.retry import DeadLetterHooks, RetryPolicy, make_outcome_middleware
from herald_shared.topology import use_existing_topology
from herald_shared.tracing import configured_tracer_provider, telemetry_middleware


class RabbitSettings(BaseSettings):
    """The specification's `RABBITMQ_*` variables, plus prefetch and retry tiers."""

    model_config = SettingsConfigDict(env_prefix="RABBITMQ_", extra="ignore")

    url: str = "amqp://guest:guest@localhost:5672/"
    connection_timeout: float = Field(default=10.0, gt=0)
    # The specification's example says 600 s; a dead peer would then go unnoticed for minutes.
    heartbeat: int = Field(default=20, ge=0)
    max_retries: int = Field(default=3, ge=0)
    # Waits that spend no attempt (a dependency down, another worker busy with the message)
    # before a message is dead-lettered anyway: 1000 is about seven hours on the default tiers.
    max_deferrals: int = Field(default=1000, ge=0)
    # Seconds each retry waits, one wait queue per tier; the last tier repeats if there are more
    # retries than tiers.
    retry_delays: Annotated[tuple[float, ...], NoDecode] = (1.0, 5.0, 25.0)
    # Scales every tier (applied once, at validation): tests run the real tiers 100 times faster
    # with 0.01 instead of redefining them.
    retry_delay_factor: float = Field(default=1.0, gt=0)
    # In-flight messages per consumer, hence concurrent handlers; keep DB pools at least this big.
    prefetch: int = Field(default=20, ge=1)
    # Upper bound for one publish, confirm included; an unreachable broker must not hang callers.
    publish_timeout: float = Field(default=5.0, gt=0)
    graceful_timeout: float = Field(default=15.0, gt=0)
    # `full`: the service declares the whole topology itself (zero-setup local runs).
    # `passive`: an admin step created it (deploy/rabbitmq) and the service only checks that it
    # exists, as a broker user without configure permission must (declare=False everywhere).
    declare: Literal["full", "passive"] = "full"
    # TLS, for an amqps:// URL: the CA that signed the broker's certificate (else the system's),
    # and a client certificate and key where the broker asks for one.
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    @field_validator("retry_delays", mode="before")
    @classmethod
    def _split_delays(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(float(part) for part in value.split(",") if part.strip())
        return value

    @field_validator("retry_delays")
    @classmethod
    def _positive_delays(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value or any(delay <= 0 for delay in value):
            raise ValueError("retry delays must be a non-empty list of positive seconds")
        return value

    @model_validator(mode="after")
    def _scale_delays(self) -> RabbitSettings:
        if self.retry_delay_factor != 1.0:
            scaled = tuple(round(delay * self.retry_delay_factor, 3) for delay in self.retry_delays)
            # The scaled tiers replace the configured ones and the factor is spent, so that a
            # re-validation (nested settings, model_copy) cannot apply it twice.
            object.__setattr__(self, "retry_delays", scaled)
            object.__setattr__(self, "retry_delay_factor", 1.0)
        return self

    @property
    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(
            delays=self.retry_delays,
            max_retries=self.max_retries,
            max_deferrals=self.max_deferrals,
        )


def connection_url(settings: RabbitSettings, service_name: str) -> str:
    """The AMQP URL with the connection named after the service and the heartbeat applied,
    unless the operator's URL already sets them."""
    url = URL(settings.url)
    query = {"name": service_name, "heartbeat": str(settings.heartbeat), **url.query}
    return str(url.with_query(query))


class HeraldBroker(RabbitBroker):
    """A RabbitBroker that, in passive mode, creates nothing: its subscribers and publishers
    only check their queue or exchange when they start (herald_shared.topology)."""

    declares_passively: bool = False

    async def start(self) -> None:
        if self.declares_passively:
            use_existing_topology(self)
        await super().start()


def tls_context(settings: RabbitSettings) -> ssl.SSLContext | None:
    """The TLS context of an amqps:// URL (server certificate and host name verified), None
    for amqp://."""
    if URL(settings.url).scheme != "amqps":
        return None
    context = ssl.create_default_context(cafile=settings.ca_file)
    if settings.cert_file is not None:
        context.load_cert_chain(settings.cert_file, settings.key_file)
    return context


def make_broker(
    settings: RabbitSettings,
    *,
    service_name: str,
    registry: CollectorRegistry | None = None,
    description: str | None = None,
    dead_letter_hooks: DeadLetterHooks | None = None,
    tracer_provider: TracerProvider | None = None,
) -> HeraldBroker:
    """A broker whose publishes are confirmed and fail loudly when nothing is bound, whose
    consumers take a bounded number of messages at a time, and whose handler failures go through
    Herald's retry and dead-letter mechanism (`dead_letter_hooks`: what the service does when
    one of its messages runs out of retries). Each consumed message sets the log context
    (`herald_shared.logs`); with a tracer provider (`tracer_provider`, else the one
    `herald_shared.tracing.configure_tracing` installed) every publish and consume is traced."""
    # The log context wraps the retry mechanism, so that its lines carry the message's ids too.
    middlewares: list[Any] = [
        LogContextMiddleware,
        make_outcome_middleware(
            settings.retry_policy,
            dead_letter_hooks,
            herald_metrics(registry) if registry is not None else None,
        ),
    ]
    if registry is not None:
        # Outermost, so it records the final outcome of every message. Herald's own series
        # replace FastStream's RabbitPrometheusMiddleware (see herald_shared.metrics: counting
        # both would count every message twice under two names).
        middlewares.insert(0, metrics_middleware(herald_metrics(registry)))
        # Innermost, so it sees the handler's own error before it becomes an outcome.
        middlewares.append(error_middleware(herald_metrics(registry)))
    tracer_provider = tracer_provider or configured_tracer_provider()
    if tracer_provider is not None:
        # Outermost of all: its span is current in everything below (log lines get its ids).
        # Left out without a provider: even with the no-op one it costs ~25 µs per message.
        middlewares.insert(0, telemetry_middleware(tracer_provider))
    context = tls_context(settings)
    broker = HeraldBroker(
        connection_url(settings, service_name),
        security=BaseSecurity(ssl_context=context) if context is not None else None,
        timeout=settings.connection_timeout,
        default_channel=Channel(
            prefetch_count=settings.prefetch,
            publisher_confirms=True,
            on_return_raises=True,
        ),
        ack_policy=AckPolicy.REJECT_ON_ERROR,
        graceful_timeout=settings.graceful_timeout,
        middlewares=middlewares,
        # Per-message "Received"/"Processed" lines cost throughput; keep them at DEBUG.
        log_level=logging.DEBUG,
        app_id=service_name,
        description=description,
    )
    broker.declares_passively = settings.declare == "passive"
    return broker


__all__: Sequence[str] = ("RabbitSettings", "connection_url", "make_broker")
