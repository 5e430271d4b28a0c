"""Publishing events: one publisher object per event and routing key, always persistent."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from contextvars import ContextVar

import aiormq.exceptions
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

    Raises on a nack, on an unroutable message and on timeout. A timed-out publish may still have
    reached the broker, so every consumer deduplicates on the event's ids. The correlation id is
    `correlation_id`, else that of the message being consumed, else the event's own id.

    A publish whose connection is lost under it (before or while its confirm is awaited) is
    published again once the connection is back, on whichever node it reconnected to, until
    `timeout`: the broker may have stored the first copy, and consumers deduplicate.
    """
    delay = RECONNECT_POLL_S
    async with asyncio.timeout(timeout):
        while True:
            try:
                await publisher.publish(
                    event,
                    message_id=str(event.event_id),
                    correlation_id=correlation_id
                    or consumed_correlation_id.get()
                    or str(event.event_id),
                    content_type="application/json",
                    timeout=timeout,
                )
                return
            except CONNECTION_LOST:
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_RECONNECT_POLL_S)


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
