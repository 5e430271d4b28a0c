"""Readiness follows the consumers: not ready while a lost connection is being recovered."""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid

import pytest
from yarl import URL

from herald_shared.broker import RabbitSettings, make_broker
from herald_shared.events import DeviceInvalidated
from herald_shared.ops import consumers_ready
from herald_shared.topology import (
    DEVICE_INVALIDATED,
    DEVICE_INVALIDATIONS,
    EXCHANGE,
    declare_topology,
)
from tests.integration.message_service.proxy import TcpProxy
from tests.integration.shared.consuming import consuming, via
from tests.support.infra import RABBITMQCTL, wait_until


async def test_not_ready_until_consumers_are_back_after_the_broker_closed_connections(
    rabbit_url: str,
) -> None:
    broker = make_broker(RabbitSettings(url=rabbit_url), service_name="readiness-test")
    received: list[DeviceInvalidated] = []

    @broker.subscriber(DEVICE_INVALIDATIONS.queue, EXCHANGE)
    async def handler(event: DeviceInvalidated) -> None:
        received.append(event)

    assert not await consumers_ready(broker)  # not started
    async with broker:
        await declare_topology(broker, retry_delays=(1.0,))
        await broker.start()
        assert await consumers_ready(broker)

        vhost = rabbit_url.rsplit("/", 1)[1]
        await asyncio.to_thread(
            subprocess.run,
            [RABBITMQCTL, "-q", "close_all_connections", "--vhost", vhost, "fault test"],
            check=True,
            capture_output=True,
            timeout=60,
        )

        async def not_ready() -> bool:
            return not await consumers_ready(broker)

        await wait_until(not_ready, timeout=10)

        async def ready() -> bool:
            return await consumers_ready(broker)

        await wait_until(ready, timeout=30, interval=0.2)
        event = DeviceInvalidated(user_id=uuid.uuid4(), device_id=uuid.uuid4(), reason="test")
        await broker.publish(event, exchange=EXCHANGE, routing_key=DEVICE_INVALIDATED)

        async def consumed() -> bool:
            return any(item.event_id == event.event_id for item in received)

        await wait_until(consumed, timeout=10)


async def test_a_late_answer_makes_the_check_not_ready_and_leaves_the_consumer_alone(
    rabbit_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The check asks on the consumer's own channel. When RabbitMQ answers late (a queue between
    leaders, after a cluster node died) the check answers "not ready" in time, but lets the
    call run on: aiormq closes the channel of a cancelled call, which would drop the consumer's
    deliveries in hand and make the process unready because it was checked."""
    target = URL(rabbit_url)
    proxy = TcpProxy(target.host or "127.0.0.1", target.port or 5672)
    await proxy.start()
    settings = RabbitSettings(url=via(rabbit_url, proxy.port))
    received: list[DeviceInvalidated] = []

    async with consuming(settings, received, service_name="readiness-test") as (broker, _):
        assert await consumers_ready(broker)
        (subscriber,) = broker.subscribers
        # FastStream 0.7.8's private state, as `consumers_ready` reads it (pinned version).
        consumers_channel = await subscriber._queue_obj.channel.get_underlay_channel()  # type: ignore[attr-defined]

        proxy.hold_answers()
        started = time.monotonic()
        assert not await consumers_ready(broker, timeout=0.3)
        assert not await consumers_ready(broker, timeout=0.3)  # the same call, still unanswered
        answered_s = time.monotonic() - started
        proxy.release_answers()

        async def ready() -> bool:
            return await consumers_ready(broker)

        await wait_until(ready, timeout=10, interval=0.05)
        assert answered_s < 2
        assert not consumers_channel.is_closed
        assert await subscriber._queue_obj.channel.get_underlay_channel() is consumers_channel  # type: ignore[attr-defined]
        assert "Closing channel" not in caplog.text
        event = DeviceInvalidated(user_id=uuid.uuid4(), device_id=uuid.uuid4(), reason="test")
        await broker.publish(event, exchange=EXCHANGE, routing_key=DEVICE_INVALIDATED)

        async def consumed() -> bool:
            return any(item.event_id == event.event_id for item in received)

        await wait_until(consumed, timeout=10)
    await proxy.cut()
