"""One benchmark run, start to finish:

1. a private RabbitMQ vhost (on the machine's node, or with `--cluster` on a private three-node
   cluster: `bench.broker`) and one PostgreSQL database per service on the machine's server;
2. the calibration (a fixed Python loop, a raw aio-pika loop in that vhost, a PostgreSQL commit
   loop: `bench.calibrate`);
3. the lean FCM + SMTP servers (`bench.fakes`) in a process of their own;
4. the four services as processes (their production defaults, plus `--env`), PUSH_PROVIDER=fcm
   and EMAIL_BACKEND=smtp pointed at those servers, from the working tree's console scripts or,
   for `--compare`, another checkout's (`bench.compare`); `--replicas` processes of each, the
   load spread over message-service's, CPU and memory counted per service over its replicas;
5. users, devices, preferences and rooms through the API, then a wait until the router's
   recipient projection has them all;
6. the load (`bench.load.generate`) while CPU, memory, queue depths and deliveries are followed;
7. the drain (`follow`): until every owed delivery was accepted and the pipeline settled, or no
   delivery came for `--stall-timeout` seconds, or `--drain-timeout` passed; the checker, the
   report;
8. everything stopped and removed, whatever happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import secrets
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from bench import chat, loop_lag, profile, stages, vacuum
from bench.broker import Broker, cluster_broker, machine_broker
from bench.calibrate import calibrate
from bench.checker import CheckResult, Tally, read_email_records, read_push_records
from bench.fakes import Endpoints
from bench.load import (
    Api,
    LoadPlan,
    LoadResult,
    Population,
    Workload,
    api_session,
    generate,
    generate_lanes,
    populate,
)
from bench.monitor import (
    CpuMonitor,
    QueueMonitor,
    Rabbitmqctl,
    VhostQueue,
    rabbitmq_node_pids,
    vhost_queues,
)
from bench.report import (
    POSTGRES_GROUP,
    big_room_summary,
    cpu_per_notification,
    cpu_per_notification_by_half,
    lanes_summary,
    latency_summary,
    prepare_chart,
    print_table,
    rate,
    series,
    write_chart,
    write_json,
)
from bench.services import OWN_BIN_DIR, SERVICES, ServiceProcess, free_port, replica_names
from herald_shared.events import Channel, notification_id_for
from herald_shared.topology import CONSUMER_QUEUES, RECIPIENT_UPDATES
from tests.support import infra

SAMPLE_INTERVAL = 0.5
QUEUE_SAMPLE_EVERY = 2  # CPU samples per queue-depth sample (six passive declares: ~3 ms of CPU)
PROGRESS_INTERVAL = 5.0
PROJECTION_TIMEOUT = 300.0
# The drain asks rabbitmqctl whether the pipeline settled once no delivery came for this long (or
# once everything arrived), then at most every PROBE_INTERVAL.
QUIET_SECONDS = 5.0
PROBE_INTERVAL = 5.0
PROBE_INTERVAL_DELIVERED = 1.0
LEDGER_PREFETCH = 5000
PROFILED = ("notification-router", "push-sender", "email-sender", "message-service")
FAKES_GROUP = "providers (bench.fakes)"
LOAD_GROUP = "load generator (bench)"
SCENARIOS = ("default", "big-room", "lanes", "chat")
# The lanes scenario's direct messages: how many, and the pause after each.
LANES_DIRECT_MESSAGES = 50
LANES_DIRECT_INTERVAL = 0.1


@dataclass(frozen=True)
class Options:
    count: int
    duration: float
    rate: float  # offered notifications/s; 0: as fast as it goes
    rooms: int
    room_size: int
    email_share: float
    connections: int
    drain_timeout: float  # the drain's upper bound
    out: Path
    env: dict[str, str] = field(default_factory=dict)
    profile_seconds: int = 0
    command: str = "scripts/bench"
    stall_timeout: float = 120.0
    scenario: str = "default"
    fcm_latency: float = 0.0  # seconds per FCM send at the fake
    fcm_concurrency: int = 0  # FCM sends at once at the fake; 0: unbounded
    calibrate: bool = True
    compare: str | None = None  # a git ref
    compare_runs: int = 2  # runs of each side
    replicas: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SERVICES, 1))
    cluster: bool = False  # a private three-node RabbitMQ cluster instead of the machine's node
    vacuum: bool = True  # autovacuum's stand-in where the server has it off (`bench.vacuum`)
    find_rate: bool = False  # search the highest rate within `p99_bound_ms` (`bench.find_rate`)
    p99_bound_ms: float = 250.0
    find_steps: int = 6


def _pg(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://")


def _say(text: str) -> None:
    print(f"[bench] {text}", flush=True)


# The workload is a few users posting about 1000 messages a second, set up by registering
# every user from this one address: message-service's budgets are raised so far that nothing is
# refused, yet every request is still counted (in-process: no REDIS_URL), so the limiter's cost
# is in the figures; registration answers without its timing floor (setup, not measured).
BENCH_RATE_LIMITS = {
    **{
        f"RATE_LIMIT_{budget}": "1000000 per minute"
        for budget in (
            "REGISTRATION",
            "AUTH_FAILURES",
            "ANONYMOUS",
            "POSTING",
            "ROOMS",
            "INVITATIONS",
            "DEVICES",
            "SESSION",
        )
    },
    "REGISTRATION_MIN_SECONDS": "0",
}
# The workload's users are mailed at the SMTP fake, which counts the notification e-mails: their
# addresses count as verified when registered (as for an operator who verifies addresses
# elsewhere), so no verification e-mail per user is sent, counted or waited for.
BENCH_EMAIL_VERIFICATION = {"EMAIL_VERIFICATION": "false"}


def service_environments(
    *,
    rabbit_url: str,
    databases: dict[str, str],
    endpoints: Endpoints,
    extra: dict[str, str],
    fcm_concurrency: int = 0,
) -> dict[str, dict[str, str]]:
    """Production defaults (unlike the tests' `service_env`, which shortens retry tiers and
    heartbeats), with the providers pointed at the local servers, and message-service's rate
    limits out of the workload's way (`BENCH_RATE_LIMITS`). Against an FCM fake that serves
    `fcm_concurrency` requests at a time, push-sender sends at most that many at once, as an
    operator sets it for a provider's known capacity (so that the places it keeps for urgent
    pushes are free places at the provider too)."""
    in_flight = {"PUSH_MAX_IN_FLIGHT_FCM": str(fcm_concurrency)} if fcm_concurrency > 0 else {}
    providers = {
        "message-service": {**BENCH_RATE_LIMITS, **BENCH_EMAIL_VERIFICATION},
        "push-sender": {
            "PUSH_PROVIDER": "fcm",
            "FCM_CREDENTIALS_FILE": endpoints.credentials_file,
            "FCM_BASE_URL": endpoints.fcm_base_url,
            **in_flight,
        },
        "email-sender": {
            "EMAIL_BACKEND": "smtp",
            "SMTP_HOST": endpoints.smtp_host,
            "SMTP_PORT": str(endpoints.smtp_port),
            "SMTP_TLS": "none",
        },
    }
    return {
        name: {
            "RABBITMQ_URL": rabbit_url,
            "DATABASE_URL": databases[name],
            **providers.get(name, {}),
            **extra,
        }
        for name in SERVICES
    }


@dataclass
class Deliveries:
    """The providers' record files, followed while the run goes on, fed to the tally as they grow
    (no record is kept: the tally keeps one slot per notification)."""

    directory: Path
    tally: Tally
    _push_offset: int = 0
    _email_offset: int = 0

    def poll(self) -> None:
        pushes, self._push_offset = read_push_records(
            self.directory / "push.tsv", self._push_offset
        )
        emails, self._email_offset = read_email_records(
            self.directory / "email.tsv", self._email_offset
        )
        for push in pushes:
            self.tally.push(push)
        for email in emails:
            self.tally.email(email)

    def skip(self) -> tuple[int, int]:
        """Pass over what the files hold now (not the workload's); how many pushes and
        e-mails."""
        pushes, self._push_offset = read_push_records(
            self.directory / "push.tsv", self._push_offset
        )
        emails, self._email_offset = read_email_records(
            self.directory / "email.tsv", self._email_offset
        )
        return len(pushes), len(emails)


@dataclass
class Stack:
    """Everything a run starts, so that `teardown` can stop and remove all of it."""

    directory: Path
    bin_dir: Path = OWN_BIN_DIR
    broker: Broker | None = None
    databases: dict[str, str] = field(default_factory=dict)
    fakes: asyncio.subprocess.Process | None = None
    # By process name: `service`, `service#2`… (`bench.services.replica_names`).
    services: dict[str, ServiceProcess] = field(default_factory=dict)
    first_nodes: dict[str, int] = field(default_factory=dict)  # process → node it connects to

    @property
    def rabbit_url(self) -> str:
        """The run's vhost on the node the benchmark itself uses."""
        return self.broker.url if self.broker is not None else ""

    @property
    def rabbitmqctl(self) -> Rabbitmqctl:
        return self.broker.ctl if self.broker is not None else Rabbitmqctl()

    async def start_fakes(self, *, fcm_latency: float, fcm_concurrency: int) -> Endpoints:
        self.fakes = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.fakes",
            "--dir",
            str(self.directory / "providers"),
            "--fcm-latency",
            str(fcm_latency),
            "--fcm-concurrency",
            str(fcm_concurrency),
            stdout=asyncio.subprocess.PIPE,
            start_new_session=True,  # Ctrl-C reaches only us; we stop it in order
        )
        if self.fakes.stdout is None:
            raise RuntimeError("no pipe to the provider servers")
        line = await asyncio.wait_for(self.fakes.stdout.readline(), 30)
        if not line:
            raise RuntimeError("the local provider servers did not start")
        return Endpoints(**json.loads(line))

    async def start_services(
        self, environments: dict[str, dict[str, str]], replicas: dict[str, int]
    ) -> None:
        """`replicas[service]` processes of each service; on a cluster, process number n (of
        all, in order) connects to node n first (round the nodes), so replicas of a service
        start on different nodes and the clients spread over them."""
        if self.broker is None:
            raise RuntimeError("no broker to start the services on")
        logs = self.directory / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        for turn, (process, name) in enumerate(replica_names(replicas)):
            env = environments[name]
            if env.get("RABBITMQ_URL") == self.broker.url:  # not one of `--env`
                env = {**env, "RABBITMQ_URL": self.broker.service_url(turn)}
            self.services[process] = ServiceProcess(
                name=name,
                port=free_port(),
                env=env,
                log_path=logs / f"{process}.log",
                bin_dir=self.bin_dir,
            )
            self.first_nodes[process] = self.broker.first_node(turn)
            self.services[process].start()
        await asyncio.gather(
            *(asyncio.to_thread(service.wait_ready, 90) for service in self.services.values())
        )

    def pids(self) -> dict[str, int]:
        """By process name (`service`, `service#2`…)."""
        return {
            name: service.process.pid
            for name, service in self.services.items()
            if service.process is not None
        }

    def service_pids(self) -> dict[str, list[int]]:
        """The pids of every service's replicas, by service."""
        grouped: dict[str, list[int]] = {name: [] for name in SERVICES}
        for service in self.services.values():
            if service.process is not None:
                grouped[service.name].append(service.process.pid)
        return grouped

    def service_urls(self) -> dict[str, str]:
        """Every process's base URL, by process name."""
        return {name: service.base_url for name, service in self.services.items()}

    def api_urls(self) -> list[str]:
        """The base URLs of message-service's replicas."""
        return [
            service.base_url
            for service in self.services.values()
            if service.name == "message-service"
        ]

    async def stop_fakes(self) -> None:
        if self.fakes is not None and self.fakes.returncode is None:
            self.fakes.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.fakes.wait(), 10)
            except TimeoutError:
                self.fakes.kill()
                await self.fakes.wait()

    async def teardown(self) -> dict[str, int]:
        codes = await asyncio.gather(
            *(asyncio.to_thread(service.stop) for service in self.services.values())
        )  # each drains on SIGTERM: all at once rather than one after the other
        exit_codes = dict(zip(self.services, codes, strict=True))
        await self.stop_fakes()
        await asyncio.gather(
            *(infra.drop_database(url) for url in self.databases.values()), return_exceptions=True
        )
        if self.broker is not None:
            await self.broker.close()
        return exit_codes


async def outbox_pending(message_db: str) -> int | None:
    """Unpublished outbox rows of the message-service, or None if they cannot be read."""
    try:
        connection = await asyncpg.connect(_pg(message_db))
    except (OSError, asyncpg.PostgresError):
        return None
    try:
        count = await connection.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL")
        return int(count)
    except asyncpg.PostgresError:  # the table is the message-service's to change
        return None
    finally:
        await connection.close()


@dataclass(frozen=True)
class Probe:
    """Whether the pipeline still holds work: every queue of the vhost (dead-letter queues aside,
    which hold what will never come by itself) and the outbox."""

    queues: tuple[VhostQueue, ...]
    outbox_pending: int | None  # None: not readable
    queues_known: bool = True  # False: rabbitmqctl failed, nothing can be proven

    @property
    def settled(self) -> bool:
        return (
            self.queues_known
            and self.outbox_pending == 0
            and all(
                queue.ready == 0 and queue.unacknowledged == 0
                for queue in self.queues
                if not queue.dead_letter
            )
        )

    def dead_letters(self) -> dict[str, int]:
        return {
            queue.name: queue.ready + queue.unacknowledged
            for queue in self.queues
            if queue.dead_letter and queue.ready + queue.unacknowledged
        }

    def holding(self) -> dict[str, list[int]]:
        return {
            queue.name: [queue.ready, queue.unacknowledged]
            for queue in self.queues
            if not queue.dead_letter and queue.ready + queue.unacknowledged
        }


async def probe(stack: Stack) -> Probe:
    outbox = await outbox_pending(stack.databases["message-service"])
    try:
        queues = await vhost_queues(stack.rabbit_url, stack.rabbitmqctl)
    except (RuntimeError, OSError, TimeoutError) as exc:
        _say(f"listing the vhost's queues failed ({type(exc).__name__}): not settled")
        return Probe((), outbox, queues_known=False)
    return Probe(tuple(queues), outbox)


async def _settled(stack: Stack) -> bool:
    return (await probe(stack)).settled


async def wait_for_projection(stack: Stack, population: Population) -> None:
    """The router learns users from `user.updated`: wait until it knows every device and every
    e-mail preference, or the first messages would be routed on a partial projection. Reads the
    router's `recipients` table; if that is not readable (the router's to change), waits until the
    outbox and the router's `user.updated` queue are empty instead."""
    connection = await asyncpg.connect(_pg(stack.databases["notification-router"]))
    try:

        async def complete() -> bool:
            row = await connection.fetchrow(
                "SELECT count(*) FILTER (WHERE json_array_length(devices::json) = 1) AS devices,"
                " count(*) FILTER (WHERE email_enabled) AS emails FROM recipients"
            )
            return bool(
                row is not None
                and row["devices"] == len(population.users)
                and row["emails"] == population.email_users
            )

        try:
            await infra.wait_until(complete, timeout=PROJECTION_TIMEOUT, interval=0.5)
            return
        except asyncpg.PostgresError as exc:
            _say(f"router projection not readable ({type(exc).__name__}): waiting for its queue")
    finally:
        await connection.close()

    async def drained() -> bool:
        if await outbox_pending(stack.databases["message-service"]) != 0:
            return False
        queues = await vhost_queues(stack.rabbit_url, stack.rabbitmqctl)
        return all(
            queue.ready == 0 and queue.unacknowledged == 0
            for queue in queues
            if queue.name == RECIPIENT_UPDATES.name
        )

    await infra.wait_until(drained, timeout=PROJECTION_TIMEOUT, interval=2)


async def sample_loop(
    stop: asyncio.Event,
    cpu: CpuMonitor,
    queues: QueueMonitor,
    groups: dict[str, list[int]],
    pg_admin: asyncpg.Connection,
    databases: list[str],
    completed: Callable[[], int],
) -> None:
    """CPU and memory every SAMPLE_INTERVAL (with how many notifications were `completed` by
    then: their pushes accepted), and once more when `stop` is set; queue depths every
    QUEUE_SAMPLE_EVERY of those."""
    tick = 0
    while True:
        backends = await pg_admin.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = ANY($1::text[])", databases
        )
        cpu.sample({**groups, POSTGRES_GROUP: [row["pid"] for row in backends]}, completed())
        if stop.is_set():
            return
        if tick % QUEUE_SAMPLE_EVERY == 0:
            try:
                await queues.sample()
            except Exception as exc:  # a sample lost is not a run lost
                _say(f"queue sample failed: {type(exc).__name__}")
        tick += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SAMPLE_INTERVAL)


@dataclass
class Drain:
    """How the drain ended. `reason`: "all delivered", "settled" (deliveries missing, nothing left
    anywhere to bring them), "stalled" (no delivery for `stall_seconds` while work was still
    queued) or "bound" (`bound_seconds` after the last post)."""

    reason: str
    seconds: float  # from the end of posting
    bound_seconds: float
    stall_seconds: float
    last_probe: Probe | None = None
    delivered_seconds: float | None = None  # from the end of posting to the last owed delivery

    @property
    def settled(self) -> bool:
        return self.last_probe is not None and self.last_probe.settled

    def as_dict(self) -> dict[str, Any]:
        return {
            "reason": self.reason,
            "seconds": round(self.seconds, 2),
            "delivered_seconds": (
                None if self.delivered_seconds is None else round(self.delivered_seconds, 2)
            ),
            "settled": self.settled,
            "bound_seconds": self.bound_seconds,
            "stall_seconds": self.stall_seconds,
            "queues_holding_at_end": self.last_probe.holding() if self.last_probe else None,
            "outbox_pending_at_end": self.last_probe.outbox_pending if self.last_probe else None,
        }


async def follow(
    *,
    load_task: asyncio.Task[LoadResult],
    load: LoadResult,
    tally: Tally,
    deliveries: Deliveries,
    stack: Stack,
    options: Options,
    on_delivered: Callable[[], None],
) -> Drain:
    """Feed the tally while posting, then drain: until every owed delivery was accepted and the
    pipeline settled (so that late repeats are seen too), or the pipeline settled with deliveries
    missing (they are lost), or no delivery came for `stall_timeout` s, or `drain_timeout` s
    passed (what is missing then is not drained, unless the pipeline had settled)."""
    start = time.monotonic()
    last_report = start
    registered = 0
    last_count = -1
    last_progress = start
    drain_started: float | None = None
    delivered_after: float | None = None
    next_probe = probed_at = 0.0
    last_probe: Probe | None = None

    def ended(reason: str) -> Drain:
        return Drain(
            reason=reason,
            seconds=time.monotonic() - (drain_started or start),
            bound_seconds=options.drain_timeout,
            stall_seconds=options.stall_timeout,
            last_probe=last_probe,
            delivered_seconds=delivered_after,
        )

    while True:
        if load_task.done():
            await asyncio.sleep(SAMPLE_INTERVAL)
        else:
            await asyncio.wait({load_task}, timeout=SAMPLE_INTERVAL)
        for message in load.posted[registered:]:
            tally.register(message)
        registered = len(load.posted)
        deliveries.poll()
        now = time.monotonic()
        count = tally.push_records + tally.email_records + tally.unexpected
        if count != last_count:
            last_count, last_progress = count, now
        if load_task.done():
            load_task.result()  # a failed load fails the run
            if drain_started is None:
                drain_started = now
                _say(
                    f"posted {len(load.posted)} messages; draining (while deliveries progress, "
                    f"at most {options.drain_timeout:g} s)"
                )
            delivered = tally.all_delivered
            if delivered and delivered_after is None:
                delivered_after = now - drain_started
                on_delivered()
            quiet = now - last_progress
            if (delivered or quiet >= QUIET_SECONDS) and now >= next_probe:
                last_probe = await probe(stack)
                now = probed_at = time.monotonic()
                next_probe = now + (PROBE_INTERVAL_DELIVERED if delivered else PROBE_INTERVAL)
                if last_probe.settled:
                    return ended("all delivered" if delivered else "settled")
            stalled = quiet >= options.stall_timeout
            if stalled or now - drain_started > options.drain_timeout:
                if now - probed_at > PROBE_INTERVAL_DELIVERED:  # the state at the end, to judge
                    last_probe = await probe(stack)
                if delivered:
                    return ended("all delivered")
                if last_probe is not None and last_probe.settled:
                    return ended("settled")
                return ended("stalled" if stalled else "bound")
        if now - last_report >= PROGRESS_INTERVAL:
            last_report = now
            _say(
                f"t={now - start:5.1f} s  pushes accepted {tally.pushes_accepted}/"
                f"{tally.owed_pushes}  e-mails accepted {tally.emails_accepted}/"
                f"{tally.owed_emails}"
            )


async def direct_timelines(
    stack: Stack, population: Population, tally: Tally
) -> list[stages.Timeline]:
    """The lanes scenario's direct messages, stage by stage (`bench.stages`)."""
    direct_room = len(population.rooms) - 1
    directs = [message for message in tally.messages if message.room == direct_room]
    accepted = tally.push_latencies(direct_room)
    if len(accepted) != len(directs):  # a push missing: no way to pair them
        return []
    return await stages.read_timelines(
        message_db=_pg(stack.databases["message-service"]),
        router_db=_pg(stack.databases["notification-router"]),
        push_db=_pg(stack.databases["push-sender"]),
        messages=directs,
        accepted_after_201=accepted,
    )


async def read_ledger(router_db: str, tally: Tally) -> dict[str, int]:
    """Feed every (message_id, recipient_id) of the router's ledger to the tally (streamed, not
    held), and the deliveries the ledger marks failed; its deliveries counted by status. Tables
    the router no longer has are skipped (the tally then does not check the ledger)."""
    connection = await asyncpg.connect(_pg(router_db))
    try:
        try:
            async with connection.transaction():
                async for row in connection.cursor(
                    "SELECT message_id, recipient_id FROM notifications", prefetch=LEDGER_PREFETCH
                ):
                    tally.ledger_row(row[0], row[1])
        except asyncpg.PostgresError as exc:  # the table is the router's to change
            _say(f"router ledger not readable ({type(exc).__name__}): not checked")
        try:
            failed = await connection.fetch(
                "SELECT message_id, recipient_id, channel FROM notification_deliveries"
                " WHERE status = 'failed'"
            )
            for row in failed:
                tally.delivery_failed(row[0], row[1], row[2])
            statuses = await connection.fetch(
                "SELECT channel || ':' || status AS key, count(*) AS n"
                " FROM notification_deliveries GROUP BY 1"
            )
        except asyncpg.PostgresError:
            statuses = []
    finally:
        await connection.close()
    return {row["key"]: row["n"] for row in statuses}


def workload_of(options: Options) -> Workload:
    return Workload(options.rooms, options.room_size, options.email_share)


async def run_once(
    options: Options, *, bin_dir: Path = OWN_BIN_DIR, label: str = ""
) -> tuple[dict[str, Any], int]:
    """One run with the services of `bin_dir`: its document (also written as JSON and PNG, and
    printed as a table) and its exit status (0 ok, 1 lost/duplicated/unexpected, 2 not drained)."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    run_id = secrets.token_hex(3)
    directory = (options.out / f"{stamp}-{run_id}").resolve()
    directory.mkdir(parents=True, exist_ok=True)
    workload = workload_of(options)
    messages_per_second = options.rate / workload.recipients_per_message
    stack = Stack(directory, bin_dir=bin_dir)
    exit_codes: dict[str, int] = {}
    try:
        if options.cluster:
            _say("starting a private three-node RabbitMQ cluster (tens of seconds)")
        broker = asyncio.create_task(cluster_broker() if options.cluster else machine_broker())
        try:
            databases = await asyncio.gather(*(infra.create_database() for _ in SERVICES))
            stack.databases = dict(zip(SERVICES, databases, strict=True))
        finally:
            stack.broker = await broker  # torn down with the rest, whatever happens next
        if options.cluster:
            _say(
                f"cluster formed in {stack.broker.form_seconds:.1f} s, AMQP ports "
                + ", ".join(map(str, stack.broker.amqp_ports))
            )
        calibration: dict[str, Any] = {}
        if options.calibrate:
            _say("calibrating (a fixed Python loop, aio-pika on this vhost, PostgreSQL commits)")
            calibration = (
                await calibrate(stack.rabbit_url, _pg(stack.databases["notification-router"]))
            ).as_dict()
        endpoints = await stack.start_fakes(
            fcm_latency=options.fcm_latency, fcm_concurrency=options.fcm_concurrency
        )
        environments = service_environments(
            rabbit_url=stack.rabbit_url,
            databases=stack.databases,
            endpoints=endpoints,
            extra=options.env,
            fcm_concurrency=options.fcm_concurrency,
        )
        _say(
            f"starting the four services of {label or 'the working tree'} "
            f"(logs in {directory / 'logs'})"
        )
        # Seconds of imports, done while the services start rather than after the run.
        charting = asyncio.create_task(asyncio.to_thread(prepare_chart))
        await stack.start_services(environments, options.replicas)
        await charting
        pids = stack.pids()
        _say("pids: " + ", ".join(f"{name} {pid}" for name, pid in pids.items()))
        quorum_replicas = await stack.broker.quorum_replicas()
        if quorum_replicas:
            _say(
                f"{len(quorum_replicas)} quorum queues, replicas per queue: "
                + ", ".join(map(str, sorted(set(quorum_replicas.values()))))
                + "; first node per process: "
                + ", ".join(f"{name} {node}" for name, node in stack.first_nodes.items())
            )
        async with api_session(stack.api_urls(), options.connections) as session:
            _say(f"setting up {workload.users} users in {workload.rooms} rooms")
            lanes = options.scenario == "lanes"
            chatting = options.scenario == "chat"
            population = await populate(
                session,
                workload,
                run_id,
                direct_pairs=workload.rooms if chatting else int(lanes),
                default_levels=chatting,
            )
            await wait_for_projection(stack, population)

            tally = Tally(
                population,
                email_notification_id=lambda message_id, recipient_id: notification_id_for(
                    message_id=message_id, recipient_id=recipient_id, channel=Channel.EMAIL
                ),
            )
            deliveries = Deliveries(directory / "providers", tally)
            # Each invited member gets one notification of their invitation (a version from
            # before invitations sends none): let them go out, then leave them out of the tally.
            await infra.wait_until(
                lambda: _settled(stack), timeout=PROJECTION_TIMEOUT, interval=0.5
            )
            pushes, emails = deliveries.skip()
            _say(f"setup sent {pushes} pushes and {emails} e-mails (invitations), not counted")
            if chatting:
                return await run_chat(
                    session,
                    stack=stack,
                    population=population,
                    workload=workload,
                    options=options,
                    messages_per_second=messages_per_second,
                    deliveries=deliveries,
                    json_path=options.out / f"{stamp}-{run_id}.json",
                )
            lag_before = await loop_lag.read_all(stack.service_urls())
            fakes_pid = stack.fakes.pid if stack.fakes is not None else 0
            rabbit_group = stack.broker.cpu_group
            groups = {
                **stack.service_pids(),  # each service's replicas together
                FAKES_GROUP: [fakes_pid],
                LOAD_GROUP: [os.getpid()],
                rabbit_group: rabbitmq_node_pids(stack.broker.amqp_ports),
            }
            cpu = CpuMonitor(rss_groups=(*SERVICES, FAKES_GROUP, LOAD_GROUP, rabbit_group))
            queues = QueueMonitor(stack.rabbit_url, tuple(q.name for q in CONSUMER_QUEUES))
            pg_admin = await asyncpg.connect(infra.PG_ADMIN_URL)
            autovacuum = vacuum.StandIn(await vacuum.server_autovacuum(pg_admin), options.vacuum)
            stop_sampling = asyncio.Event()
            sampler = asyncio.create_task(
                sample_loop(
                    stop_sampling,
                    cpu,
                    queues,
                    groups,
                    pg_admin,
                    [url.rsplit("/", 1)[1] for url in stack.databases.values()],
                    lambda: tally.pushes_accepted,
                )
            )
            vacuuming = asyncio.create_task(
                vacuum.stand_in(
                    stop_sampling, [_pg(url) for url in stack.databases.values()], autovacuum
                )
            )
            profiling = asyncio.create_task(start_profiles(options, pids, directory))
            plan = LoadPlan(
                count=options.count,
                duration=options.duration,
                messages_per_second=messages_per_second,
                connections=options.connections,
            )
            _say(
                f"posting up to {plan.count} messages for at most {plan.duration:g} s at "
                + (f"{options.rate:g} notifications/s" if options.rate else "full speed")
            )
            load = LoadResult()
            router_db = _pg(stack.databases["notification-router"])
            room_recipients = options.count * (len(population.rooms[0].members) - 1)

            async def chatter_decided() -> None:
                """Until the router has decided every recipient of the room's messages."""
                connection = await asyncpg.connect(router_db)
                try:
                    while True:
                        decided = await connection.fetchval("SELECT count(*) FROM notifications")
                        if decided >= room_recipients:
                            return
                        await asyncio.sleep(0.05)  # polling the database: nothing to wait on
                finally:
                    await connection.close()

            load_task = asyncio.create_task(
                generate_lanes(
                    session,
                    population,
                    room_messages=options.count,
                    direct_messages=LANES_DIRECT_MESSAGES,
                    direct_interval=LANES_DIRECT_INTERVAL,
                    result=load,
                    before_directs=chatter_decided,
                )
                if lanes
                else generate(session, population, plan, load)
            )
            drain = await follow(
                load_task=load_task,
                load=load,
                tally=tally,
                deliveries=deliveries,
                stack=stack,
                options=options,
                # CPU and memory up to the last delivery, not while the drain makes sure nothing
                # else comes
                on_delivered=stop_sampling.set,
            )
            stop_sampling.set()
            await sampler
            await vacuuming
            await queues.close()
            await pg_admin.close()
            profiles = await profiling
            deliveries.poll()
            delivery_status = await read_ledger(stack.databases["notification-router"], tally)
            lag = loop_lag.summarize(lag_before, await loop_lag.read_all(stack.service_urls()))
            timelines = (
                await direct_timelines(stack, population, tally)
                if options.scenario == "lanes"
                else []
            )
        await stack.stop_fakes()  # writes its stats
        provider_stats = _read_json(directory / "providers" / "stats.json")

        result = tally.result(settled=drain.settled)
        document = build_document(
            options=options,
            stamp=stamp,
            label=label,
            bin_dir=bin_dir,
            workload=workload,
            population=population,
            load=load,
            tally=tally,
            result=result,
            cpu=cpu,
            queues=queues,
            drain=drain,
            calibration=calibration,
            profiles=profiles,
            delivery_status=delivery_status,
            provider_stats=provider_stats,
        )
        document["event_loop_lag"] = lag
        document["autovacuum"] = autovacuum.as_dict()
        if timelines:
            document["lanes"]["timelines"] = stages.summarize(timelines)
        document["broker"] = {
            **stack.broker.describe(),
            "quorum_replicas": sorted(set(quorum_replicas.values())),
            "first_node_by_process": stack.first_nodes,
        }
    finally:
        _say(
            "stopping the services and removing the "
            + ("cluster" if options.cluster else "vhost")
            + " and databases"
        )
        exit_codes = await stack.teardown()
    document["service_exit_codes"] = exit_codes
    json_path = options.out / f"{stamp}-{run_id}.json"
    chart_path = options.out / f"{stamp}-{run_id}.png"
    document["chart"] = str(chart_path)
    write_json(document, json_path)
    write_chart(document, chart_path)
    print_table(document)
    _say(f"JSON: {json_path}   chart: {chart_path}   logs: {directory / 'logs'}")
    if result.lost or result.duplicates or result.unexpected:
        _say("FAILED: the checker found lost, duplicated or unexpected notifications")
        return document, 1
    if result.not_drained:
        _say(
            f"INCOMPLETE: {result.not_drained} notifications not drained (still on their way when "
            "the drain ended; not lost): a longer --drain-timeout or --stall-timeout would wait"
        )
        return document, 2
    return document, 0


async def run_chat(
    session: Api,
    *,
    stack: Stack,
    population: Population,
    workload: Workload,
    options: Options,
    messages_per_second: float,
    deliveries: Deliveries,
    json_path: Path,
) -> tuple[dict[str, Any], int]:
    """The chat scenario (`bench.chat`): streams open, the load, the pipeline settled, then the
    router's decisions checked against what the providers accepted."""
    router_db = _pg(stack.databases["notification-router"])
    streams = await chat.open_streams(
        stack.services["message-service"].base_url, population, workload.rooms
    )
    _say(f"{len(streams.tasks)} real-time streams open, each with its room in view")
    try:
        await asyncio.wait_for(
            chat.streams_projected(router_db, len(streams.user_indexes)), PROJECTION_TIMEOUT
        )
        plan = LoadPlan(
            count=options.count,
            duration=options.duration,
            messages_per_second=messages_per_second,
            connections=options.connections,
        )
        _say(f"posting up to {plan.count} messages (chat habits) for at most {plan.duration:g} s")
        load = await chat.generate_chat(session, population, workload.rooms, plan, LoadResult())
        _say(f"posted {len(load.posted)}; waiting for the pipeline to settle")
        await infra.wait_until(lambda: _settled(stack), timeout=options.drain_timeout, interval=0.5)
    finally:
        await streams.close()
    pushes, _ = read_push_records(deliveries.directory / "push.tsv", deliveries._push_offset)
    emails, _ = read_email_records(deliveries.directory / "email.tsv", deliveries._email_offset)
    ledger = await chat.ledger_figures(router_db)
    checked = chat.check(ledger, pushes, emails)
    figures = chat.summary(
        load=load, ledger=ledger, checked=checked, pushes=pushes, emails=emails, streams=streams
    )
    document = {"command": options.command, "scenario": "chat", "chat": figures}
    write_json(document, json_path)
    for key, value in figures.items():
        _say(f"  {key}: {value}")
    _say(f"JSON: {json_path}")
    failed = checked["lost"] or checked["duplicates"] or checked["unexpected"]
    if failed:
        _say("FAILED: the checker found lost, duplicated or unexpected notifications")
    return document, 1 if failed else 0


def build_document(
    *,
    options: Options,
    stamp: str,
    label: str,
    bin_dir: Path,
    workload: Workload,
    population: Population,
    load: LoadResult,
    tally: Tally,
    result: CheckResult,
    cpu: CpuMonitor,
    queues: QueueMonitor,
    drain: Drain,
    calibration: dict[str, Any],
    profiles: dict[str, Any],
    delivery_status: dict[str, int],
    provider_stats: dict[str, Any],
) -> dict[str, Any]:
    accepted = [message.accepted_at for message in load.posted]
    first_accept = min(accepted, default=load.started_at)
    ours = sum(account.seconds for account in cpu.accounts.values())
    wall = max(cpu.wall, 1e-9)
    seconds = {name: account.seconds for name, account in cpu.accounts.items()}
    document: dict[str, Any] = {
        "title": f"{options.command}  ({stamp})" + (f"  [{label}]" if label else ""),
        "command": options.command,
        "scenario": options.scenario,
        "started_at": stamp,
        "services": {"label": label, "bin_dir": str(bin_dir)},
        "machine": {
            "cpus": os.cpu_count(),
            "processor": _processor(),
            "python": platform.python_version(),
            "load_average_at_start": list(os.getloadavg()),
        },
        "calibration": calibration,
        "config": {
            "count": options.count,
            "duration": options.duration,
            "rate_notifications_per_s": options.rate,
            "rate_messages_per_s": round(options.rate / workload.recipients_per_message, 2),
            "rooms": options.rooms,
            "room_size": options.room_size,
            "recipients_per_message": workload.recipients_per_message,
            "users": workload.users,
            "email_users": population.email_users,
            "connections": options.connections,
            "drain_timeout": options.drain_timeout,
            "stall_timeout": options.stall_timeout,
            "fcm_latency_s": options.fcm_latency,
            "fcm_concurrency": options.fcm_concurrency,
            "service_env": options.env,
            "replicas": options.replicas,
            "cluster": options.cluster,
        },
        "messages": {
            "posted": len(load.posted),
            "http_errors": load.errors,
            "posting_seconds": round(load.finished_at - load.started_at, 2),
        },
        "notifications": {
            "expected": result.notifications_expected,
            "completed": result.completed,
            "target_offered_per_s": options.rate,
            "offered_per_s": rate(
                len(accepted) * workload.recipients_per_message,
                first_accept,
                max(accepted, default=first_accept),
            ),
            "sustained_per_s": rate(
                result.completed, first_accept, max(result.completed_at, default=first_accept)
            ),
        },
        "latency_ms": {
            "http_post": latency_summary(message.request_seconds for message in load.posted),
            "post_behind_schedule": latency_summary(
                message.behind_seconds for message in load.posted
            ),
            "push": latency_summary(result.push_latency),
            "email": latency_summary(result.email_latency),
        },
        "cpu": {
            "wall_seconds": round(wall, 2),
            "processes": {
                name: {
                    "seconds": round(account.seconds, 2),
                    "percent_of_one_core": round(100 * account.seconds / wall, 1),
                    "processes": len(account.last),  # pids seen (PostgreSQL: backends)
                }
                for name, account in cpu.accounts.items()
            },
            # CPU from the start of the load to the last delivery (or the end of the drain)
            # divided by the notifications completed.
            "per_notification_ms": cpu_per_notification(seconds, result.completed),
            "per_notification_ms_by_half": cpu_per_notification_by_half(cpu.progress),
            "machine_busy_percent": round(100 * cpu.machine_busy / wall, 1),
            "others_percent": round(100 * max(0.0, cpu.machine_busy - ours) / wall, 1),
        },
        "rss_mb": {
            name: {
                "first": round(account.first / 2**20, 1),
                "max": round(account.max / 2**20, 1),
                "last": round(account.last / 2**20, 1),
                # a group of several processes (replicas, cluster nodes): the figures above are
                # their sums, these each one's largest
                "processes": account.processes,
                "max_per_process": round(account.max_per_process / 2**20, 1),
            }
            for name, account in cpu.rss.items()
            if account.max
        },
        "queues": {
            "max_ready": queues.depths.max(),
        },
        "drain": drain.as_dict(),
        "checker": {
            "lost": result.lost,
            "not_drained": result.not_drained,
            "settled": result.settled,
            "duplicates": result.duplicates,
            "duplicates_by_kind": dict(result.duplicates_by_kind),
            "unexpected": result.unexpected,
            "lost_by_part": dict(result.lost_by_part),
            "not_drained_by_part": dict(result.not_drained_by_part),
            "lost_message_ids": result.lost_message_ids,
            "not_drained_message_ids": result.not_drained_message_ids,
            "ledger_checked": tally.ledger_read,
            "router_delivery_status": delivery_status,
            "dead_letters": drain.last_probe.dead_letters() if drain.last_probe else None,
        },
        "provider_stats": provider_stats,
        "profile": profiles,
        "series": series(
            start=load.started_at,
            accepted_at=accepted,
            recipients_per_message=workload.recipients_per_message,
            check=result,
            queues=queues.depths,
        ),
    }
    if options.scenario == "lanes":
        direct_room = len(population.rooms) - 1
        directs = [message for message in tally.messages if message.room == direct_room]
        last_direct = max((message.accepted_at for message in directs), default=0.0)
        document["lanes"] = lanes_summary(
            direct_latencies=tally.push_latencies(direct_room),
            direct_messages=len(directs),
            room_pushes_owed=sum(
                len(population.rooms[0].members) - 1
                for message in tally.messages
                if message.room == 0
            ),
            room_pushes_pending_at_last_direct=tally.pushes_pending_at(last_direct, 0),
            provider_latency=options.fcm_latency,
            provider_concurrency=options.fcm_concurrency,
        )
    if options.scenario == "big-room":
        first = tally.messages[0] if tally.messages else None
        document["big_room"] = big_room_summary(
            devices=tally.owed_pushes,
            emails_owed=tally.owed_emails,
            pushes_received=tally.push_records,
            devices_reached=tally.pushes_accepted,
            emails_received=tally.email_records,
            emails_distinct=tally.emails_accepted,
            first_push_after_201=(
                min(result.push_accepted_at) - first.accepted_at
                if first and result.push_accepted_at
                else None
            ),
            last_push_after_201=(
                tally.last_push_at - first.accepted_at if first and tally.last_push_at else None
            ),
            last_email_after_201=(
                tally.last_email_at - first.accepted_at if first and tally.last_email_at else None
            ),
            provider_latency=options.fcm_latency,
            provider_concurrency=options.fcm_concurrency,
        )
    return document


async def run(options: Options) -> int:
    if options.find_rate:
        from bench.find_rate import run_find_rate

        return await run_find_rate(options)
    if options.compare:
        from bench.compare import run_compare

        return await run_compare(options)
    _, status = await run_once(options)
    return status


async def start_profiles(options: Options, pids: dict[str, int], directory: Path) -> dict[str, Any]:
    """py-spy each service for `profile_seconds`, 2 s into the load; their summaries."""
    if not options.profile_seconds:
        return {}
    await asyncio.sleep(2)
    outputs = {name: directory / f"profile-{name}.txt" for name in PROFILED}
    recorders = [
        await profile.record(pids[name], options.profile_seconds, outputs[name])
        for name in PROFILED
    ]
    await asyncio.gather(*(recorder.wait() for recorder in recorders))
    summaries: dict[str, Any] = {}
    for name, path in outputs.items():
        if path.exists():
            summary = profile.summarise(path.read_text())
            summaries[name] = {"file": str(path), **summary.__dict__}
    return summaries


def _read_json(path: Path) -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError):
        document: dict[str, Any] = json.loads(path.read_text())
        return document
    return {}


def _processor() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()
