"""Docker cannot run on these machines, so check what can be checked of compose.yaml and the
Dockerfile: the file is valid Compose (the specification's JSON Schema), every service, port and
variable in it exists in the code, and the consumers can be scaled."""

from __future__ import annotations

import importlib
import json
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from pydantic_settings import BaseSettings
from yarl import URL

from herald_shared.broker import RabbitSettings
from scripts.gen_asyncapi import SERVICES
from scripts.gen_definitions import VHOST, dev_password

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
# The Compose Specification's published JSON Schema, checked in unchanged (where it comes from:
# compose_spec/README.md).
COMPOSE_SCHEMA = Path(__file__).parent / "compose_spec" / "compose-spec.json"
OBSERVABILITY = {"prometheus", "grafana"}


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
    observability = set(COMPOSE["services"]) - default
    assert observability == OBSERVABILITY
    for name in observability:
        assert COMPOSE["services"][name]["profiles"] == ["observability"]


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


@pytest.mark.parametrize("service", sorted(set(SERVICES) - {"message-service"}))
def test_consumers_can_be_scaled(service: str) -> None:
    definition = COMPOSE["services"][service]
    assert "container_name" not in definition
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
