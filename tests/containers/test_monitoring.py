"""A real Prometheus (Debian's 2.42) scrapes the four containers with the shipped alert rules:
every query of the Grafana dashboard returns data, and forcing two conditions (the router stopped,
a poisoned queue) fires the matching alerts within their `for:` windows, which reach a real
Alertmanager (Debian's 0.25).

The test's Prometheus differs from deploy/prometheus/prometheus.yml only where this machine
requires it: static targets on 127.0.0.1 (the stack is on the host network; the shipped file
discovers compose's replicas through Docker's DNS), no RabbitMQ jobs (the machine's broker has no
Prometheus plugin) and a scrape and evaluation interval of 1 s instead of 15 s, so that an
alert fires within a second or two of its `for:` (unchanged) running out.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from herald_shared.topology import EMAIL_SEND, MESSAGE_NOTIFICATIONS, PUSH_NOTIFICATIONS, PUSH_SEND
from tests.containers.conftest import ROOT, Stack, running_stack, wait_for
from tests.containers.test_stack import _post, _pushes, _room
from tests.support.faults import emit, publish_raw
from tests.support.processes import free_port

PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "herald.json"
# Grafana's range variable, as the dashboard's queries use it: with a 1 s scrape, one minute
# holds enough samples for every rate.
RATE_INTERVAL = "1m"


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen[bytes]
    log: Path
    alertmanager: str

    def get(self, path: str, **params: str) -> Any:
        response = httpx.get(f"{self.url}{path}", params=params, timeout=10)
        response.raise_for_status()
        body = response.json()
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expression: str) -> list[dict[str, Any]]:
        data = self.get("/api/v1/query", query=expression)
        result: list[dict[str, Any]] = data["result"]
        return result

    def alerts(self, name: str, state: str = "firing") -> list[dict[str, Any]]:
        return [
            alert
            for alert in self.get("/api/v1/alerts")["alerts"]
            if alert["labels"]["alertname"] == name and alert["state"] == state
        ]

    def alertmanager_alerts(self) -> set[tuple[str, str]]:
        """(alertname, queue or job) of every alert the Alertmanager holds."""
        response = httpx.get(f"{self.alertmanager}/api/v2/alerts", timeout=10)
        response.raise_for_status()
        return {
            (alert["labels"]["alertname"], alert["labels"].get("queue") or alert["labels"]["job"])
            for alert in response.json()
        }


@contextlib.contextmanager
def process(command: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as output:
        started = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    try:
        yield started
    finally:
        started.terminate()
        try:
            started.wait(30)
        except subprocess.TimeoutExpired:
            started.kill()
            started.wait()


def prometheus_config(stack: Stack, alertmanager: str) -> dict[str, Any]:
    shipped = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    jobs = []
    for job in shipped["scrape_configs"]:
        if job["job_name"] not in stack.ports:
            continue  # RabbitMQ's own plugin: not on the machine's broker
        targets = [f"127.0.0.1:{port}" for port in stack.ports[job["job_name"]]]
        jobs.append({"job_name": job["job_name"], "static_configs": [{"targets": targets}]})
    assert {job["job_name"] for job in jobs} == set(stack.ports)
    return {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(PROMETHEUS_DIR / "alerts.yml")],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]},
        "scrape_configs": jobs,
    }


# Alertmanager: every alert to a receiver that sends nothing (the test reads its API).
ALERTMANAGER_CONFIG = {
    "route": {
        "receiver": "nobody",
        "group_wait": "1s",
        "group_interval": "1s",
        "repeat_interval": "1h",
    },
    "receivers": [{"name": "nobody"}],
}


@pytest.fixture(scope="module")
def stack(images: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("stack"), replicas=1) as running:
        yield running


@pytest.fixture(scope="module")
def prometheus(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    binary, promtool = shutil.which("prometheus"), shutil.which("promtool")
    alertmanager = shutil.which("prometheus-alertmanager")
    if binary is None or promtool is None or alertmanager is None:
        message = "prometheus or alertmanager not installed: run scripts/containers install"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    directory = tmp_path_factory.mktemp("prometheus")
    alertmanager_port, port = free_port(), free_port()
    alertmanager_config = directory / "alertmanager.yml"
    alertmanager_config.write_text(yaml.safe_dump(ALERTMANAGER_CONFIG))
    config = directory / "prometheus.yml"
    config.write_text(yaml.safe_dump(prometheus_config(stack, f"127.0.0.1:{alertmanager_port}")))
    checked = subprocess.run(
        [promtool, "check", "config", str(config)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    alertmanager_command = [
        alertmanager,
        f"--config.file={alertmanager_config}",
        f"--storage.path={directory / 'alertmanager'}",
        f"--web.listen-address=127.0.0.1:{alertmanager_port}",
        "--cluster.listen-address=",  # one instance, no gossip port
    ]
    prometheus_command = [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={directory / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with (
        process(alertmanager_command, directory / "alertmanager.log"),
        process(prometheus_command, directory / "prometheus.log") as started,
    ):
        server = Prometheus(
            f"http://127.0.0.1:{port}",
            started,
            directory / "prometheus.log",
            f"http://127.0.0.1:{alertmanager_port}",
        )

        def every_target_up() -> bool:
            try:
                targets = server.get("/api/v1/targets")["activeTargets"]
                alertmanagers = server.get("/api/v1/alertmanagers")["activeAlertmanagers"]
            except httpx.HTTPError:
                return False
            expected = sum(len(ports) for ports in stack.ports.values())
            return (
                len(targets) == expected
                and all(t["health"] == "up" for t in targets)
                and len(alertmanagers) == 1
            )

        wait_for(every_target_up, timeout=60)
        yield server


def dashboard_expressions() -> list[str]:
    def panels(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
        for panel in node.get("panels", []):
            yield panel
            yield from panels(panel)

    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [
        target["expr"]
        for panel in panels(dashboard)
        for target in panel.get("targets", [])
        if target.get("expr")
    ]
    assert expressions
    return expressions


def test_every_dashboard_query_returns_data(stack: Stack, prometheus: Prometheus) -> None:
    """Traffic that exercises each panel: a delivered message (latency, providers), a push that
    fails once (errors, retries) and poison for email-sender (dead letters); then every query
    answers."""
    with httpx.Client(base_url=stack.api, timeout=10) as client:
        alice, bob, carol, room = _room(client)
        stack.fcm.fail(f"phone-{bob['username']}", 503, "UNAVAILABLE", times=1)
        _post(client, alice, room, "@room dashboards")
    phones = {f"phone-{user['username']}" for user in (bob, carol)}
    # The message's two pushes (Bob's after one failure), besides the invitations'.
    wait_for(
        lambda: [body for _, body in _pushes(stack, phones)].count("@room dashboards") >= 2,
        timeout=60,
    )
    asyncio.run(
        publish_raw(
            stack.rabbit_url,
            EMAIL_SEND,
            b"{not json",
            content_type="application/json",
            message_id="poison:containers-dashboard",
        )
    )

    unanswered: dict[str, str] = {}
    for expression in dashboard_expressions():
        query = expression.replace("$__rate_interval", RATE_INTERVAL)
        assert "$" not in query, f"a dashboard variable the test does not know: {query}"
        try:
            wait_for(functools.partial(prometheus.query, query), timeout=30, interval=1)
        except TimeoutError:
            unanswered[expression] = "no data within 30 s"
    assert unanswered == {}, "\n".join(unanswered)


@pytest.mark.timeout(600)
def test_a_stopped_router_and_a_poisoned_queue_fire_their_alerts(
    stack: Stack, prometheus: Prometheus, request: pytest.FixtureRequest
) -> None:
    down_for = _for_seconds("HeraldServiceDown")
    no_consumer_for = _for_seconds("HeraldWorkQueueWithoutConsumers")
    dead_letters_for = _for_seconds("HeraldDeadLettersPresent")

    # Each condition is forced between two instants: it cannot hold before the first, and holds
    # by the second (the router stops answering while `compose stop` still waits for it to exit).
    poison_began = time.monotonic()
    asyncio.run(
        publish_raw(
            stack.rabbit_url,
            PUSH_SEND,
            b"{not json",
            content_type="application/json",
            message_id="poison:containers",
        )
    )
    poison_done = time.monotonic()
    stop_began = time.monotonic()
    stack.compose("stop", *stack.instances("notification-router"))
    stop_done = time.monotonic()

    fired: dict[str, float] = {}

    def both_fired() -> bool:
        dead = prometheus.alerts("HeraldDeadLettersPresent")
        if "dead letters" not in fired and any(
            alert["labels"]["queue"] == PUSH_NOTIFICATIONS.dead_letter_queue.name for alert in dead
        ):
            fired["dead letters"] = time.monotonic()
        down = prometheus.alerts("HeraldServiceDown")
        if "router down" not in fired and any(
            alert["labels"]["job"] == "notification-router" for alert in down
        ):
            fired["router down"] = time.monotonic()
        # message-service, whose events feed the router's queue, still reports its consumers.
        unconsumed = prometheus.alerts("HeraldWorkQueueWithoutConsumers")
        if "no consumer" not in fired and any(
            alert["labels"]["queue"] == MESSAGE_NOTIFICATIONS.name for alert in unconsumed
        ):
            fired["no consumer"] = time.monotonic()
        return len(fired) == 3

    try:
        wait_for(both_fired, timeout=max(down_for, no_consumer_for) + 60, interval=0.5)
    except TimeoutError:
        # Which alert is missing, and what Prometheus holds (pending ones included).
        held = [
            (alert["labels"], alert["state"], alert.get("activeAt"))
            for alert in prometheus.get("/api/v1/alerts")["alerts"]
        ]
        pytest.fail(f"only {sorted(fired)} fired in time; Prometheus holds: {held}")
    # Prometheus sent both to the Alertmanager.
    wait_for(
        lambda: (
            {
                ("HeraldDeadLettersPresent", PUSH_NOTIFICATIONS.dead_letter_queue.name),
                ("HeraldServiceDown", "notification-router"),
                ("HeraldWorkQueueWithoutConsumers", MESSAGE_NOTIFICATIONS.name),
            }
            <= prometheus.alertmanager_alerts()
        ),
        timeout=30,
    )
    dead_letters = (fired["dead letters"] - poison_began, fired["dead letters"] - poison_done)
    router_down = (fired["router down"] - stop_began, fired["router down"] - stop_done)
    no_consumer = (fired["no consumer"] - stop_began, fired["no consumer"] - stop_done)
    # In CI's output (as the fault tests' lines): the figures docs/operations.md quotes, from
    # the start of the forcing step (the poison's publish, `compose stop`) and from its end.
    emit(
        request.config,
        f"CONTAINERS alerts dead_letters_for={dead_letters_for:.0f}s "
        f"dead_letters_fired={dead_letters[0]:.1f}s/{dead_letters[1]:.1f}s "
        f"router_down_for={down_for:.0f}s "
        f"router_down_fired={router_down[0]:.1f}s/{router_down[1]:.1f}s "
        f"no_consumer_for={no_consumer_for:.0f}s "
        f"no_consumer_fired={no_consumer[0]:.1f}s/{no_consumer[1]:.1f}s "
        f"stop_took={stop_done - stop_began:.1f}s",
        request.node,
    )
    # Not before its `for:` ran out, and within a few scrape and evaluation intervals after.
    assert dead_letters[0] >= dead_letters_for, dead_letters
    assert dead_letters[1] <= dead_letters_for + 20, dead_letters
    assert router_down[0] >= down_for, router_down
    assert router_down[1] <= down_for + 20, router_down
    assert no_consumer[0] >= no_consumer_for, no_consumer
    assert no_consumer[1] <= no_consumer_for + 20, no_consumer


def _for_seconds(alert: str) -> float:
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == alert:
                match = re.fullmatch(r"(\d+)([sm])", rule["for"])
                assert match is not None, rule["for"]
                return int(match[1]) * (60 if match[2] == "m" else 1)
    raise AssertionError(f"no alert {alert}")
