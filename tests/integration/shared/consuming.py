"""A broker consuming device invalidations into a list, on the real RabbitMQ, for the tests of
what happens to a consumer when its connection or the broker misbehaves."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from faststream.rabbit.publisher import RabbitPublisher
from yarl import URL

from herald_shared.broker import HeraldBroker, RabbitSettings, make_broker
from herald_shared.events import DeviceInvalidated
from herald_shared.publishing import event_publisher
from herald_shared.topology import (
    DEVICE_INVALIDATED,
    DEVICE_INVALIDATIONS,
    EXCHANGE,
    declare_topology,
)


def via(url: str, port: int) -> str:
    """`url` with its address replaced by a local port (a proxy's, or a dead one)."""
    return str(URL(url).with_host("127.0.0.1").with_port(port))


@asynccontextmanager
async def consuming(
    settings: RabbitSettings, received: list[DeviceInvalidated], *, service_name: str
) -> AsyncIterator[tuple[HeraldBroker, RabbitPublisher]]:
    """A started broker whose one subscriber appends to `received`, and a publisher of
    device invalidations on it."""
    broker = make_broker(settings, service_name=service_name)
    publisher = event_publisher(broker, DeviceInvalidated, DEVICE_INVALIDATED, description="test")

    @broker.subscriber(DEVICE_INVALIDATIONS.queue, EXCHANGE)
    async def handler(event: DeviceInvalidated) -> None:
        received.append(event)

    async with broker:
        await declare_topology(broker, retry_delays=(1.0,))
        await broker.start()
        yield broker, publisher
