"""Fixtures of the fault tests (the helpers live in `tests/support/faults.py`)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from tests.fakes.fcm import FakeFcm
from tests.fakes.smtp import FakeSmtp
from tests.support.faults import (
    Herald,
    HeraldFactory,
    PostgresCluster,
    RabbitCluster,
    RabbitNode,
    RecordingFcm,
    RecordingSmtp,
    Report,
    duration_text,
    emit,
    fault_line,
)
from tests.support.processes import SERVICES, ServiceProcess, free_port, service_env


@pytest.fixture(scope="session")
def rabbit_node(pytestconfig: pytest.Config) -> Iterator[RabbitNode]:
    """One private RabbitMQ node for the session (each test gets its own virtual host on it)."""
    node = RabbitNode(Path(tempfile.mkdtemp(prefix="herald-fault-rabbit-")))
    try:
        node.start()
        yield node
    finally:
        node.cleanup()
        emit(
            pytestconfig,
            fault_line(
                "harness",
                {"rabbit_node": node.name, "rabbit_boot_s": duration_text(node.boot_seconds)},
            ),
        )


@pytest.fixture(scope="session")
def rabbit_cluster(pytestconfig: pytest.Config) -> Iterator[RabbitCluster]:
    """Three private RabbitMQ nodes clustered (`RabbitCluster`), for the tests that ask."""
    cluster = RabbitCluster(Path(tempfile.mkdtemp(prefix="herald-fault-cluster-")), size=3)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.cleanup()
        emit(pytestconfig, fault_line("harness", {"rabbit_cluster_form_s": cluster.form_seconds}))


@pytest.fixture(scope="session")
def pg_cluster(pytestconfig: pytest.Config) -> Iterator[PostgresCluster]:
    """One private PostgreSQL cluster for the session (each test gets its own databases)."""
    cluster = PostgresCluster("pg")
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        cluster.cleanup()
        emit(
            pytestconfig,
            fault_line(
                "harness",
                {
                    "pg_initdb_s": duration_text(cluster.initdb_seconds),
                    "pg_boot_s": duration_text(cluster.boot_seconds),
                },
            ),
        )


@pytest.fixture
def router_cluster() -> Iterator[PostgresCluster]:
    """A cluster for the notification-router alone, for tests that take its database away."""
    cluster = PostgresCluster("router")
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        cluster.cleanup()


@pytest.fixture
def fcm() -> Iterator[FakeFcm]:
    """The shared FakeFcm, recording every send attempt too (`RecordingFcm.attempts`)."""
    with RecordingFcm() as fake:
        yield fake


@pytest.fixture
def smtp() -> Iterator[FakeSmtp]:
    """The SMTP server, recording and able to act right after it accepted a message."""
    with RecordingSmtp() as fake:
        yield fake


@pytest.fixture
async def start_herald(
    rabbit_node: RabbitNode,
    pg_cluster: PostgresCluster,
    fcm: FakeFcm,
    credentials: Path,
    smtp: FakeSmtp,
    tmp_path: Path,
) -> AsyncIterator[HeraldFactory]:
    """Starts the four services as processes on a fresh virtual host of the private node and
    fresh databases of the private cluster (the router's on `router_cluster=` if given), with
    `overrides` added to their environment, and `replicas={service: n}` processes of a service
    (named `service`, `service#2`, … in `Herald.services`); stops and removes everything
    afterwards. With `rabbit=cluster`, on a fresh virtual host of that cluster instead: every
    process gets every node's address, the first node first, or with `first_nodes=[…]` the
    processes (in their order in `Herald.services`) take those nodes in turn as their first."""
    assert isinstance(fcm, RecordingFcm)
    started: list[tuple[Herald, dict[str, PostgresCluster]]] = []

    async def start(
        *,
        overrides: Mapping[str, str] | None = None,
        router_cluster: PostgresCluster | None = None,
        replicas: Mapping[str, int] | None = None,
        rabbit: RabbitCluster | None = None,
        first_nodes: Sequence[RabbitNode] = (),
    ) -> Herald:
        node = rabbit_node
        if rabbit is not None:
            # On a cluster: the services get every node's address and the test observes
            # through the last node.
            node = rabbit.nodes[-1]
        if not node.running:  # a previous test may have left it stopped
            await asyncio.to_thread(node.start)
        rabbit_url = await asyncio.to_thread(node.add_vhost)
        clusters = {
            name: router_cluster
            if router_cluster is not None and name == "notification-router"
            else pg_cluster
            for name in SERVICES
        }
        databases = {name: await clusters[name].create_database() for name in SERVICES}
        environments = service_env(
            rabbit_url=rabbit_url,
            databases=databases,
            fcm=fcm,
            credentials=credentials,
            smtp=smtp,
            # Traffic, not abuse: a few users post for minutes, past a user's budget.
            overrides={"RATE_LIMIT_POSTING": "1000000 per minute", **(overrides or {})},
        )
        firsts = itertools.cycle(first_nodes or [None])

        def environment(name: str) -> dict[str, str]:
            """The next process's: on a cluster, its first node's address, then the others'."""
            if rabbit is None:
                return environments[name]
            urls = rabbit.urls(rabbit_url.rsplit("/", 1)[1], first=next(firsts))
            return {**environments[name], "RABBITMQ_URL": ",".join(urls)}

        log_dir = tmp_path / f"logs-{len(started)}"
        log_dir.mkdir()
        herald = Herald(
            node=node,
            rabbit_url=rabbit_url,
            services={
                replica: ServiceProcess(
                    name=name,
                    port=free_port(),
                    env=environment(name),
                    log_path=log_dir / f"{replica}.log",
                )
                for name in SERVICES
                for replica in [
                    name,
                    *(f"{name}#{n}" for n in range(2, (replicas or {}).get(name, 1) + 1)),
                ]
            },
            databases=databases,
            fcm=fcm,
            smtp=smtp,
            log_dir=log_dir,
        )
        started.append((herald, clusters))
        await herald.start_all()
        return herald

    try:
        yield start
    finally:
        for herald, clusters in started:
            await asyncio.gather(
                *(asyncio.to_thread(service.stop, 15) for service in herald.services.values())
            )
            if not herald.node.running:
                await asyncio.to_thread(herald.node.start)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(herald.node.delete_vhost, herald.rabbit_url)
            for name, url in herald.databases.items():
                if clusters[name].running:
                    with contextlib.suppress(Exception):
                        await clusters[name].drop_database(url)


@pytest.fixture
def fault_report(
    request: pytest.FixtureRequest, record_property: Callable[[str, object], None]
) -> Report:
    """`fault_report(**figures)`: one `FAULT <test> key=value …` line in the terminal output
    (and the figures as JUnit properties); the test's duration is added."""
    started = time.monotonic()

    def report(**fields: object) -> None:
        line = fault_line(
            request.node.name, {**fields, "duration_s": f"{time.monotonic() - started:.1f}"}
        )
        emit(request.config, line, request.node)
        for key, value in fields.items():
            record_property(key, value)

    return report
