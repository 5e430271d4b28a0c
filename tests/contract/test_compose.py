"""Docker cannot run on these machines, so check what can be checked of compose.yaml and the
Dockerfile: every service, port and variable in them exists in the code."""

from __future__ import annotations

import importlib
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic_settings import BaseSettings

from scripts.gen_asyncapi import SERVICES

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())


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


def test_compose_runs_every_service_with_infrastructure() -> None:
    assert set(COMPOSE["services"]) == {"rabbitmq", "postgres", *SERVICES}


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
