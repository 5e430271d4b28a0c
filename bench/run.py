"""One benchmark run, start to finish:

1. a private RabbitMQ vhost and one PostgreSQL database per service on the machine's servers;
2. the lean FCM + SMTP servers (`bench.fakes`) in a process of their own;
3. the four services as processes (their production defaults, plus `--env`), PUSH_PROVIDER=fcm
   and EMAIL_BACKEND=smtp pointed at those servers;
4. users, devices, preferences and rooms through the API, then a wait until the router's
   recipient projection has them all;
5. the load (`bench.load.generate`) while CPU, queue depths and deliveries are sampled;
6. a drain until every owed delivery was accepted (or `--drain-timeout`), the checker, the report;
7. everything stopped and removed, whatever happened.
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
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from bench import profile
from bench.checker import (
    EmailRecord,
    PushRecord,
    check,
    read_email_records,
    read_push_records,
)
from bench.fakes import Endpoints
from bench.load import LoadPlan, LoadResult, Population, Workload, generate, populate
from bench.monitor import CpuMonitor, QueueMonitor, pids_named
from bench.report import latency_summary, print_table, rate, series, write_chart, write_json
from herald_shared.events import Channel, notification_id_for
from herald_shared.topology import CONSUMER_QUEUES
from tests.support import infra
from tests.support.processes import SERVICES, ServiceProcess, free_port

SAMPLE_INTERVAL = 0.5
PROGRESS_INTERVAL = 5.0
PROJECTION_TIMEOUT = 120.0
PROFILED = ("notification-router", "push-sender", "email-sender", "message-service")


@dataclass(frozen=True)
class Options:
    count: int
    duration: float
    rate: float  # offered notifications/s; 0: as fast as it goes
    rooms: int
    room_size: int
    email_share: float
    connections: int
    drain_timeout: float
    out: Path
    env: dict[str, str] = field(default_factory=dict)
    profile_seconds: int = 0
    command: str = "scripts/bench"


def _pg(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://")


def _say(text: str) -> None:
    print(f"[bench] {text}", flush=True)


def service_environments(
    *, rabbit_url: str, databases: dict[str, str], endpoints: Endpoints, extra: dict[str, str]
) -> dict[str, dict[str, str]]:
    """Production defaults (unlike the tests' `service_env`, which shortens retry tiers and
    heartbeats), with the providers pointed at the local servers."""
    providers = {
        "push-sender": {
            "PUSH_PROVIDER": "fcm",
            "FCM_CREDENTIALS_FILE": endpoints.credentials_file,
            "FCM_BASE_URL": endpoints.fcm_base_url,
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
    """The providers' record files, followed while the run goes on."""

    directory: Path
    pushes: list[PushRecord] = field(default_factory=list)
    emails: list[EmailRecord] = field(default_factory=list)
    _push_offset: int = 0
    _email_offset: int = 0

    def poll(self) -> None:
        pushes, self._push_offset = read_push_records(
            self.directory / "push.tsv", self._push_offset
        )
        emails, self._email_offset = read_email_records(
            self.directory / "email.tsv", self._email_offset
        )
        self.pushes += pushes
        self.emails += emails


@dataclass
class Stack:
    """Everything a run starts, so that `teardown` can stop and remove all of it."""

    directory: Path
    rabbit_url: str = ""
    databases: dict[str, str] = field(default_factory=dict)
    fakes: asyncio.subprocess.Process | None = None
    services: dict[str, ServiceProcess] = field(default_factory=dict)

    async def start_fakes(self) -> Endpoints:
        self.fakes = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.fakes",
            "--dir",
            str(self.directory / "providers"),
            stdout=asyncio.subprocess.PIPE,
            start_new_session=True,  # Ctrl-C reaches only us; we stop it in order
        )
        if self.fakes.stdout is None:
            raise RuntimeError("no pipe to the provider servers")
        line = await asyncio.wait_for(self.fakes.stdout.readline(), 30)
        if not line:
            raise RuntimeError("the local provider servers did not start")
        endpoints = Endpoints(**json.loads(line))
        return endpoints

    async def start_services(self, environments: dict[str, dict[str, str]]) -> None:
        logs = self.directory / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        for name in SERVICES:
            self.services[name] = ServiceProcess(
                name=name, port=free_port(), env=environments[name], log_path=logs / f"{name}.log"
            )
            self.services[name].start()
        await asyncio.gather(
            *(asyncio.to_thread(service.wait_ready, 90) for service in self.services.values())
        )

    def pids(self) -> dict[str, int]:
        return {
            name: service.process.pid
            for name, service in self.services.items()
            if service.process is not None
        }

    async def teardown(self) -> dict[str, int]:
        exit_codes = {}
        for name, service in self.services.items():
            exit_codes[name] = await asyncio.to_thread(service.stop)
        if self.fakes is not None and self.fakes.returncode is None:
            self.fakes.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.fakes.wait(), 10)
            except TimeoutError:
                self.fakes.kill()
                await self.fakes.wait()
        for url in self.databases.values():
            with contextlib.suppress(Exception):
                await infra.drop_database(url)
        if self.rabbit_url:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(infra.delete_vhost, self.rabbit_url)
        return exit_codes


async def wait_for_projection(router_db: str, population: Population) -> None:
    """The router learns users from `user.updated`: wait until it knows every device and every
    e-mail preference, or the first messages would be routed on a partial projection."""
    connection = await asyncpg.connect(_pg(router_db))
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

        await infra.wait_until(complete, timeout=PROJECTION_TIMEOUT, interval=0.5)
    finally:
        await connection.close()


def owed(population: Population, load: LoadResult) -> tuple[int, int]:
    """(pushes, e-mails) the posted messages are owed."""
    pushes = emails = 0
    for message in load.posted:
        for member in population.rooms[message.room].members:
            if member != message.sender:
                pushes += 1
                emails += population.users[member].email_enabled
    return pushes, emails


async def sample_loop(
    stop: asyncio.Event,
    cpu: CpuMonitor,
    queues: QueueMonitor,
    groups: dict[str, list[int]],
    pg_admin: asyncpg.Connection,
    databases: list[str],
) -> None:
    while not stop.is_set():
        backends = await pg_admin.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = ANY($1::text[])", databases
        )
        cpu.sample({**groups, "postgres (our backends)": [row["pid"] for row in backends]})
        try:
            await queues.sample()
        except Exception as exc:  # a sample lost is not a run lost
            _say(f"queue sample failed: {type(exc).__name__}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SAMPLE_INTERVAL)


async def run(options: Options) -> int:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    run_id = secrets.token_hex(3)
    directory = (options.out / f"{stamp}-{run_id}").resolve()
    directory.mkdir(parents=True, exist_ok=True)
    workload = Workload(options.rooms, options.room_size, options.email_share)
    messages_per_second = options.rate / workload.recipients_per_message
    stack = Stack(directory)
    exit_codes: dict[str, int] = {}
    try:
        stack.rabbit_url = await asyncio.to_thread(infra.create_vhost)
        for name in SERVICES:
            stack.databases[name] = await infra.create_database()
        endpoints = await stack.start_fakes()
        environments = service_environments(
            rabbit_url=stack.rabbit_url,
            databases=stack.databases,
            endpoints=endpoints,
            extra=options.env,
        )
        _say(f"starting the four services (logs in {directory / 'logs'})")
        await stack.start_services(environments)
        pids = stack.pids()
        _say("pids: " + ", ".join(f"{name} {pid}" for name, pid in pids.items()))
        api = stack.services["message-service"].base_url
        limits = httpx.Limits(
            max_connections=options.connections, max_keepalive_connections=options.connections
        )
        async with httpx.AsyncClient(base_url=api, timeout=30, limits=limits) as client:
            _say(f"setting up {workload.users} users in {workload.rooms} rooms")
            population = await populate(client, workload, run_id)
            await wait_for_projection(stack.databases["notification-router"], population)

            deliveries = Deliveries(directory / "providers")
            deliveries.poll()  # nothing yet: setup sends no notification
            cpu = CpuMonitor()
            queues = QueueMonitor(stack.rabbit_url, tuple(q.name for q in CONSUMER_QUEUES))
            fakes_pid = stack.fakes.pid if stack.fakes is not None else 0
            groups = {
                **{name: [pid] for name, pid in pids.items()},
                "providers (bench.fakes)": [fakes_pid],
                "load generator (bench)": [os.getpid()],
                "rabbitmq (whole node, shared)": pids_named("beam.smp"),
            }
            pg_admin = await asyncpg.connect(infra.PG_ADMIN_URL)
            stop_sampling = asyncio.Event()
            sampler = asyncio.create_task(
                sample_loop(
                    stop_sampling,
                    cpu,
                    queues,
                    groups,
                    pg_admin,
                    [url.rsplit("/", 1)[1] for url in stack.databases.values()],
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
            load_task = asyncio.create_task(generate(client, population, plan))
            await follow(load_task, deliveries, population, options.drain_timeout)
            load = load_task.result()
            await settle_ledger(stack.databases["notification-router"], load, workload)
            stop_sampling.set()
            await sampler
            await queues.close()
            await pg_admin.close()
            profiles = await profiling
            deliveries.poll()
            ledger_keys, delivery_status = await read_ledger(stack.databases["notification-router"])

        result = check(
            population=population,
            posted=load.posted,
            pushes=deliveries.pushes,
            emails=deliveries.emails,
            ledger_keys=ledger_keys,
            email_notification_id=lambda message_id, recipient_id: notification_id_for(
                message_id=message_id, recipient_id=recipient_id, channel=Channel.EMAIL
            ),
        )
        accepted = [message.accepted_at for message in load.posted]
        first_accept = min(accepted, default=load.started_at)
        ours = sum(account.seconds for account in cpu.accounts.values())
        wall = max(cpu.wall, 1e-9)
        document: dict[str, Any] = {
            "title": f"{options.command}  ({stamp})",
            "command": options.command,
            "started_at": stamp,
            "machine": {
                "cpus": os.cpu_count(),
                "processor": _processor(),
                "python": platform.python_version(),
                "load_average_at_start": list(os.getloadavg()),
            },
            "config": {
                "count": options.count,
                "duration": options.duration,
                "rate_notifications_per_s": options.rate,
                "rate_messages_per_s": round(messages_per_second, 2),
                "rooms": options.rooms,
                "room_size": options.room_size,
                "recipients_per_message": workload.recipients_per_message,
                "users": workload.users,
                "email_users": population.email_users,
                "connections": options.connections,
                "service_env": options.env,
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
                "push": latency_summary(latency for _, latency in result.push_latency),
                "email": latency_summary(latency for _, latency in result.email_latency),
            },
            "cpu": {
                "wall_seconds": round(wall, 2),
                "processes": {
                    name: {
                        "seconds": round(account.seconds, 2),
                        "percent_of_one_core": round(100 * account.seconds / wall, 1),
                    }
                    for name, account in cpu.accounts.items()
                },
                "machine_busy_percent": round(100 * cpu.machine_busy / wall, 1),
                "others_percent": round(100 * max(0.0, cpu.machine_busy - ours) / wall, 1),
            },
            "queues": {
                "max_ready": queues.depths.max(),
            },
            "checker": {
                "lost": result.lost,
                "duplicates": result.duplicates,
                "duplicates_by_kind": dict(result.duplicates_by_kind),
                "unexpected": result.unexpected,
                "lost_by_part": dict(result.lost_by_part),
                "lost_message_ids": result.lost_message_ids,
                "router_delivery_status": delivery_status,
            },
            "profile": profiles,
            "series": series(
                start=load.started_at,
                accepted_at=accepted,
                recipients_per_message=workload.recipients_per_message,
                check=result,
                queues=queues.depths,
            ),
        }
    finally:
        _say("stopping the services and removing the vhost and databases")
        exit_codes = await stack.teardown()
    document["service_exit_codes"] = exit_codes
    json_path = options.out / f"{stamp}-{run_id}.json"
    chart_path = options.out / f"{stamp}-{run_id}.png"
    document["chart"] = str(chart_path)
    write_json(document, json_path)
    write_chart(document, chart_path)
    print_table(document)
    _say(f"JSON: {json_path}   chart: {chart_path}   logs: {directory / 'logs'}")
    ok = result.lost == 0 and result.duplicates == 0 and result.unexpected == 0
    if not ok:
        _say("FAILED: the checker found lost, duplicated or unexpected notifications")
    return 0 if ok else 1


async def follow(
    load_task: asyncio.Task[LoadResult],
    deliveries: Deliveries,
    population: Population,
    drain_timeout: float,
) -> None:
    """Report progress while posting; then wait until every owed delivery was accepted, or the
    drain timeout passes (the checker then counts what is missing as lost)."""
    start = time.monotonic()
    last_report = start
    drain_deadline: float | None = None
    while True:
        if load_task.done():
            await asyncio.sleep(SAMPLE_INTERVAL)
        else:
            await asyncio.wait({load_task}, timeout=SAMPLE_INTERVAL)
        deliveries.poll()
        now = time.monotonic()
        if load_task.done():
            load = load_task.result()
            pushes, emails = owed(population, load)
            if drain_deadline is None:
                drain_deadline = now + drain_timeout
                _say(f"posted {len(load.posted)} messages; draining")
            if len(deliveries.pushes) >= pushes and len(deliveries.emails) >= emails:
                return
            if now > drain_deadline:
                _say("drain timeout: what is missing now counts as lost")
                return
        if now - last_report >= PROGRESS_INTERVAL:
            last_report = now
            _say(
                f"t={now - start:5.1f} s  pushes accepted {len(deliveries.pushes)}  "
                f"e-mails accepted {len(deliveries.emails)}"
            )


async def settle_ledger(router_db: str, load: LoadResult, workload: Workload) -> None:
    """The ledger row is written before the jobs are published, so it is there by now; a short
    wait covers a router that commits rows and publishes jobs in a different order."""
    expected = len(load.posted) * workload.recipients_per_message
    connection = await asyncpg.connect(_pg(router_db))
    try:

        async def complete() -> bool:
            count = await connection.fetchval("SELECT count(*) FROM notifications")
            return bool(count >= expected)

        with contextlib.suppress(TimeoutError):
            await infra.wait_until(complete, timeout=15, interval=0.2)
    finally:
        await connection.close()


async def read_ledger(
    router_db: str,
) -> tuple[list[tuple[uuid.UUID, uuid.UUID]], dict[str, int]]:
    """Every (message_id, recipient_id) of the ledger, and its deliveries counted by status."""
    connection = await asyncpg.connect(_pg(router_db))
    try:
        rows = await connection.fetch("SELECT message_id, recipient_id FROM notifications")
        try:
            statuses = await connection.fetch(
                "SELECT channel || ':' || status AS key, count(*) AS n"
                " FROM notification_deliveries GROUP BY 1"
            )
        except asyncpg.PostgresError:  # the table is the router's to change
            statuses = []
    finally:
        await connection.close()
    return (
        [(row["message_id"], row["recipient_id"]) for row in rows],
        {row["key"]: row["n"] for row in statuses},
    )


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


def _processor() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()
