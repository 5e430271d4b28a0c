"""Docker cannot run on these machines, so check what can be checked of compose.yaml and the
Dockerfile: the file is valid Compose (the specification's JSON Schema), every service, port and
variable in it exists in the code, the consumers can be scaled, and the `cluster` profile makes
one three-node RabbitMQ cluster that every service is given the addresses of."""

from __future__ import annotations

import importlib
import itertools
import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from pydantic_settings import BaseSettings
from yarl import URL

from herald_shared.broker import RabbitSettings
from scripts.container_stack import interpolated
from scripts.gen_asyncapi import SERVICES
from scripts.gen_definitions import VHOST, dev_password

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
# The Compose Specification's published JSON Schema, checked in unchanged (where it comes from:
# compose_spec/README.md).
COMPOSE_SCHEMA = Path(__file__).parent / "compose_spec" / "compose-spec.json"
OBSERVABILITY = {"prometheus", "grafana"}
CLUSTER = {"rabbitmq-2", "rabbitmq-3", "message-service-replica"}
# The nodes of the cluster profile; `rabbitmq`, the default stack's broker, is the first.
NODES = ("rabbitmq", "rabbitmq-2", "rabbitmq-3")
RABBITMQ_DIR = ROOT / "deploy" / "rabbitmq"
# What compose.yaml reads from the environment in the cluster profile (UNSUBSCRIBE_SECRET is
# required by message-service and email-sender in every stack).
CLUSTER_ENV = {"HERALD_CLUSTER": "1", "UNSUBSCRIBE_SECRET": "s" * 32}
DEFAULT_ENV = {"UNSUBSCRIBE_SECRET": "s" * 32}


def active_services(compose: dict[str, Any], *profiles: str) -> dict[str, Any]:
    """The services `docker compose --profile <each>` runs: those without profiles, and those of
    one of the given profiles."""
    return {
        name: service
        for name, service in compose["services"].items()
        if not service.get("profiles") or set(service["profiles"]) & set(profiles)
    }


def read_conf(path: Path) -> dict[str, str]:
    """A rabbitmq.conf-style file (sysctl format: `key = value`, `#` comments)."""
    settings = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            key, value = (part.strip() for part in line.split("=", 1))
            settings[key] = value
    return settings


def bind_mounts(definition: dict[str, Any]) -> dict[str, str]:
    """A service's bind mounts, host path to container path."""
    return dict(
        volume.rsplit(":", 1)[0].split(":", 1)
        for volume in definition.get("volumes", [])
        if volume.startswith("./")
    )


def rabbit_settings(environment: dict[str, str]) -> RabbitSettings:
    """The broker addresses a service reads from this environment."""
    return RabbitSettings(url=environment["RABBITMQ_URL"], urls=environment.get("RABBITMQ_URLS"))


def _settings_class(service: str) -> type[BaseSettings]:
    module: Any = importlib.import_module(f"{SERVICES[service]}.settings")
    settings_class: type[BaseSettings] = module.Settings
    return settings_class


def _variables(settings_class: type[BaseSettings], prefix: str = "") -> set[str]:
    """The environment variables a settings class reads, nested settings groups included."""
    prefix += str(settings_class.model_config.get("env_prefix", ""))
    names = set()
    for name, field in settings_class.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseSettings):
            names |= _variables(field.annotation)
        else:
            names.add(prefix + (field.alias or name).upper())
    return names


def known_variables(service: str) -> set[str]:
    return _variables(_settings_class(service))


def test_known_variables_include_nested_groups() -> None:
    variables = known_variables("push-sender")
    assert {"PORT", "DATABASE_URL", "RABBITMQ_URL", "PUSH_PROVIDER", "FCM_BASE_URL"} <= variables
    assert "RABBITMQ" not in variables


def test_compose_file_is_valid_against_the_compose_specification() -> None:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = [
        f"{list(error.absolute_path)}: {error.message}" for error in validator.iter_errors(COMPOSE)
    ]
    assert errors == []


def test_schema_validation_catches_a_broken_file() -> None:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    broken = {"services": {"push-sender": {"image": "herald", "portz": ["8002"]}}}
    assert not jsonschema.Draft7Validator(schema).is_valid(broken)


def test_compose_runs_every_service_with_infrastructure() -> None:
    default = {name for name, service in COMPOSE["services"].items() if not service.get("profiles")}
    assert default == {"rabbitmq", "postgres", *SERVICES}
    assert set(COMPOSE["services"]) - default == OBSERVABILITY | CLUSTER
    for name in OBSERVABILITY:
        assert COMPOSE["services"][name]["profiles"] == ["observability"]
    for name in CLUSTER:
        assert COMPOSE["services"][name]["profiles"] == ["cluster"]


@pytest.mark.parametrize(
    ("profiles", "environment"),
    [((), DEFAULT_ENV), (("cluster",), CLUSTER_ENV), (("cluster", "observability"), CLUSTER_ENV)],
)
def test_each_profile_is_valid_against_the_compose_specification(
    profiles: tuple[str, ...], environment: dict[str, str]
) -> None:
    """The file as compose reads it with the profile on: its variables substituted (the
    cluster's addresses in every service), only the profile's services and the default ones."""
    project = interpolated(COMPOSE, environment)
    project["services"] = active_services(project, *profiles)
    validator = jsonschema.Draft7Validator(json.loads(COMPOSE_SCHEMA.read_text()))
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(project)]
    assert errors == []
    for service in project["services"].values():
        for dependency in service.get("depends_on", {}):
            assert dependency in project["services"]  # nothing waits for a service left out


def test_the_cluster_has_three_nodes_of_one_image_sharing_one_cookie() -> None:
    services = active_services(COMPOSE, "cluster")
    nodes = {name for name, service in services.items() if "rabbitmq:" in service.get("image", "")}
    assert nodes == set(NODES)
    definitions = [services[name] for name in NODES]
    assert len({node["image"] for node in definitions}) == 1
    for environment in ({}, {"RABBITMQ_ERLANG_COOKIE": "a-secret-of-mine"}):
        cookies = {
            interpolated(node["environment"]["RABBITMQ_ERLANG_COOKIE"], environment)
            for node in definitions
        }
        assert len(cookies) == 1
        (cookie,) = cookies
        assert cookie == environment.get("RABBITMQ_ERLANG_COOKIE", cookie)
        assert cookie
    # The default, committed in the file, says what it is for.
    assert "dev-only" in interpolated(definitions[0]["environment"]["RABBITMQ_ERLANG_COOKIE"], {})
    for name, node in zip(NODES, definitions, strict=True):
        # The node is rabbit@<hostname>, reached by that name on the compose network, where
        # the service's name resolves.
        assert node["hostname"] == name
        assert "container_name" not in node
        assert node["healthcheck"] == definitions[0]["healthcheck"]


def test_every_node_loads_the_same_configuration_and_definitions() -> None:
    shared = {
        "./deploy/rabbitmq/rabbitmq.conf",
        "./deploy/rabbitmq/replicas.conf",
        "./deploy/rabbitmq/enabled_plugins",
        "./deploy/rabbitmq/definitions.json",
    }
    first = bind_mounts(COMPOSE["services"]["rabbitmq"])
    for name in NODES:
        node_mounts = bind_mounts(COMPOSE["services"][name])
        assert shared <= set(node_mounts), name
        for host_path in shared:
            assert node_mounts[host_path] == first[host_path]
        for host_path, path in node_mounts.items():
            assert (ROOT / host_path).is_file(), host_path
            if host_path.endswith(".conf"):
                assert path.startswith("/etc/rabbitmq/conf.d/")


def test_peer_discovery_names_all_three_nodes_and_they_join_the_first() -> None:
    conf = read_conf(RABBITMQ_DIR / "cluster.conf")
    assert conf.pop("cluster_formation.peer_discovery_backend") == "classic_config"
    listed = {
        value for key, value in conf.items() if key.startswith("cluster_formation.classic_config.")
    }
    assert listed == {f"rabbit@{COMPOSE['services'][name]['hostname']}" for name in NODES}
    first, *joining = NODES
    # The first node forms the cluster: it reads no peer list (it would wait for peers that are
    # not there yet), and the others start once it is healthy, so that they all pick it.
    assert "./deploy/rabbitmq/cluster.conf" not in bind_mounts(COMPOSE["services"][first])
    for name in joining:
        node = COMPOSE["services"][name]
        assert "./deploy/rabbitmq/cluster.conf" in bind_mounts(node)
        assert node["depends_on"] == {first: {"condition": "service_healthy"}}


def test_quorum_queues_grow_to_a_replica_on_each_node() -> None:
    conf = read_conf(RABBITMQ_DIR / "replicas.conf")
    assert conf["quorum_queue.continuous_membership_reconciliation.enabled"] == "true"
    target = int(conf["quorum_queue.continuous_membership_reconciliation.target_group_size"])
    assert target == len(NODES)
    # Continuous membership reconciliation came with RabbitMQ 3.13: not a key of rabbitmq.conf,
    # which 3.10 nodes load too (they refuse unknown keys).
    assert "quorum_queue" not in (RABBITMQ_DIR / "rabbitmq.conf").read_text()
    assert rabbitmq_version() >= (3, 13)
    # Nothing in the definitions holds a queue below that.
    definitions = json.loads((RABBITMQ_DIR / "definitions.json").read_text())
    quorum = [q for q in definitions["queues"] if q["arguments"].get("x-queue-type") == "quorum"]
    assert quorum
    for queue in quorum:
        assert queue["arguments"].get("x-quorum-initial-group-size", target) >= target


@pytest.mark.parametrize("service", [*SERVICES, "message-service-replica"])
def test_services_are_given_the_three_nodes_in_the_cluster_profile(service: str) -> None:
    raw = COMPOSE["services"][service]["environment"]
    single = rabbit_settings(interpolated(raw, DEFAULT_ENV))
    assert single.addresses == (raw["RABBITMQ_URL"],)

    clustered = rabbit_settings(interpolated(raw, CLUSTER_ENV))
    urls = [URL(address) for address in clustered.addresses]
    assert [url.host for url in urls] == [COMPOSE["services"][name]["hostname"] for name in NODES]
    first = URL(raw["RABBITMQ_URL"])
    assert urls[0] == first  # the default stack's node first, as without the cluster
    for url in urls:
        assert (url.scheme, url.user, url.password, url.port, url.path) == (
            first.scheme,
            first.user,
            first.password,
            first.port,
            first.path,
        )


def test_the_message_service_replica_differs_only_by_its_host_port() -> None:
    original = COMPOSE["services"]["message-service"]
    replica = COMPOSE["services"]["message-service-replica"]
    assert {**replica, "profiles": None, "ports": None} == {
        **original,
        "profiles": None,
        "ports": None,
    }
    assert replica["ports"] == ["8000"]


def cluster_command(text: str) -> str:
    """The `docker compose --profile cluster up` command in `text` (Markdown, or compose.yaml's
    comments), its continued lines joined."""
    lines = [line.removeprefix("#").strip() for line in text.splitlines()]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    (command,) = [line for line in joined.splitlines() if "--profile cluster up" in line]
    return " ".join(command.split())


def test_the_documented_command_runs_two_replicas_of_each_service_on_three_nodes() -> None:
    command = cluster_command((ROOT / "docs" / "scaling.md").read_text())
    # compose.yaml's header says the same.
    assert cluster_command((ROOT / "compose.yaml").read_text()) == command
    words = shlex.split(command)
    assert "HERALD_CLUSTER=1" in words
    assert words[words.index("--profile") + 1] == "cluster"
    scale = {
        name: int(count)
        for flag, value in itertools.pairwise(words)
        if flag == "--scale"
        for name, count in [value.split("=")]
    }
    assert set(scale) <= set(SCALABLE)  # what it scales can be (test_consumers_can_be_scaled)
    running = {name: scale.get(name, 1) for name in active_services(COMPOSE, "cluster")}
    assert [running[name] for name in NODES] == [1, 1, 1]
    per_service = {name: running[name] for name in SERVICES}
    per_service["message-service"] += running["message-service-replica"]
    assert per_service == dict.fromkeys(SERVICES, 2)


def test_observability_mounts_the_deployed_configuration() -> None:
    mounts = {
        volume.split(":")[0]
        for name in OBSERVABILITY
        for volume in COMPOSE["services"][name]["volumes"]
    }
    assert mounts == {
        "./deploy/prometheus/prometheus.yml",
        "./deploy/prometheus/alerts.yml",
        "./deploy/grafana/provisioning/",
        "./deploy/grafana/dashboards/",
    }


def rabbitmq_version() -> tuple[int, ...]:
    """The version of compose.yaml's RabbitMQ image tag (`4.2` of `4.2-management-alpine`)."""
    tag = COMPOSE["services"]["rabbitmq"]["image"].split(":", 1)[1]
    return tuple(int(part) for part in tag.split("-", 1)[0].split("."))


def test_the_broker_is_a_supported_rabbitmq_4() -> None:
    """Production runs 4.x. 4.2.6 and 4.3.0 ask for configure on a passive declare, which no
    service has (deploy/rabbitmq/README.md); a floating `4.2` or `4.3` tag is past them."""
    version = rabbitmq_version()
    assert version[0] == 4
    assert version[:3] not in {(4, 2, 6), (4, 3, 0)}


def test_rabbitmq_loads_the_definitions_with_management_and_prometheus() -> None:
    rabbitmq = COMPOSE["services"]["rabbitmq"]
    assert "management" in rabbitmq["image"]
    mounts = dict(volume.rsplit(":", 1)[0].split(":", 1) for volume in rabbitmq["volumes"])
    assert mounts["./deploy/rabbitmq/definitions.json"] == "/etc/rabbitmq/definitions.json"
    config = (ROOT / "deploy" / "rabbitmq" / "rabbitmq.conf").read_text()
    assert "load_definitions = /etc/rabbitmq/definitions.json" in config
    assert mounts["./deploy/rabbitmq/rabbitmq.conf"].startswith("/etc/rabbitmq/conf.d/")
    plugins = (ROOT / "deploy" / "rabbitmq" / "enabled_plugins").read_text()
    assert plugins.strip() == "[rabbitmq_management,rabbitmq_prometheus]."
    assert mounts["./deploy/rabbitmq/enabled_plugins"] == "/etc/rabbitmq/enabled_plugins"
    # No default guest: the definitions bring the users.
    assert "RABBITMQ_DEFAULT_USER" not in rabbitmq.get("environment", {})


@pytest.mark.parametrize("service", SERVICES)
def test_service_uses_its_own_broker_user_and_declares_passively(service: str) -> None:
    environment = COMPOSE["services"][service]["environment"]
    url = URL(environment["RABBITMQ_URL"])
    assert (url.user, url.password, url.path) == (service, dev_password(service), f"/{VHOST}")
    assert RabbitSettings(url=str(url), declare=environment["RABBITMQ_DECLARE"]).declare == (
        "passive"
    )


# Every service but message-service, whose API keeps the fixed host port 8000: its replica is.
SCALABLE = sorted(set(SERVICES) - {"message-service"} | {"message-service-replica"})


@pytest.mark.parametrize("service", SCALABLE)
def test_consumers_can_be_scaled(service: str) -> None:
    definition = COMPOSE["services"][service]
    assert "container_name" not in definition
    assert "hostname" not in definition  # replicas would share it
    # Only a container port: each replica gets its own host port.
    assert all(":" not in str(mapping) for mapping in definition["ports"])
    for volume in definition.get("volumes", []):
        # Shared output sinks only (named volumes), no per-container state directory.
        assert not volume.startswith(("./", "/")), volume


@pytest.mark.parametrize("service", SERVICES)
def test_compose_service_matches_the_code(service: str) -> None:
    definition = COMPOSE["services"][service]
    script = definition["build"]["args"]["SERVICE"]
    pyproject = tomllib.loads((ROOT / "services" / service / "pyproject.toml").read_text())
    assert script in pyproject["project"]["scripts"]

    environment = definition["environment"]
    unknown = set(environment) - known_variables(service) - {"HOST", "PORT"}
    assert unknown == set(), f"{service}: variables no setting reads"
    port = int(environment["PORT"])
    assert _settings_class(service).model_fields["port"].default == port
    assert any(str(mapping).split(":")[-1] == str(port) for mapping in definition["ports"])
    assert environment["DATABASE_URL"].startswith("postgresql://")


def test_dockerfile_copies_every_workspace_member() -> None:
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    for member in ["shared", *(f"services/{service}" for service in SERVICES)]:
        assert f"COPY {member}/pyproject.toml {member}/" in dockerfile


def test_postgres_init_creates_one_database_per_service() -> None:
    init = (ROOT / "deploy" / "postgres" / "init.sql").read_text()
    for service in SERVICES:
        database = COMPOSE["services"][service]["environment"]["DATABASE_URL"].rsplit("/", 1)[1]
        assert f"CREATE DATABASE {database};" in init


def test_every_node_pauses_when_cut_off_from_the_majority() -> None:
    """A node on the minority side of a partition pauses (its clients move to the majority)
    rather than serving on alone: every node of the cluster profile loads that setting."""
    conf = read_conf(RABBITMQ_DIR / "rabbitmq.conf")
    assert conf["cluster_partition_handling"] == "pause_minority"
    for name in NODES:
        assert "./deploy/rabbitmq/rabbitmq.conf" in bind_mounts(COMPOSE["services"][name])
