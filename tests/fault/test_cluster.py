"""A three-node RabbitMQ cluster of the machine's `rabbitmq-server` (`RabbitCluster`): the
definitions file gives every quorum queue a replica on each node, and a client given the three
addresses moves to another node when the one it uses is SIGKILLed, its consumer back and its
messages flowing."""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from yarl import URL

from herald_shared.broker import RabbitSettings, make_broker
from herald_shared.events import DeviceInvalidated
from herald_shared.ops import consumers_ready
from herald_shared.publishing import event_publisher, publish_event
from herald_shared.topology import (
    DEVICE_INVALIDATED,
    DEVICE_INVALIDATIONS,
    EXCHANGE,
    declare_topology,
)
from tests.support.faults import RabbitCluster, Report
from tests.support.infra import wait_until

pytestmark = pytest.mark.e2e

DEFINITIONS = Path(__file__).resolve().parents[2] / "deploy" / "rabbitmq" / "definitions.json"


@pytest.fixture(scope="module")
def rabbit_cluster() -> Iterator[RabbitCluster]:
    cluster = RabbitCluster(Path(tempfile.mkdtemp(prefix="herald-fault-cluster-")), size=3)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.cleanup()


def quorum_members(cluster: RabbitCluster, vhost: str) -> dict[str, int]:
    """Replicas per quorum queue of `vhost`, as a running node sees them."""
    node = next(node for node in cluster.nodes if node.running)
    output = node.ctl("list_queues", "-p", vhost, "--formatter", "json", "name", "type", "members")
    return {
        queue["name"]: len(queue["members"])
        for queue in json.loads(output)
        if queue["type"] == "quorum"
    }


async def test_the_definitions_give_every_quorum_queue_a_replica_on_each_of_three_nodes(
    rabbit_cluster: RabbitCluster, fault_report: Report
) -> None:
    assert rabbit_cluster.running_nodes() == {node.name for node in rabbit_cluster.nodes}
    rabbit_cluster.nodes[0].ctl("import_definitions", str(DEFINITIONS))

    members = quorum_members(rabbit_cluster, "herald")

    fault_report(
        nodes=len(rabbit_cluster.nodes),
        form_s=f"{rabbit_cluster.form_seconds:.1f}",
        quorum_queues=len(members),
    )
    assert len(members) >= 20  # the work, wait and dead-letter queues
    assert set(members.values()) == {3}


async def test_a_client_moves_to_another_node_when_its_node_is_killed(
    rabbit_cluster: RabbitCluster, fault_report: Report
) -> None:
    first, second, _ = rabbit_cluster.nodes
    vhost = URL(first.add_vhost()).path.lstrip("/")
    urls = rabbit_cluster.urls(vhost)
    settings = RabbitSettings(urls=",".join(urls), reconnect_interval=1, connection_timeout=2)
    broker = make_broker(settings, service_name="cluster-test")
    publisher = event_publisher(
        broker, DeviceInvalidated, DEVICE_INVALIDATED, description="cluster test"
    )
    received: list[DeviceInvalidated] = []

    @broker.subscriber(DEVICE_INVALIDATIONS.queue, EXCHANGE)
    async def handler(event: DeviceInvalidated) -> None:
        received.append(event)

    async def consumed(event: DeviceInvalidated) -> None:
        async def seen() -> bool:
            return any(item.event_id == event.event_id for item in received)

        await wait_until(seen, timeout=30, interval=0.1)

    def an_event() -> DeviceInvalidated:
        return DeviceInvalidated(user_id=uuid.uuid4(), device_id=uuid.uuid4(), reason="test")

    try:
        async with broker:
            await declare_topology(broker, retry_delays=(1.0,))
            await broker.start()
            assert set(quorum_members(rabbit_cluster, vhost).values()) == {3}
            before = an_event()
            await publish_event(publisher, before, timeout=10)
            await consumed(before)
            connection = broker._connection
            assert connection is not None
            assert connection.address.port == first.port  # type: ignore[attr-defined]

            await asyncio.to_thread(first.kill)  # the node it uses dies
            killed_at = time.monotonic()

            async def ready() -> bool:
                return await consumers_ready(broker)

            async def not_ready() -> bool:
                return not await ready()

            await wait_until(not_ready, timeout=10, interval=0.02)
            await wait_until(ready, timeout=60, interval=0.1)
            ready_s = time.monotonic() - killed_at
            assert connection.address.port == second.port  # type: ignore[attr-defined]
            after = an_event()
            await publish_event(publisher, after, timeout=10)
            await consumed(after)
            flowing_s = time.monotonic() - killed_at
    finally:
        if not first.running:
            await asyncio.to_thread(first.start)  # it rejoins the cluster on its data
    fault_report(ready_s=f"{ready_s:.1f}", flowing_s=f"{flowing_s:.1f}")
    assert ready_s <= 10
