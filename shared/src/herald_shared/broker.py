"""The one way a Herald service connects to RabbitMQ.

A service may be given several addresses (`RABBITMQ_URLS`, or several comma-separated in
`RABBITMQ_URL`): the nodes of one cluster. It connects to one; when that connection is lost it
reconnects to the next one at once, and when an attempt fails it tries the next one at once too,
round the list, waiting the reconnect interval only after a whole round failed
(`FailoverConnection`). aio-pika's robust connection then restores its channels on the new node:
it declares again (or, in passive mode, checks) the exchanges and queues, and its consumers start
again, which is what readiness counts.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Annotated, Any, ClassVar, Literal

from aio_pika import RobustConnection
from faststream import AckPolicy
from faststream.rabbit import Channel, RabbitBroker
from faststream.rabbit.helpers.declarer import RabbitDeclarerImpl
from faststream.rabbit.subscriber import RabbitSubscriber
from faststream.security import BaseSecurity
from opentelemetry.trace import TracerProvider
from prometheus_client import CollectorRegistry
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from yarl import URL

from herald_shared.logs import LogContextMiddleware
from herald_shared.metrics import (
    EventLoopLag,
    error_middleware,
    herald_metrics,
    metrics_middleware,
)
from herald_shared.publishing import publish_without_drain_wait
from herald_shared.retry import DeadLetterHooks, RetryPolicy, make_outcome_middleware
from herald_shared.topology import use_existing_topology
from herald_shared.tracing import configured_tracer_provider, telemetry_middleware


class RabbitSettings(BaseSettings):
    """The specification's `RABBITMQ_*` variables, plus prefetch and retry tiers."""

    model_config = SettingsConfigDict(env_prefix="RABBITMQ_", extra="ignore")

    # One address, or several comma-separated (the nodes of a cluster); `urls`, when set, wins.
    url: str = "amqp://guest:guest@localhost:5672/"
    urls: str | None = None
    connection_timeout: float = Field(default=10.0, gt=0)
    # Seconds between connection attempts after a failed one (each tries the next address).
    reconnect_interval: float = Field(default=5.0, gt=0)
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

    @model_validator(mode="after")
    def _one_scheme(self) -> RabbitSettings:
        schemes = {URL(address).scheme for address in self.addresses}
        if not schemes <= {"amqp", "amqps"} or len(schemes) != 1:
            raise ValueError("broker addresses must all be amqp:// or all amqps://")
        return self

    @property
    def addresses(self) -> tuple[str, ...]:
        """The broker addresses, in the order they are tried. A RABBITMQ_URLS of no address
        (empty, as compose.yaml passes it outside the cluster profile) counts as unset."""
        listed = tuple(part.strip() for part in (self.urls or "").split(",") if part.strip())
        return listed or tuple(part.strip() for part in self.url.split(",") if part.strip())

    @property
    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(
            delays=self.retry_delays,
            max_retries=self.max_retries,
            max_deferrals=self.max_deferrals,
        )


def connection_urls(settings: RabbitSettings, service_name: str) -> list[str]:
    """Every broker address, with the connection named after the service and the heartbeat
    applied, unless the operator's URL already sets them."""
    urls = []
    for address in settings.addresses:
        url = URL(address)
        query = {"name": service_name, "heartbeat": str(settings.heartbeat), **url.query}
        urls.append(str(url.with_query(query)))
    return urls


def connection_url(settings: RabbitSettings, service_name: str) -> str:
    """The first of `connection_urls`."""
    return connection_urls(settings, service_name)[0]


# The pause of aio-pika's reconnect loop while connected, between tries to restore a consumer
# the server cancelled (e.g. while its quorum queue elects a leader), at most the interval.
RESTORE_PAUSE_S = 1.0


class FailoverConnection(RobustConnection):
    """aio-pika's robust connection over several addresses (`ADDRESSES`, set on a subclass by
    `failover_connection`): the address it uses moves to the next one when an established
    connection is lost, and after every attempt that did not connect.

    aio-pika reads `url` once per connection attempt (to open the transport); that read is where
    a failed attempt is noticed. Its own `__str__` reads it too, so this class has its own, which
    does not (and hides the password).

    aio-pika's reconnect loop sleeps `reconnect_interval` after every pass, one that connected
    too, and a connection lost during that sleep waits for its end (measured: a connection cut
    just after it was made came back 5.6 s later). Here the interval is only the pause after a
    whole round of addresses failed in a row: an untried address is tried at once, and the pause
    after a pass that connected is `RESTORE_PAUSE_S`."""

    ADDRESSES: ClassVar[tuple[URL, ...]] = ()

    def __init__(self, url: URL, loop: asyncio.AbstractEventLoop | None = None, **kwargs: Any):
        self._addresses = list(self.ADDRESSES) or [URL(url)]
        self._current = 0
        self._attempting = False
        self._attempts = 0  # since the last connection that was made and restored
        self._interval = 5.0
        super().__init__(url=url, loop=loop, **kwargs)
        self._attempting = False  # the constructor's own reads were no attempts
        self._attempts = 0

    @property
    def url(self) -> URL:
        if self._attempting:  # the last attempt never connected: the next address
            self._current = (self._current + 1) % len(self._addresses)
        self._attempting = True
        self._attempts += 1
        return self._addresses[self._current]

    @url.setter
    def url(self, value: URL) -> None:
        # aio-pika sets it in its constructor (the first address, with the connection's
        # parameters in its query) and when a password is renewed: the current address.
        if hasattr(self, "_addresses"):
            self._addresses[self._current] = URL(value)

    @property
    def reconnect_interval(self) -> float:
        """The pause before aio-pika's next pass (it also reads this for its log lines)."""
        if self.connected.is_set():
            return min(self._interval, RESTORE_PAUSE_S)
        if self._attempts and not self._attempts % len(self._addresses):  # a round failed
            return self._interval
        return 0.0  # an address of this round is still untried

    @reconnect_interval.setter
    def reconnect_interval(self, value: float) -> None:
        self._interval = value

    @property
    def address(self) -> URL:
        """The address in use, or to be tried next."""
        return self._addresses[self._current]

    def __str__(self) -> str:
        address = self.address
        return str(address.with_password("******") if address.password else address)

    async def _on_connected(self) -> None:
        self._attempting = False
        await super()._on_connected()  # channels restored: raises if that failed
        self._attempts = 0

    async def _on_connection_close(self, closing: asyncio.Future[Any]) -> None:
        if self.connected.is_set() and len(self._addresses) > 1:
            # The node may be gone: reconnect to the next one (another node of the cluster
            # serves the same queues).
            self._current = (self._current + 1) % len(self._addresses)
        await super()._on_connection_close(closing)


def failover_connection(urls: Sequence[str]) -> type[FailoverConnection]:
    """A `FailoverConnection` class over `urls`, tried in their order."""
    return type(
        "HeraldFailoverConnection",
        (FailoverConnection,),
        {"ADDRESSES": tuple(URL(url) for url in urls)},
    )


class HeraldBroker(RabbitBroker):
    """A RabbitBroker that, in passive mode, creates nothing: its subscribers and publishers
    only check their queue or exchange when they start (herald_shared.topology); whose
    subscribers consume on a channel of their own (`consumer_channel`); and that samples its
    event loop's lag (`EventLoopLag`) while it runs, when it has a registry."""

    declares_passively: bool = False
    loop_lag: EventLoopLag | None = None
    # The channel of every subscriber that names none, instead of FastStream's default channel,
    # on which everything is published: a nacked publish renews that one
    # (`herald_shared.publishing.renew_after_nack`), which must not cancel the consumers and
    # the deliveries they hold. None: they share the default channel.
    consumer_channel: Channel | None = None

    async def start(self) -> None:
        if self.declares_passively:
            use_existing_topology(self)
        if self.consumer_channel is not None:
            await self._consume_on(self.consumer_channel)
        await super().start()
        if self.loop_lag is not None:
            self.loop_lag.start()

    async def _consume_on(self, channel: Channel) -> None:
        """Before the subscribers start: each that names no channel consumes on `channel`.

        FastStream 0.7.8 keeps one queue and one exchange object per queue and exchange, on
        whichever channel declared it first, and a subscriber consumes on its queue's object:
        the queues `declare_topology` declared, on the default channel, are forgotten, so that
        each subscriber declares its own again on `channel`. Exchanges stay on the default
        channel, where the producer publishes through them: those the subscribers bind to are
        declared there first (the subscribers' own declaration would put them on `channel`).
        """
        await self.connect()
        declarer = self.config.declarer
        for subscriber in self.subscribers:
            if not isinstance(subscriber, RabbitSubscriber):
                continue
            if subscriber.channel is None:
                subscriber.channel = channel
            if subscriber.queue.declare and subscriber.exchange.name:
                await declarer.declare_exchange(subscriber.exchange)
        if isinstance(declarer, RabbitDeclarerImpl):
            declarer._queues.clear()

    async def stop(
        self,
        exc_type: type[BaseException] | None = None,
        exc_val: BaseException | None = None,
        exc_tb: TracebackType | None = None,
    ) -> None:
        if self.loop_lag is not None:
            await self.loop_lag.stop()
        await super().stop(exc_type, exc_val, exc_tb)


def tls_context(settings: RabbitSettings) -> ssl.SSLContext | None:
    """The TLS context of an amqps:// URL (server certificate and host name verified), None
    for amqp://."""
    if URL(settings.addresses[0]).scheme != "amqps":
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
    publish_without_drain_wait()
    context = tls_context(settings)
    urls = connection_urls(settings, service_name)
    broker = HeraldBroker(
        urls[0],
        security=BaseSecurity(ssl_context=context) if context is not None else None,
        timeout=settings.connection_timeout,
        reconnect_interval=settings.reconnect_interval,
        # The publishing channel (consumers have their own, below).
        default_channel=Channel(publisher_confirms=True, on_return_raises=True),
        ack_policy=AckPolicy.REJECT_ON_ERROR,
        graceful_timeout=settings.graceful_timeout,
        middlewares=middlewares,
        # Per-message "Received"/"Processed" lines cost throughput; keep them at DEBUG.
        log_level=logging.DEBUG,
        app_id=service_name,
        description=description,
    )
    broker.declares_passively = settings.declare == "passive"
    # Confirms on, as on the default channel, so that a publish that ever went out here is
    # confirmed too.
    broker.consumer_channel = Channel(
        prefetch_count=settings.prefetch, publisher_confirms=True, on_return_raises=True
    )
    if registry is not None:
        broker.loop_lag = EventLoopLag(herald_metrics(registry).event_loop_lag)
    if len(urls) > 1:
        # FastStream hands these to aio-pika's `connect_robust`, which builds the connection
        # from `connection_class`. Not failing fast: the first attempt may meet a node that is
        # down; start-up waits for the first node that answers instead.
        broker._connection_kwargs["connection_class"] = failover_connection(urls)
        broker._connection_kwargs["fail_fast"] = False
    return broker


__all__: Sequence[str] = (
    "FailoverConnection",
    "RabbitSettings",
    "connection_url",
    "connection_urls",
    "failover_connection",
    "make_broker",
)
