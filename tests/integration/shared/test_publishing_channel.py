"""On a real RabbitMQ: a Herald broker publishes on FastStream's default channel and consumes on
a channel of its own (`HeraldBroker.consumer_channel`); a nacked publish renews the publishing
channel, leaves the consumers alone, and goes out once the broker takes it (the same on the
retry middleware's way to a wait queue)."""

from __future__ import annotations

import asyncio
import functools
import uuid
from typing import Any

import aiormq.abc
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection

from herald_shared.broker import RabbitSettings, make_broker
from herald_shared.events import DeviceInvalidated
from herald_shared.ops import consumers_ready
from herald_shared.publishing import event_publisher, publish_event, publishing_channel
from herald_shared.retry import RetryableError
from herald_shared.topology import (
    DEVICE_INVALIDATED,
    DEVICE_INVALIDATIONS,
    EXCHANGE,
    RETRY_EXCHANGE,
    declare_topology,
)
from tests.integration.shared.consuming import consuming
from tests.support.infra import wait_until


def an_event() -> DeviceInvalidated:
    return DeviceInvalidated(user_id=uuid.uuid4(), device_id=uuid.uuid4(), reason="test")


async def refusing_queue(connection: AbstractRobustConnection, exchange: str, key: str) -> Any:
    """A queue bound to `key` on `exchange` with no room, that refuses what does not fit: the
    broker nacks every publish routed to it (as it does a quorum queue's whose channel knows
    only a dead leader)."""
    channel = await connection.channel()
    queue = await channel.declare_queue(
        f"refusing-{uuid.uuid4().hex[:8]}",
        arguments={"x-max-length": 0, "x-overflow": "reject-publish"},
    )
    await queue.bind(exchange, routing_key=key)
    return queue


async def renewed(channel: AbstractRobustChannel, nacked: aiormq.abc.AbstractChannel) -> bool:
    """Whether `channel` is open on another AMQP channel than the one that was nacked."""
    return not channel.is_closed and await channel.get_underlay_channel() is not nacked


async def test_a_nacked_publish_renews_the_publishing_channel_and_not_the_consumers(
    rabbit_url: str,
) -> None:
    received: list[DeviceInvalidated] = []
    settings = RabbitSettings(url=rabbit_url)
    async with consuming(settings, received, service_name="nack-test") as (broker, publisher):
        publishing = await publishing_channel(broker.config)
        # The channel FastStream's producer publishes through, whoever publishes.
        assert publishing is await publishing_channel(publisher._outer_config)
        exchange = await broker.config.declarer.declare_exchange(EXCHANGE, declare=False)
        assert exchange.channel is publishing
        [subscriber] = broker.subscribers
        consumers = subscriber._queue_obj.channel  # type: ignore[attr-defined]
        assert consumers is not publishing
        consumer_underlay = await consumers.get_underlay_channel()
        nacked_underlay = await publishing.get_underlay_channel()
        refusing = await refusing_queue(await broker.connect(), EXCHANGE.name, DEVICE_INVALIDATED)

        event = an_event()
        publish = asyncio.create_task(publish_event(publisher, event, timeout=30))

        await wait_until(functools.partial(renewed, publishing, nacked_underlay), timeout=10)
        assert not publish.done()  # nacked on the new channel too, while the queue refuses
        await refusing.delete(if_unused=False, if_empty=False)
        await publish

        async def consumed() -> bool:
            return any(item.event_id == event.event_id for item in received)

        await wait_until(consumed, timeout=10)
        assert await consumers.get_underlay_channel() is consumer_underlay
        assert await consumers_ready(broker)
        after = an_event()
        await publish_event(publisher, after, timeout=10)

        async def consumed_after() -> bool:
            return any(item.event_id == after.event_id for item in received)

        await wait_until(consumed_after, timeout=10)


async def test_a_retry_whose_wait_queue_nacks_goes_out_on_a_renewed_channel(
    rabbit_url: str,
) -> None:
    """The retry middleware puts a failed message in its wait queue through the publishing
    channel: nacked there, it renews the channel and waits for the queue instead of rejecting
    the message (which RabbitMQ would dead-letter)."""
    delays = (0.2,)
    broker = make_broker(
        RabbitSettings(url=rabbit_url, retry_delays=delays), service_name="nack-retry-test"
    )
    publisher = event_publisher(broker, DeviceInvalidated, DEVICE_INVALIDATED, description="test")
    attempts: list[DeviceInvalidated] = []

    @broker.subscriber(DEVICE_INVALIDATIONS.queue, EXCHANGE)
    async def handler(event: DeviceInvalidated) -> None:
        attempts.append(event)
        if len(attempts) == 1:
            raise RetryableError("once")

    async with broker:
        await declare_topology(broker, retry_delays=delays)
        await broker.start()
        publishing = await publishing_channel(broker.config)
        nacked_underlay = await publishing.get_underlay_channel()
        wait_queue = DEVICE_INVALIDATIONS.wait_queue(delays[0]).name
        # Bound beside the wait queue on the retry exchange: the retry is nacked.
        refusing = await refusing_queue(await broker.connect(), RETRY_EXCHANGE.name, wait_queue)

        await publish_event(publisher, an_event(), timeout=10)

        await wait_until(functools.partial(renewed, publishing, nacked_underlay), timeout=10)
        assert len(attempts) == 1
        await refusing.delete(if_unused=False, if_empty=False)

        async def retried() -> bool:
            return len(attempts) == 2

        await wait_until(retried, timeout=15)
        dead_letters = await broker.declare_queue(DEVICE_INVALIDATIONS.dead_letter_queue)
        assert (await dead_letters.declare()).message_count == 0
