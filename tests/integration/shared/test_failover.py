"""Several broker addresses: a service connects to one that answers, and when its connection is
lost it moves to the next one at once, without waiting a reconnect interval, its topology
checked again there and its consumers back (readiness follows), and a publish caught by the loss
goes out again.

Two single RabbitMQ nodes are not a cluster, so the "nodes" here are two ways to the machine's
server: a dead address (a closed port) or a TCP proxy that the test cuts, and the server
itself."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from yarl import URL

from herald_shared.broker import RabbitSettings
from herald_shared.events import DeviceInvalidated
from herald_shared.logs import (
    CHANNEL_RESTORE_DEFERRED,
    CONNECTION_LOSS_LOGGERS,
    ConnectionLossAsWarning,
)
from herald_shared.ops import consumers_ready
from herald_shared.publishing import publish_event
from tests.integration.message_service.proxy import TcpProxy
from tests.integration.shared.consuming import consuming, via
from tests.support.faults import emit
from tests.support.infra import wait_until
from tests.support.processes import free_port


def an_event() -> DeviceInvalidated:
    return DeviceInvalidated(user_id=uuid.uuid4(), device_id=uuid.uuid4(), reason="test")


async def test_a_dead_first_address_is_skipped_at_start(
    rabbit_url: str, request: pytest.FixtureRequest
) -> None:
    dead = via(rabbit_url, free_port())  # nothing listens there
    settings = RabbitSettings(urls=f"{dead},{rabbit_url}", connection_timeout=2)
    received: list[DeviceInvalidated] = []
    started = time.monotonic()
    async with consuming(settings, received, service_name="failover-test") as (broker, publisher):
        connected_s = time.monotonic() - started
        assert await consumers_ready(broker)
        event = an_event()
        await publish_event(publisher, event, timeout=5)

        async def consumed() -> bool:
            return any(item.event_id == event.event_id for item in received)

        await wait_until(consumed, timeout=10)
    emit(
        request.config,
        f"FAILOVER dead_first_address connected_s={connected_s:.2f}",
        request.node,
    )
    # The second address is tried at once, not after the reconnect interval.
    assert connected_s < settings.reconnect_interval


async def test_a_lost_node_is_replaced_by_the_next_address_at_once(
    rabbit_url: str, request: pytest.FixtureRequest
) -> None:
    target = URL(rabbit_url)
    proxy = TcpProxy(target.host or "127.0.0.1", target.port or 5672)
    await proxy.start()
    settings = RabbitSettings(urls=f"{via(rabbit_url, proxy.port)},{rabbit_url}")
    received: list[DeviceInvalidated] = []
    async with consuming(settings, received, service_name="failover-test") as (broker, publisher):
        assert await consumers_ready(broker)
        # FastStream 0.7.8's private connection (pinned version); aio-pika's `address` is untyped.
        connection: Any = broker._connection
        assert connection.address.port == proxy.port  # the first address

        await proxy.cut()  # the first "node" dies, and stays dead
        cut_at = time.monotonic()

        async def not_ready() -> bool:
            return not await consumers_ready(broker)

        await wait_until(not_ready, timeout=10, interval=0.02)
        # A publish the loss catches (its connection is gone) goes out on the next node.
        caught = an_event()
        await publish_event(publisher, caught, timeout=10)
        published_s = time.monotonic() - cut_at

        async def ready() -> bool:
            return await consumers_ready(broker)

        await wait_until(ready, timeout=10, interval=0.05)
        recovered_s = time.monotonic() - cut_at
        assert connection.address.port == target.port  # the second address

        event = an_event()
        await publish_event(publisher, event, timeout=5)

        async def consumed() -> bool:
            ids = {item.event_id for item in received}
            return caught.event_id in ids and event.event_id in ids

        await wait_until(consumed, timeout=10)
    emit(
        request.config,
        f"FAILOVER lost_node recovered_s={recovered_s:.2f} published_s={published_s:.2f}",
        request.node,
    )
    # The connection was made moments before the cut: aio-pika's reconnect loop was still in
    # its pause after connecting, which must not hold the move back for a reconnect interval.
    assert recovered_s < settings.reconnect_interval


@pytest.fixture
def services_log_filters() -> Iterator[None]:
    """The filter `configure_logging` puts on the RabbitMQ clients' loggers in every service."""
    loggers = [logging.getLogger(name) for name in CONNECTION_LOSS_LOGGERS]
    as_warning = ConnectionLossAsWarning()
    for logger in loggers:
        logger.addFilter(as_warning)
    yield
    for logger in loggers:
        logger.removeFilter(as_warning)


@pytest.mark.usefixtures("services_log_filters")
async def test_a_lost_connection_is_logged_as_warnings_and_no_error(
    rabbit_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A connection that drops makes aio-pika try to reopen each channel before the connection
    is back, and log an ERROR for each: with the services' filter, warnings, since the channels
    come back with the connection (the consumer consumes again)."""
    target = URL(rabbit_url)
    proxy = TcpProxy(target.host or "127.0.0.1", target.port or 5672)
    await proxy.start()
    settings = RabbitSettings(urls=f"{via(rabbit_url, proxy.port)},{rabbit_url}")
    received: list[DeviceInvalidated] = []
    caplog.set_level(logging.WARNING)
    async with consuming(settings, received, service_name="failover-test") as (broker, publisher):
        assert await consumers_ready(broker)
        await proxy.cut()

        async def ready_again() -> bool:
            return any(record.msg == CHANNEL_RESTORE_DEFERRED for record in caplog.records) and (
                await consumers_ready(broker)
            )

        await wait_until(ready_again, timeout=10, interval=0.05)
        event = an_event()
        await publish_event(publisher, event, timeout=5)

        async def consumed() -> bool:
            return any(item.event_id == event.event_id for item in received)

        await wait_until(consumed, timeout=10)
    from_clients = [
        record for record in caplog.records if record.name.startswith(("aio_pika", "aiormq"))
    ]
    # The format strings, not the messages: aio-pika's arguments cannot all be formatted later.
    assert [record.msg for record in from_clients if record.levelno >= logging.ERROR] == []
    deferred = [record for record in from_clients if record.msg == CHANNEL_RESTORE_DEFERRED]
    assert deferred
    assert all(record.levelno == logging.WARNING for record in deferred)
