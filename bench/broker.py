"""Where a run's RabbitMQ virtual host lives.

* By default, on the machine's node (`tests.support.infra`: 127.0.0.1:5672, a vhost of the run's
  own through the management API), deleted afterwards.
* With `--cluster`, on three private nodes of the machine's `rabbitmq-server`, clustered on spare
  loopback ports, as the fault tests start them (`tests.support.faults.RabbitCluster`: own node
  names, Erlang cookie, data and config, nothing shared with the machine's node but epmd). The
  vhost is made once every node has joined, so each quorum queue the services declare gets a
  replica on each node (its default initial group size is the cluster's). Every service process
  is given every node's address, comma-separated in `RABBITMQ_URL`, each process a different
  node first (`rotated`), so that the clients spread over the nodes. The benchmark itself
  (calibration, queue depths, `rabbitmqctl -n`) uses the first node. The cluster is stopped and
  its directories removed afterwards, also when the run fails or is interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from bench.monitor import Rabbitmqctl
from tests.support import infra

if TYPE_CHECKING:
    from tests.support.faults import RabbitCluster

CLUSTER_SIZE = 3
MACHINE_GROUP = "rabbitmq (whole node, shared)"


def rotated(urls: Sequence[str], turn: int) -> list[str]:
    """`urls` starting at the `turn`-th (round the list): process number `turn` of a run connects
    to that node first and to the others, in order, when it is lost."""
    if not urls:
        return []
    shift = turn % len(urls)
    return [*urls[shift:], *urls[:shift]]


@dataclass
class Broker:
    url: str  # the run's vhost on the node the benchmark itself uses
    node_urls: tuple[str, ...]  # the run's vhost on every node, the benchmark's node first
    amqp_ports: tuple[int, ...]  # the nodes' AMQP ports: their beam.smp is the RabbitMQ CPU group
    ctl: Rabbitmqctl  # rabbitmqctl aimed at the benchmark's node
    cluster: RabbitCluster | None = None
    form_seconds: float = 0.0  # the cluster's boot and join

    @property
    def cpu_group(self) -> str:
        if self.cluster is None:
            return MACHINE_GROUP
        return f"rabbitmq ({len(self.node_urls)}-node cluster, ours)"

    def service_url(self, turn: int) -> str:
        """`RABBITMQ_URL` of the run's `turn`-th service process."""
        return ",".join(rotated(self.node_urls, turn))

    def first_node(self, turn: int) -> int:
        """The node (1-based, in `node_urls` order) process number `turn` connects to first."""
        return turn % len(self.node_urls) + 1

    async def quorum_replicas(self) -> dict[str, int]:
        """Replicas per quorum queue of the run's vhost (empty on the machine's node: one node,
        nothing to check)."""
        if self.cluster is None:
            return {}
        vhost = unquote(self.url.rsplit("/", 1)[1])
        node = self.cluster.nodes[0]
        output = await asyncio.to_thread(
            node.ctl, "list_queues", "-p", vhost, "--formatter", "json", "name", "type", "members"
        )
        return {
            queue["name"]: len(queue["members"])
            for queue in json.loads(output)
            if queue["type"] == "quorum"
        }

    def describe(self) -> dict[str, object]:
        return {
            "cluster": self.cluster is not None,
            "nodes": len(self.node_urls),
            "amqp_ports": list(self.amqp_ports),
            "form_seconds": round(self.form_seconds, 1),
        }

    async def close(self) -> None:
        """Delete the vhost on the machine's node; stop and remove a cluster."""
        if self.cluster is None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(infra.delete_vhost, self.url)
            return
        await asyncio.to_thread(_remove, self.cluster)


async def machine_broker() -> Broker:
    """A vhost of the run's own on the machine's node."""
    url = await asyncio.to_thread(infra.create_vhost)
    return Broker(
        url=url,
        node_urls=(url,),
        amqp_ports=(urlsplit(infra.RABBIT_BASE_URL).port or 5672,),
        ctl=Rabbitmqctl(),
    )


async def cluster_broker(size: int = CLUSTER_SIZE) -> Broker:
    """`size` private nodes clustered, and a vhost on them (tens of seconds: every node boots,
    then joins). If this fails or is cancelled (Ctrl-C) halfway, whatever was started is stopped
    and removed once the boot in progress ends."""
    from tests.support.faults import RABBITMQ_BIN, RabbitCluster

    cluster = RabbitCluster(Path(tempfile.mkdtemp(prefix="herald-bench-cluster-")), size=size)
    forming = asyncio.ensure_future(asyncio.to_thread(_form, cluster))
    try:
        url = await asyncio.shield(forming)
    except BaseException:
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await forming  # the thread goes on booting a node: let it end, then remove it all
        await asyncio.to_thread(_remove, cluster)
        raise
    vhost = url.rsplit("/", 1)[1]
    first = cluster.nodes[0]
    return Broker(
        url=url,
        node_urls=tuple(node.url(unquote(vhost)) for node in cluster.nodes),
        amqp_ports=tuple(node.port for node in cluster.nodes),
        ctl=Rabbitmqctl(str(RABBITMQ_BIN / "rabbitmqctl"), first.name, first.env()),
        cluster=cluster,
        form_seconds=cluster.form_seconds,
    )


def _form(cluster: RabbitCluster) -> str:
    cluster.start()
    return cluster.nodes[0].add_vhost()


def _remove(cluster: RabbitCluster) -> None:
    """Every node killed (its data goes with it) and every directory removed."""
    try:
        cluster.cleanup()
    finally:
        roots = {node.root.parent for node in cluster.nodes}
        for root in roots:
            shutil.rmtree(root, ignore_errors=True)
