"""A three-node RabbitMQ cluster of the machine's `rabbitmq-server` (`RabbitCluster`): the
definitions file gives every quorum queue a replica on each node, and a client given the three
addresses moves to another node when the one it uses is SIGKILLed, its consumer back and its
messages flowing; and Herald, two replicas of each service spread over the three nodes, loses
nothing when the node leading most quorum queues is SIGKILLed under traffic and booted again
20 s later (issue 17)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import httpx
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
from tests.support.faults import (
    Expectation,
    Herald,
    HeraldFactory,
    RabbitCluster,
    RabbitNode,
    RecordingFcm,
    RecordingSmtp,
    Report,
    consumers_back,
    email_notification_id,
    populated,
    push_notification_id,
    settle,
    steady_traffic,
)
from tests.support.infra import wait_until
from tests.support.processes import SERVICES, local_ports

pytestmark = pytest.mark.e2e

DEFINITIONS = Path(__file__).resolve().parents[2] / "deploy" / "rabbitmq" / "definitions.json"


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


# The run (17): two replicas of every service, 1,000 messages at a steady pace, the node
# holding most quorum-queue leaders SIGKILLed a third of the way in and booted again 20 s later.
MESSAGES = 1000
PER_SECOND = 12
DOWNTIME_S = 20.0
# From the kill until every process answers ready for good (`ready_for_good`): the issue's
# bound. It is measured with the services' own /health/ready (each consumer consuming on an open
# channel, RabbitMQ counting a consumer on its queue), polled every 0.2 s.
READY_BOUND_S = 10.0
SENDERS = ("push-sender", "email-sender")
# Rate limits are not what these tests are about: they are off. (While writing them, the
# in-process limiter's count, cut by the Redis round trip's timeout, made a POST a 500 now and
# then on a loaded machine: fixed since, see tests/unit/message_service/test_rate_limits.py.)
NO_RATE_LIMITS = {"RATE_LIMITS": "false"}
# The chat client of these tests drops a connection idle for 2 s, before uvicorn closes it (5 s),
# so that no POST goes out on a connection the server is closing (one run of the node loss had a
# POST fail twice with ReadError, its one resend included, on a loaded machine).
CLIENT_LIMITS = httpx.Limits(keepalive_expiry=2)


def vhost_of(herald: Herald) -> str:
    return unquote(herald.rabbit_url.rsplit("/", 1)[1])


def provider_ports(herald: Herald, names: Iterable[str]) -> set[int]:
    """The local ports of the named processes' TCP connections now (to the providers among
    them)."""
    ports: set[int] = set()
    for name in names:
        process = herald.services[name].process
        if process is not None:
            ports |= local_ports(process.pid)
    return ports


@dataclass(frozen=True)
class Repeats:
    """Provider calls made more than once (by notification id), and which of them were first made
    over a connection that a sender connected to the killed node held at the kill: calls in
    flight when it died."""

    repeated: frozenset[uuid.UUID]
    in_flight: frozenset[uuid.UUID]
    offsets: tuple[float, ...]  # each repeated call's first copy, in seconds from the kill

    @classmethod
    def of(
        cls, calls: Iterable[tuple[float, uuid.UUID, int]], ports: set[int], killed_at: float
    ) -> Repeats:
        first: dict[uuid.UUID, tuple[float, int]] = {}
        copies: Counter[uuid.UUID] = Counter()
        for at, notification_id, port in sorted(calls):
            copies[notification_id] += 1
            first.setdefault(notification_id, (at, port))
        repeated = frozenset(key for key, n in copies.items() if n > 1)
        return cls(
            repeated,
            frozenset(key for key in repeated if first[key][1] in ports),
            tuple(sorted(round(first[key][0] - killed_at, 1) for key in repeated)),
        )

    def text(self) -> str:
        spread = f"@{self.offsets[0]}..{self.offsets[-1]}s" if self.offsets else ""
        return f"{len(self.repeated)}/{len(self.in_flight)}{spread}"


async def readiness(herald: Herald, until: float) -> list[tuple[float, frozenset[str]]]:
    """The processes answering not ready, sampled until `until`."""
    samples: list[tuple[float, frozenset[str]]] = []
    while time.monotonic() < until:
        ready = await herald.ready()
        unready = frozenset(name for name, ok in ready.items() if not ok)
        samples.append((time.monotonic(), unready))
        await asyncio.sleep(0.2)
    return samples


def last_unready(samples: list[tuple[float, frozenset[str]]]) -> frozenset[str]:
    """The processes of the last sample in which some answered not ready."""
    return next((unready for _, unready in reversed(samples) if unready), frozenset())


def connection_lines(herald: Herald, names: Iterable[str]) -> list[str]:
    """What the named processes' RabbitMQ clients (aio-pika, aiormq) logged, oldest first: the
    time, the process, the level and the message, for a readiness that came late."""
    wanted = set(names)
    lines = []
    for file_name, text in herald.logs().items():  # <process>.<incarnation>.log
        if file_name.rsplit(".", 2)[0] not in wanted:
            continue
        for line in text.splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if str(record.get("logger")).startswith(("aio_pika", "aiormq")):
                    lines.append(
                        f"{record['timestamp']} {file_name} {record['level']} "
                        f"{record['message'][:200]}"
                    )
    return sorted(lines)


def longest_stall(times: Iterable[float], start: float, end: float) -> str:
    """The longest time within `start`..`end` in which no provider call was accepted, and when
    it began: `<seconds>@<seconds from start>`."""
    points = [start, *sorted(at for at in times if start < at < end), end]
    gap, began = max((later - earlier, earlier) for earlier, later in itertools.pairwise(points))
    return f"{gap:.1f}@{began - start:.1f}"


def ready_for_good(samples: list[tuple[float, frozenset[str]]], since: float) -> float | None:
    """Seconds from `since` to the first sample after which every process answered ready in
    every sample; None if some did not in the last one."""
    if not samples or samples[-1][1]:
        return None
    last_unready = max((i for i, (_, unready) in enumerate(samples) if unready), default=-1)
    return samples[last_unready + 1][0] - since


@pytest.mark.timeout(600)
async def test_herald_loses_nothing_when_the_node_with_most_queue_leaders_is_killed_under_traffic(
    rabbit_cluster: RabbitCluster, start_herald: HeraldFactory, fault_report: Report
) -> None:
    """Issue 17: two replicas of each service, whose first addresses are two different nodes
    (the eight processes take the three nodes in turn), 1,000 messages at 12 a second in rooms
    of three; the node that leads most quorum queues is SIGKILLed a third of the way in and
    booted again 20 s later. Nothing is lost, no ledger row is written twice, a provider call
    is repeated only if it was in flight on a sender connected to the dead node (with the first
    call's collapse id), and every process answers ready again soon after the kill."""
    nodes = rabbit_cluster.nodes
    herald = await start_herald(
        rabbit=rabbit_cluster,
        replicas=dict.fromkeys(SERVICES, 2),
        first_nodes=nodes,
        overrides=NO_RATE_LIMITS,
    )
    fcm, smtp = herald.fcm, herald.smtp
    assert isinstance(fcm, RecordingFcm)
    assert isinstance(smtp, RecordingSmtp)

    async def each_on_one_node() -> bool:
        # Ready means connected, but a connection can be between a drop and its reconnect at the
        # moment of the look (seen in CI: message-service on no node at all).
        return all(len(on) == 1 for on in herald.connected_nodes(nodes).values())

    try:
        await wait_until(each_on_one_node, timeout=30)
    except TimeoutError:
        raise AssertionError(herald.connected_nodes(nodes)) from None
    clients = herald.connected_nodes(nodes)
    for service in SERVICES:  # the two replicas of each on two nodes
        first, second = (clients[name] for name in herald.replicas(service))
        assert len(first) == len(second) == 1, clients
        assert first != second, clients
    rng = random.Random(59)
    victim: RabbitNode | None = None
    try:
        async with httpx.AsyncClient(
            base_url=herald.api, timeout=30, limits=CLIENT_LIMITS
        ) as client:
            population = await populated(
                herald, client, users=12, room_sizes=(3,) * 6, rng=rng, max_devices=1
            )
            async with steady_traffic(
                client, population, per_second=PER_SECOND, rng=rng, count=MESSAGES
            ) as accepted:

                async def a_third_posted() -> bool:
                    return len(accepted.answers) >= MESSAGES // 3

                await wait_until(a_third_posted, timeout=120, interval=0.1)
                leaders = await asyncio.to_thread(rabbit_cluster.leaders, vhost_of(herald))
                victim = rabbit_cluster.node_named(leaders.most_common(1)[0][0])
                clients = herald.connected_nodes(nodes)
                on_victim = sorted(name for name, on in clients.items() if victim.name in on)
                senders = [name for name in on_victim if herald.services[name].name in SENDERS]
                ports = provider_ports(herald, senders)
                if herald.node is victim:
                    herald.observe_through(next(node for node in nodes if node is not victim))
                killed_at = time.monotonic()
                await asyncio.to_thread(victim.kill)
                # A call in flight at the kill holds its connection on (a cancelled handler
                # waits for its provider call): these ports too.
                ports |= provider_ports(herald, senders)
                # The node stays dead `DOWNTIME_S`; meanwhile, who answers ready.
                samples = await readiness(herald, until=killed_at + DOWNTIME_S)
                boot_s = await asyncio.to_thread(victim.start)  # on its data: it rejoins
                ready_s = ready_for_good(samples, killed_at)
                if ready_s is None:  # not within the downtime: when, then

                    async def all_ready() -> bool:
                        return all((await herald.ready()).values())

                    await wait_until(all_ready, timeout=60, interval=0.2)
                    ready_s = time.monotonic() - killed_at
                await wait_until(lambda: consumers_back(herald), timeout=30, interval=0.2)

                async def rejoined() -> bool:
                    running = await asyncio.to_thread(rabbit_cluster.running_nodes, herald.node)
                    return running == {node.name for node in nodes}

                await wait_until(rejoined, timeout=60, interval=0.2)

                async def all_posted() -> bool:
                    return len(accepted.answers) >= MESSAGES

                await wait_until(all_posted, timeout=MESSAGES / PER_SECOND + 120, interval=0.2)
        expected = Expectation.of(population, accepted)
        result = await settle(herald, expected, timeout=180)
        recover_s = time.monotonic() - killed_at
    finally:
        if victim is not None and not victim.running:
            await asyncio.to_thread(victim.start)
    with fcm._lock:
        bodies = [body for body in fcm.accepted if push_notification_id(body) in expected.pushes]
        push_calls = [call for call in fcm.accepted_calls if call[1] in expected.pushes]
    with smtp._lock:
        email_calls = [
            (at, email_notification_id(message_id), port)
            for at, message_id, port in smtp.received_calls
            if email_notification_id(message_id) in expected.emails
        ]
    stall = longest_stall(
        [at for at, _, _ in push_calls + email_calls], killed_at, killed_at + DOWNTIME_S
    )
    pushes = Repeats.of(push_calls, ports, killed_at)
    emails = Repeats.of(email_calls, ports, killed_at)
    collapse_ids: dict[uuid.UUID, set[tuple[str, str]]] = {}
    for body in bodies:
        message = body["message"]
        collapse_ids.setdefault(push_notification_id(body), set()).add(
            (
                message["apns"]["headers"]["apns-collapse-id"],
                message["android"]["notification"]["tag"],
            )
        )
    unready = set().union(*(names for _, names in samples))
    fault_report(
        **result.fields(),
        posted=len(accepted.answers),
        statuses=dict(accepted.statuses),
        resent=len(accepted.resent),
        rate=PER_SECOND,
        killed=f"node{nodes.index(victim) + 1}",
        its_leaders=f"{leaders[victim.name]}/{sum(leaders.values())}",
        its_clients=",".join(on_victim),
        unready=len(unready),
        ready_s=f"{ready_s:.1f}",
        last_unready=",".join(sorted(last_unready(samples))),
        # connection attempts, channel or consumer restores that failed, in every process
        client_failures=sum("failed" in line for line in connection_lines(herald, herald.services)),
        # what they and FastStream logged as errors (a lost connection being restored logs
        # warnings: herald_shared.logs.ConnectionLossAsWarning)
        client_errors=len(herald.client_errors()),
        # the longest time without a push or e-mail sent while the node was down, and when
        stall_s=stall,
        boot_s=f"{boot_s:.1f}",
        # repeated/of which in flight on the dead node's senders@first copies' time from the kill
        push_repeats=pushes.text(),
        email_repeats=emails.text(),
        recover_s=f"{recover_s:.1f}",
    )
    failed = [round(at - killed_at, 1) for at, status in accepted.answers if status != 201]
    assert accepted.statuses == {201: MESSAGES}, (accepted.errors[:5], failed[:5])
    assert on_victim, clients  # some processes did lose their node
    assert result.lost == 0
    assert result.duplicate_ledger_rows == 0
    assert result.not_delivered_in_ledger == 0
    assert sum(result.dead_letters.values()) == 0, result.dead_letters
    assert pushes.repeated <= pushes.in_flight, pushes
    assert emails.repeated <= emails.in_flight, emails
    assert result.most_copies <= 2
    assert all(len(keys) == 1 for keys in collapse_ids.values())
    assert ready_s <= READY_BOUND_S, connection_lines(herald, last_unready(samples))
    assert herald.crashed() == {}


# 400 messages at 10 a second; the partition begins a third of the way in and lasts until 50
# more were answered after the clients moved.
PARTITION_MESSAGES = 400


async def test_herald_loses_nothing_when_the_node_its_services_use_is_cut_off_from_the_others(
    rabbit_cluster: RabbitCluster, start_herald: HeraldFactory, fault_report: Report
) -> None:
    """A network partition under traffic: the node every service uses (first in their address
    lists, so it leads every quorum queue too: queues are led where they are declared) loses the
    other two. With `pause_minority` it pauses itself and closes its clients' connections; the
    queues elect leaders on the other two, where the clients move. The partition heals, the
    node resumes and rejoins, and no partition is left recorded: nothing lost, no ledger row
    twice, every service ready.

    `RabbitCluster.cut_off` drops the node's distribution links, so both sides notice at once;
    a partition that drops packets silently is noticed after `net_ticktime` (60 s by default,
    45-75 s), which these nodes keep: how long that takes is the setting's, not Herald's."""
    nodes = rabbit_cluster.nodes
    cut, _, observer = nodes
    herald = await start_herald(rabbit=rabbit_cluster, first_nodes=[cut], overrides=NO_RATE_LIMITS)
    assert herald.node is observer
    majority = {node.name for node in nodes if node is not cut}
    everyone = {node.name for node in nodes}

    async def all_on_the_cut_node() -> bool:
        # Ready means connected, but a connection can be between a drop and its reconnect at
        # the moment of the look (seen once in CI: message-service on no node at all).
        return all(on == {cut.name} for on in herald.connected_nodes(nodes).values())

    try:
        await wait_until(all_on_the_cut_node, timeout=30)
    except TimeoutError:
        raise AssertionError(herald.connected_nodes(nodes)) from None
    rng = random.Random(61)
    partitioned = False
    try:
        async with httpx.AsyncClient(
            base_url=herald.api, timeout=30, limits=CLIENT_LIMITS
        ) as client:
            population = await populated(
                herald, client, users=10, room_sizes=(3, 3, 4, 4), rng=rng, max_devices=1
            )
            leaders_before = await asyncio.to_thread(rabbit_cluster.leaders, vhost_of(herald))
            async with steady_traffic(
                client, population, per_second=10, rng=rng, count=PARTITION_MESSAGES
            ) as accepted:

                async def a_third_posted() -> bool:
                    return len(accepted.answers) >= PARTITION_MESSAGES // 3

                await wait_until(a_third_posted, timeout=60, interval=0.1)
                await asyncio.to_thread(rabbit_cluster.cut_off, cut)
                partitioned = True
                cut_at = time.monotonic()

                async def paused() -> bool:  # its listener closed
                    return not await asyncio.to_thread(cut.listening)

                await wait_until(paused, timeout=30, interval=0.05)
                paused_s = time.monotonic() - cut_at

                async def moved() -> bool:  # every process on the majority, and ready
                    on = herald.connected_nodes(nodes)
                    if any(cut.name in names or not names & majority for names in on.values()):
                        return False
                    return all((await herald.ready()).values())

                await wait_until(moved, timeout=60, interval=0.1)
                moved_s = time.monotonic() - cut_at
                await wait_until(lambda: consumers_back(herald), timeout=30, interval=0.2)
                after = herald.connected_nodes(nodes)

                async def every_queue_listed() -> bool:
                    # A queue whose election is still under way is missing from the list (seen
                    # in CI: 69 of 70, the services already ready on the majority).
                    led = await asyncio.to_thread(
                        rabbit_cluster.leaders, vhost_of(herald), observer
                    )
                    return led.total() == leaders_before.total()

                with contextlib.suppress(TimeoutError):  # the assertions below say what is wrong
                    await wait_until(every_queue_listed, timeout=30, interval=0.5)
                leaders_during = await asyncio.to_thread(
                    rabbit_cluster.leaders, vhost_of(herald), observer
                )
                at_move = len(accepted.answers)

                async def more_posted() -> bool:  # the partition lasts while traffic goes on
                    return len(accepted.answers) >= min(at_move + 50, PARTITION_MESSAGES)

                await wait_until(more_posted, timeout=60, interval=0.1)
                await asyncio.to_thread(rabbit_cluster.heal, cut)
                partitioned = False
                healed_at = time.monotonic()

                async def rejoined() -> bool:
                    if not await asyncio.to_thread(cut.listening):
                        return False
                    running = await asyncio.to_thread(rabbit_cluster.running_nodes, observer)
                    return running == everyone

                await wait_until(rejoined, timeout=60, interval=0.2)
                back_s = time.monotonic() - healed_at
                partitions = await asyncio.to_thread(rabbit_cluster.partitions, observer)

                async def all_posted() -> bool:
                    return len(accepted.answers) >= PARTITION_MESSAGES

                await wait_until(all_posted, timeout=120, interval=0.2)
        result = await settle(herald, Expectation.of(population, accepted), timeout=180)
        ready_at_end = await herald.ready()
    finally:
        if partitioned:
            await asyncio.to_thread(rabbit_cluster.heal, cut)
    fault_report(
        **result.fields(),
        posted=len(accepted.answers),
        statuses=dict(accepted.statuses),
        resent=len(accepted.resent),
        leaders_on_cut=f"{leaders_before[cut.name]}/{sum(leaders_before.values())}",
        paused_s=f"{paused_s:.1f}",
        moved_s=f"{moved_s:.1f}",
        moved_to=",".join(
            f"node{nodes.index(rabbit_cluster.node_named(name)) + 1}:{n}"
            for name, n in sorted(Counter(name for on in after.values() for name in on).items())
        ),
        back_s=f"{back_s:.1f}",
        recover_s=f"{time.monotonic() - cut_at:.1f}",
    )
    assert leaders_before[cut.name] > 0
    assert cut.name not in leaders_during, leaders_during  # every queue led by the majority
    assert leaders_during.total() == leaders_before.total(), leaders_during
    assert partitions == {}, partitions  # paused, not split: nothing to reconcile
    assert set(accepted.statuses) == {201}, accepted.errors[:5]
    assert result.lost == 0
    assert result.duplicate_ledger_rows == 0
    assert result.not_delivered_in_ledger == 0
    assert sum(result.dead_letters.values()) == 0, result.dead_letters
    assert result.most_copies <= 2
    assert all(ready_at_end.values()), ready_at_end
    assert herald.crashed() == {}
