"""The dashboard, the alert rules and the Prometheus configuration in `deploy/` against the code:
every series they query is one a service exports on `/metrics`, the rules have the shape
Prometheus loads (`promtool` is not available here: structure and metric names are checked), and
the scrape targets are the services' ports."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from email_sender.app import create_app as create_email_app
from email_sender.settings import Settings as EmailSettings
from message_service.app import create_app as create_message_app
from message_service.settings import Settings as MessageSettings
from notification_router.app import create_app as create_router_app
from notification_router.settings import Settings as RouterSettings
from push_sender.app import create_app as create_push_app
from push_sender.settings import Settings as PushSettings
from tests.unit.email_sender.support import unit_settings as email_unit_settings
from tests.unit.push_sender.support import unit_settings as push_unit_settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "herald.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "herald.yml"

SERVICES = ("message-service", "notification-router", "push-sender", "email-sender")
# Series Prometheus itself adds to every scrape.
PROMETHEUS_SERIES = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})

# The list: each must be on the dashboard.
REQUIRED_ON_DASHBOARD = (
    "herald_messages_published_total",
    "herald_messages_processed_total",
    "herald_queue_depth",
    "herald_message_processing_seconds_bucket",
    "herald_message_errors_total",
    "herald_message_retries_total",
    "herald_messages_dead_lettered_total",
    "herald_end_to_end_latency_seconds_bucket",
    "herald_queue_consumers",
    "herald_consumers",
    "herald_push_breaker_state",
)
REQUIRED_ALERTS = (
    "HeraldWorkQueueWithoutConsumers",
    "HeraldDeadLettersPresent",
    "HeraldQueueSlowToDrain",
    "HeraldEndToEndLatencyHigh",
    "HeraldPushBreakerOpen",
)

SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gauge": ("",),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
}


def series_of_exposition(text: str) -> set[str]:
    """The sample names a `/metrics` text can carry, from its `# TYPE` lines (a labelled series
    with no sample yet still declares its family)."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            base = name.removesuffix("_total") if kind == "counter" else name
            names.update(base + suffix for suffix in SUFFIXES.get(kind, ("",)))
    return names


async def scrape(app: Any) -> str:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    return response.text


@pytest.fixture
async def exported(tmp_path: Path) -> dict[str, set[str]]:
    """Each service's series, from its own `/metrics`, built by its own app factory (not
    started: nothing connects)."""
    sqlite = f"sqlite+aiosqlite:///{tmp_path / 'service.db'}"
    apps = {
        "message-service": create_message_app(MessageSettings(database_url=sqlite)),
        "notification-router": create_router_app(RouterSettings(database_url=sqlite)),
        "push-sender": create_push_app(push_unit_settings(tmp_path, sqlite)),
        "email-sender": create_email_app(email_unit_settings(tmp_path, sqlite)),
    }
    return {name: series_of_exposition(await scrape(app)) for name, app in apps.items()}


# --- PromQL: the metric names an expression reads -------------------------------------------

KEYWORDS = frozenset(
    [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "inf",
        "nan",
    ]
)


def metric_names(expr: str) -> set[str]:
    """Identifiers of `expr` that are metric names: not a function (followed by `(`), not a
    keyword, not a label inside `{...}` or a `by (...)` list, not in a string or a range."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\$\w+", "", text)  # Grafana variables such as $__rate_interval
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        name = match.group(0)
        following = text[match.end() :].lstrip()
        if following.startswith("(") or name.lower() in KEYWORDS:
            continue
        if re.fullmatch(r"\d+[smhdwy]", name):
            continue
        names.add(name)
    return names


def test_metric_names_are_found_in_promql() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (channel, le) (rate(herald_x_seconds_bucket{a="b"}'
        "[$__rate_interval]))) / clamp_min(sum without (job) (herald_y_total), 0.001) > 30 "
        "and on (queue) up == 0"
    )
    assert metric_names(expr) == {"herald_x_seconds_bucket", "herald_y_total", "up"}


def dashboard_exprs() -> Iterator[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


# --- the checks -----------------------------------------------------------------------------


def test_every_series_every_service_shares_is_exported_by_all_four(
    exported: dict[str, set[str]],
) -> None:
    shared = {
        "herald_messages_published_total",
        "herald_messages_processed_total",
        "herald_message_processing_seconds_bucket",
        "herald_event_loop_lag_seconds_bucket",
        "herald_message_errors_total",
        "herald_message_retries_total",
        "herald_message_deferrals_total",
        "herald_messages_dead_lettered_total",
        "herald_queue_depth",
        "herald_queue_consumers",
        "herald_consumers",
    }
    for service in SERVICES:
        assert shared <= exported[service], service
    assert "herald_end_to_end_latency_seconds_bucket" in exported["notification-router"]
    assert "herald_push_breaker_state" in exported["push-sender"]
    for sender in ("push-sender", "email-sender"):
        assert {"herald_sender_jobs_held", "herald_sender_deliveries_waiting"} <= exported[sender]
    # FastStream's own middleware is not there to count everything a second time.
    assert not any(name.startswith("faststream_") for names in exported.values() for name in names)


def test_every_series_of_the_dashboard_is_exported(exported: dict[str, set[str]]) -> None:
    known = set().union(*exported.values()) | PROMETHEUS_SERIES
    used: set[str] = set()
    for title, expr in dashboard_exprs():
        names = metric_names(expr)
        assert names, f"{title}: no metric in {expr!r}"
        assert names <= known, f"{title}: {sorted(names - known)} exported by no service"
        used |= names
    assert set(REQUIRED_ON_DASHBOARD) <= used, sorted(set(REQUIRED_ON_DASHBOARD) - used)


def test_every_series_of_the_alerts_is_exported(exported: dict[str, set[str]]) -> None:
    known = set().union(*exported.values()) | PROMETHEUS_SERIES
    for rule in alert_rules():
        names = metric_names(rule["expr"])
        assert names, rule["alert"]
        assert names <= known, f"{rule['alert']}: {sorted(names - known)} exported by no service"


def test_alerts_parse_as_prometheus_rule_groups() -> None:
    document = yaml.safe_load(ALERTS.read_text())
    assert set(document) == {"groups"}
    group_names = [group["name"] for group in document["groups"]]
    assert len(group_names) == len(set(group_names)), "group names must be unique"
    for group in document["groups"]:
        assert set(group) <= {"name", "interval", "limit", "rules"}
        assert group["rules"], group["name"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", rule["alert"])
            assert isinstance(rule["expr"], str)
            assert rule["expr"].count("(") == rule["expr"].count(")"), rule["alert"]
            assert re.fullmatch(r"(\d+[smhdwy])+", rule["for"]), rule["alert"]
            assert rule["labels"]["severity"] in {"warning", "critical"}
            assert rule["annotations"]["summary"]
            assert all(isinstance(value, str) for value in rule["annotations"].values())
    names = [rule["alert"] for rule in alert_rules()]
    assert set(REQUIRED_ALERTS) <= set(names)
    assert len(names) == len(set(names))


def test_dashboard_is_a_provisionable_grafana_dashboard() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    datasource = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    assert dashboard["uid"]
    assert dashboard["title"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
            assert panel["targets"], panel["title"]
    quantiles = [expr for _, expr in dashboard_exprs() if "histogram_quantile" in expr]
    assert all("_bucket" in expr and "le" in expr for expr in quantiles)
    rates = [expr for _, expr in dashboard_exprs() if "_total" in expr]
    assert all("rate(" in expr or "increase(" in expr for expr in rates)
    providers = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"]
    assert [provider["type"] for provider in providers] == ["file"]
    assert providers[0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_prometheus_scrapes_each_service_on_its_port_and_rabbitmq() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    ports = {
        "message-service": MessageSettings().port,
        "notification-router": RouterSettings().port,
        "push-sender": PushSettings.model_fields["port"].default,
        "email-sender": EmailSettings.model_fields["port"].default,
    }
    for service, port in ports.items():
        [discovery] = jobs[service]["dns_sd_configs"]
        assert (discovery["names"], discovery["type"], discovery["port"]) == ([service], "A", port)
        assert jobs[service].get("metrics_path", "/metrics") == "/metrics"
    assert jobs["rabbitmq"]["static_configs"] == [{"targets": ["rabbitmq:15692"]}]
