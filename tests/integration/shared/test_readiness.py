"""Readiness follows the consumers: not ready while a lost connection is being recovered."""

from __future__ import annotations

import asyncio
import subprocess
import uuid

from herald_shared.broker import RabbitSettings, make_broker
from herald_shared.events import DeviceInvalidated
from herald_shared.ops import consumers_ready
from herald_shared.topology import (
    DEVICE_INVALIDATED,
    DEVICE_INVALIDATIONS,
    EXCHANGE,
    declare_topology,
)
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
