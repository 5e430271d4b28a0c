"""The topology on a real RabbitMQ is the one `herald_shared.topology` declares."""

from __future__ import annotations

import json
import subprocess
import uuid
from typing import Any

import aio_pika

from herald_shared.broker import RabbitSettings, make_broker
from herald_shared.events import DeviceInvalidated
from herald_shared.publishing import event_publisher, publish_event
from herald_shared.topology import (
    CONSUMER_QUEUES,
    DEVICE_INVALIDATED,
    DEVICE_INVALIDATIONS,
    EXCHANGE,
    declare_topology,
)
from tests.support.infra import RABBITMQCTL

DELAYS = (1.0, 5.0, 25.0)


def _list(vhost: str, *what: str) -> list[dict[str, Any]]:
    output = subprocess.run(
        [RABBITMQCTL, "-q", *what, "-p", vhost, "--formatter", "json"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    rows: list[dict[str, Any]] = json.loads(output)
    for row in rows:
        if "arguments" in row:  # rabbitmqctl prints [name, AMQP type, value] triples
            row["arguments"] = {name: value for name, _type, value in row["arguments"]}
    return rows


async def test_declared_topology(rabbit_url: str) -> None:
    broker = make_broker(RabbitSettings(url=rabbit_url), service_name="topology-test")
    async with broker:
        await broker.start()
        await declare_topology(broker, retry_delays=DELAYS)
        await declare_topology(broker, retry_delays=DELAYS)  # idempotent

    vhost = rabbit_url.rsplit("/", 1)[1]
    exchanges = {
        row["name"]: row for row in _list(vhost, "list_exchanges", "name", "type", "durable")
    }
    assert exchanges["notifications"]["type"] == "topic"
    assert exchanges["notifications"]["durable"] is True
    assert exchanges["notifications.dlx"]["type"] == "direct"
    assert exchanges["notifications.delay"]["type"] == "topic"
    assert exchanges["notifications.delay"]["durable"] is True
    assert "notifications.retry" not in exchanges  # the former direct one is no longer declared

    queues = {
        row["name"]: row for row in _list(vhost, "list_queues", "name", "durable", "arguments")
    }
    bindings = {
        (row["source_name"], row["destination_name"], row["routing_key"])
        for row in _list(vhost, "list_bindings", "source_name", "destination_name", "routing_key")
    }
    for consumer_queue in CONSUMER_QUEUES:
        arguments = queues[consumer_queue.name]["arguments"]
        assert queues[consumer_queue.name]["durable"] is True
        assert arguments["x-queue-type"] == "quorum"
        assert arguments["x-delivery-limit"] == 5
        assert arguments["x-dead-letter-exchange"] == "notifications.dlx"
        for key in consumer_queue.bindings:
            assert ("notifications", consumer_queue.name, key) in bindings
        dlq = consumer_queue.dead_letter_queue.name
        assert ("notifications.dlx", dlq, consumer_queue.name) in bindings
        assert ("notifications.delay", dlq, dlq) in bindings
        for delay in DELAYS:
            wait = consumer_queue.wait_queue(delay).name
            assert queues[wait]["arguments"]["x-message-ttl"] == round(delay * 1000)
            assert ("notifications.delay", wait, wait) in bindings


async def test_published_events_are_persistent_and_carry_their_id(rabbit_url: str) -> None:
    broker = make_broker(RabbitSettings(url=rabbit_url), service_name="publish-test")
    publisher = event_publisher(
        broker, DeviceInvalidated, DEVICE_INVALIDATED, description="test publisher"
    )
    event = DeviceInvalidated(user_id=uuid.uuid4(), device_id=uuid.uuid4(), reason="gone")
    async with broker:
        await broker.start()
        await declare_topology(broker, retry_delays=DELAYS)
        await publish_event(publisher, event, timeout=5)

    connection = await aio_pika.connect(rabbit_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(DEVICE_INVALIDATIONS.name)
        message = await queue.get(no_ack=True, timeout=5)
    assert message is not None
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.message_id == str(event.event_id)
    assert message.content_type == "application/json"
    assert DeviceInvalidated.model_validate_json(message.body) == event
    assert EXCHANGE.name == message.exchange
