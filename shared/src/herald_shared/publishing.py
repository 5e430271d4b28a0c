"""Publishing events: one publisher object per event and routing key, always persistent."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextvars import ContextVar
from typing import Any

import aiormq
import aiormq.exceptions
from aio_pika.abc import AbstractRobustChannel
from faststream.rabbit import RabbitBroker
from faststream.rabbit.publisher import RabbitPublisher

from herald_shared.events import Event
from herald_shared.topology import EXCHANGE, routing_key_for

# The correlation id of the message being consumed, set around every handler by the retry
# middleware, so that what a handler publishes carries it on. (A handler parameter such as
# `Context("message.correlation_id")` would do the same, but FastStream resolves every `Context`
# parameter in a worker thread: a thread hop per message, about a tenth of a sender's CPU.)
consumed_correlation_id: ContextVar[str | None] = ContextVar(
    "herald_consumed_correlation_id", default=None
)


# What a publish raises when its connection is lost (or not back yet): it goes out again.
# aiormq's own errors only: an error of the caller's (a test's fake broker, say) stays its own.
CONNECTION_LOST = (
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
)
RECONNECT_POLL_S = 0.05
MAX_RECONNECT_POLL_S = 1.0
# A channel is renewed after a nack at most this often: a queue that refuses every publish (no
# quorum left, say) must not have the channel, and every exchange and queue it re-declares when
# it reopens, cycled at every retry.
MIN_RENEWAL_INTERVAL_S = 1.0

logger = logging.getLogger("herald.publishing")

# When each publishing channel was last renewed (`renew_after_nack`), by channel.
_renewed_at: weakref.WeakKeyDictionary[AbstractRobustChannel, float] = weakref.WeakKeyDictionary()


def _without_drain_wait(
    basic_publish: Callable[..., Awaitable[Any]],
) -> Callable[..., Awaitable[Any]]:
    """`aiormq.Channel.basic_publish` that, on a channel with publisher confirms, queues the
    publish's frames for the socket and goes on to await the confirm (`wait=False`), instead of
    holding the channel's lock until the connection's writer task has written and drained them.

    Why: aiormq serialises a channel's publishes on that lock, and each one held it across two or
    three turns of the event loop (the writer task's, the drain's, the next waiter's). On a busy
    loop a turn takes milliseconds: message-service's outbox relay, publishing a batch of 100
    events while the service answered 16 requests at a time, took 1.3-1.7 s over it, against
    24-62 ms on a quiet loop (docs/performance.md). A confirm comes only once the frames were
    written, and every Herald publish awaits its confirm, so what is in flight stays bounded by
    the callers' batches; a channel without confirms keeps the drain wait, its only backpressure.
    """

    @functools.wraps(basic_publish)
    async def publish(channel: aiormq.Channel, body: bytes, **kwargs: Any) -> Any:
        if channel.publisher_confirms:
            kwargs.setdefault("wait", False)
        return await basic_publish(channel, body, **kwargs)

    publish.herald_without_drain_wait = True  # type: ignore[attr-defined]
    return publish


def publish_without_drain_wait() -> None:
    """Install `_without_drain_wait` on aiormq's channels (once per process; every Herald
    broker does, `herald_shared.broker.make_broker`). aio-pika has no way to pass `wait` to
    aiormq; tests/unit/shared/test_publishing.py fails if aiormq's method changes shape."""
    current = aiormq.Channel.basic_publish
    if not getattr(current, "herald_without_drain_wait", False):
        aiormq.Channel.basic_publish = _without_drain_wait(current)  # type: ignore[method-assign,assignment]


def is_nack(exc: BaseException) -> bool:
    """Whether `exc` is the broker's negative confirm of a publish (Basic.Nack): a queue the
    message was routed to did not take it. Not a return (`PublishError`: nothing was bound)."""
    return isinstance(exc, aiormq.exceptions.DeliveryError) and isinstance(
        exc.frame, aiormq.spec.Basic.Nack
    )


async def publishing_channel(config: Any) -> AbstractRobustChannel:
    """The channel every publish of a FastStream 0.7 broker goes out on, whoever publishes (a
    publisher, `broker.publish`): its default channel, where its producer finds its exchanges.
    `config` is the broker's (`broker.config`) or a publisher's (`publisher._outer_config`);
    FastStream 0.7.8 is pinned, and tests/integration/shared/test_publishing_channel.py breaks
    if this moves."""
    channel: AbstractRobustChannel = await config.channel_manager.get_channel()
    return channel


async def renew_after_nack(channel: AbstractRobustChannel, *, publish_started: float) -> bool:
    """Have the next publishes on `channel` go out on a new AMQP channel; True if this call did.

    Why: before RabbitMQ 3.12.5 (rabbitmq-server 27886dd), a channel's first publish to a quorum
    queue asks the node that the queue's record names as leader, and is nacked if that node is
    down, the channel staying at its first publish: a channel whose first publish to a queue came
    while the record still named a leader that had just died has every later publish to that
    queue nacked until that node is back. A new channel, once the record names the new leader,
    publishes there normally.

    The underlying channel is closed and aio-pika's robust channel opens a new one on the same
    connection (its exchanges and queues declared again): the broker's exchanges and FastStream's
    publishers stay valid. Publishes in flight on the old channel fail with
    `ChannelInvalidStateError` and go out again (`publish_event`). Nothing is renewed if the
    channel was renewed after `publish_started` (the `time.monotonic()` at which the nacked
    publish began: the nacks of a batch renew it once) or less than `MIN_RENEWAL_INTERVAL_S` ago.
    """
    now = time.monotonic()
    last = _renewed_at.get(channel, -math.inf)
    if last >= publish_started or now - last < MIN_RENEWAL_INTERVAL_S:
        return False
    _renewed_at[channel] = now  # before any await: concurrent nacks see it
    # Not while aio-pika restores it (after a reconnect, or a renewal): a channel closed in the
    # middle of that fails the connection's whole recovery, and aio-pika then reconnects only
    # after its reconnect interval. (Publishes go out on a channel being restored.)
    await channel.ready()
    if channel.is_closed:  # lost meanwhile: the reconnect renews it anyway
        return False
    underlay = await channel.get_underlay_channel()
    logger.warning("herald.publish.channel_renewed reason=nack channel=%s", channel.number)
    await underlay.close(aiormq.exceptions.ChannelInvalidStateError("renewed after a nack"))
    return True


async def publish_confirmed(
    publish: Callable[[], Awaitable[object]],
    channel: Callable[[], Awaitable[AbstractRobustChannel]],
    *,
    timeout: float,
) -> None:
    """Run `publish` (one publish, awaiting its confirm, on the channel `channel` returns: looked
    up on a nack only) until the broker confirms it, for at most `timeout` seconds.

    A publish whose connection or channel is lost under it goes out again once it is back (on
    whichever node the connection reconnected to). A nacked one goes out again on a renewed
    channel (`renew_after_nack`). Either may have been stored the first time (a nack can come from
    one of several queues the message was routed to), so consumers deduplicate. Anything else
    raises at once; a nack that lasts until `timeout` raises as the nack, a lost connection as
    `TimeoutError`.
    """
    delay = RECONNECT_POLL_S
    nack: aiormq.exceptions.DeliveryError | None = None
    try:
        async with asyncio.timeout(timeout):
            while True:
                started = time.monotonic()
                try:
                    await publish()
                    return
                except CONNECTION_LOST:
                    nack = None
                except aiormq.exceptions.DeliveryError as exc:
                    if not is_nack(exc):
                        raise
                    nack = exc
                    # A connection lost meanwhile renews the channel anyway (robust reconnect).
                    with contextlib.suppress(*CONNECTION_LOST):
                        await renew_after_nack(await channel(), publish_started=started)
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_RECONNECT_POLL_S)
    except TimeoutError as exc:
        if nack is not None:
            raise nack from exc
        raise


def event_publisher(
    broker: RabbitBroker, model: type[Event], routing_key: str, *, description: str
) -> RabbitPublisher:
    """A documented publisher of `model` on the `notifications` exchange.

    `persist=True` because FastStream's default (transient) loses messages on a broker restart.
    """
    return broker.publisher(
        exchange=EXCHANGE,
        routing_key=routing_key,
        persist=True,
        schema=model,
        title=f"{routing_key}:publish",
        description=description,
    )


async def publish_event(
    publisher: RabbitPublisher,
    event: Event,
    *,
    timeout: float,
    correlation_id: str | None = None,
) -> None:
    """Publish and wait for the broker's confirm, for at most `timeout` seconds.

    Raises on an unroutable message, on a nack that lasts and on timeout. A timed-out publish may
    still have reached the broker, so every consumer deduplicates on the event's ids. The
    correlation id is `correlation_id`, else that of the message being consumed, else the
    event's own id.

    A publish whose connection is lost under it (before or while its confirm is awaited), or
    that is nacked, is published again until `timeout` (`publish_confirmed`).
    """
    await publish_json(
        publisher,
        event,
        message_id=str(event.event_id),
        timeout=timeout,
        correlation_id=correlation_id,
    )


async def publish_json(
    publisher: RabbitPublisher,
    body: Event | bytes,
    *,
    message_id: str,
    timeout: float,
    correlation_id: str | None = None,
) -> None:
    """`publish_event` for an event given as a model or already as its JSON (the outbox relay
    publishes the JSON it stored, rather than parsing and serialising it again); `message_id`
    is the event's id."""
    correlation = correlation_id or consumed_correlation_id.get() or message_id

    async def publish() -> None:
        await publisher.publish(
            body,
            message_id=message_id,
            correlation_id=correlation,
            content_type="application/json",
            timeout=timeout,
        )

    async def channel() -> AbstractRobustChannel:
        # FastStream 0.7.8 keeps a publisher's broker configuration private.
        return await publishing_channel(publisher._outer_config)

    await publish_confirmed(publish, channel, timeout=timeout)


async def publish_events(
    events: Sequence[Event],
    publishers: Mapping[str, RabbitPublisher],
    *,
    timeout: float,
    correlation_id: str | None = None,
) -> None:
    """Publish `events` at once, each with the publisher of its routing key, and wait for every
    confirm (at most `timeout` seconds each); raise the first failure."""
    if not events:
        return
    if len(events) == 1:
        event = events[0]
        await publish_event(
            publishers[routing_key_for(event)],
            event,
            timeout=timeout,
            correlation_id=correlation_id,
        )
        return
    try:
        async with asyncio.TaskGroup() as group:
            for event in events:
                group.create_task(
                    publish_event(
                        publishers[routing_key_for(event)],
                        event,
                        timeout=timeout,
                        correlation_id=correlation_id,
                    )
                )
    except ExceptionGroup as failures:
        # The first failure decides what happens next (a retry, a deferral); a group would hide
        # its type from the retry middleware.
        raise failures.exceptions[0] from failures
