"""`scripts/container_stack.py` without podman: the Compose interpolation it applies to what it
copies from compose.yaml, and the env files it renders from it (tests/containers runs them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from yarl import URL

from herald_shared.broker import RabbitSettings
from scripts.container_stack import (
    SERVICES,
    InterpolationError,
    interpolate,
    interpolated,
    render,
    service_environment,
)

ENVIRON = {"SET": "x", "EMPTY": ""}


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("plain", "plain"),
        ("${SET}/$SET/${EMPTY}/${UNSET}/$UNSET", "x/x///"),
        ("$SET.suffix/${SET}suffix/$SET-1", "x.suffix/xsuffix/x-1"),
        # Defaults: with the colon, for unset or empty; without, for unset only.
        ("${SET:-d}/${EMPTY:-d}/${UNSET:-d}", "x/d/d"),
        ("${SET-d}/${EMPTY-d}/${UNSET-d}", "x//d"),
        # Alternatives: with the colon, when set and not empty; without, when set at all.
        ("${SET:+a}/${EMPTY:+a}/${UNSET:+a}", "a//"),
        ("${SET+a}/${EMPTY+a}/${UNSET+a}", "a/a/"),
        ("${SET:?m}/${EMPTY?m}", "x/"),
        # $$ is one dollar sign, never the start of a variable.
        ("$$/$${SET}/$$SET/a$$b", "$/${SET}/$SET/a$b"),
        # A default or alternative is interpolated in turn; `}` inside it closes the nested one.
        ("${UNSET:-${SET}}/${SET:+<${SET}>}/${UNSET:-${ALSO_UNSET:-deep}}", "x/<x>/deep"),
        ("${UNSET:-a,b c:d}", "a,b c:d"),
    ],
)
def test_interpolation_reads_compose_forms(template: str, expected: str) -> None:
    assert interpolate(template, ENVIRON) == expected


@pytest.mark.parametrize(
    ("template", "error"),
    [
        ("${EMPTY:?needs a value}", "EMPTY is missing a value: needs a value"),
        ("${UNSET?needs ${SET}}", "UNSET is missing a value: needs x"),
        ("cost: 5$", "lone"),
        ("$ {SET}", "lone"),
        ("${}", "invalid template"),
        ("${SET%x}", "invalid template"),
        ("${SET", "unclosed"),
    ],
)
def test_interpolation_refuses_what_compose_refuses(template: str, error: str) -> None:
    with pytest.raises(InterpolationError, match=error):
        interpolate(template, ENVIRON)


def test_interpolated_walks_a_loaded_document() -> None:
    document = {"a": ["${SET}", 1, True, None], "b": {"c": "${UNSET-d}"}}
    assert interpolated(document, ENVIRON) == {"a": ["x", 1, True, None], "b": {"c": "d"}}


def test_a_service_environment_as_compose_passes_it() -> None:
    definition = {
        "environment": {
            "KEPT": "${SET}",
            # Empty after interpolation: passed, empty (the services read an empty value as unset).
            "BLANK": "${SET:+}${EMPTY:+on}",
            "FROM_SHELL": None,
            "NOT_IN_SHELL": None,
            # Overridden by the spec: never interpolated, so its `:?` does not fire.
            "SECRET": "${UNSET:?required}",
            "HOST": "dropped",
            "PORT": 8000,
        }
    }
    environ = {**ENVIRON, "FROM_SHELL": "shell"}
    assert service_environment(definition, {"SECRET": "s3", "EXTRA": 1}, environ) == {
        "KEPT": "x",
        "BLANK": "",
        "FROM_SHELL": "shell",
        "PORT": "8000",
        "SECRET": "s3",
        "EXTRA": "1",
    }
    with pytest.raises(InterpolationError, match="UNSET is missing a value: required"):
        service_environment(definition, {}, environ)


def _spec() -> dict[str, Any]:
    env = {"RABBITMQ_URL": "amqp://u:p@127.0.0.1:5672/v", "UNSUBSCRIBE_SECRET": "s" * 32}
    return {
        "project": "herald-ct-test",
        "services": {
            service: {"ports": [9000 + number], "env": dict(env)}
            for number, service in enumerate(SERVICES)
        },
    }


def env_files(directory: Path) -> dict[str, dict[str, str]]:
    """Each rendered instance's variables, read back as podman reads an env file."""
    return {
        path.stem: dict(line.split("=", 1) for line in path.read_text().splitlines())
        for path in sorted((directory / "env").glob("*.env"))
    }


def test_the_rendered_env_files_hold_no_compose_variable(tmp_path: Path) -> None:
    """An env file is read literally: whatever `$` reached it would reach the service."""
    render(_spec(), tmp_path, environ={})
    rendered = env_files(tmp_path)
    assert set(rendered) == set(SERVICES)
    for service, environment in rendered.items():
        assert not [key for key, value in environment.items() if "$" in value], service
        assert environment["RABBITMQ_URL"] == "amqp://u:p@127.0.0.1:5672/v"
        assert environment["HOST"] == "127.0.0.1"


def test_outside_the_cluster_profile_every_service_gets_an_empty_rabbitmq_urls(
    tmp_path: Path,
) -> None:
    """compose.yaml's `RABBITMQ_URLS: ${HERALD_CLUSTER:+...}` without HERALD_CLUSTER: empty, as
    Compose passes it, and the service connects to its RABBITMQ_URL (the bug behind 1950041: the
    template itself reached the services)."""
    spec = _spec()
    render(spec, tmp_path, environ={"UNRELATED": "1"})
    for service, environment in env_files(tmp_path).items():
        assert environment["RABBITMQ_URLS"] == "", service
        settings = RabbitSettings(
            url=environment["RABBITMQ_URL"], urls=environment["RABBITMQ_URLS"]
        )
        assert settings.addresses == (spec["services"][service]["env"]["RABBITMQ_URL"],)


def test_with_herald_cluster_the_services_get_the_three_nodes(tmp_path: Path) -> None:
    spec = _spec()
    with pytest.raises(SystemExit, match="unset HERALD_CLUSTER"):
        render(spec, tmp_path / "refused", environ={"HERALD_CLUSTER": "1"})
    # A spec that leaves the broker to compose.yaml gets the profile's addresses, substituted.
    for wanted in spec["services"].values():
        del wanted["env"]["RABBITMQ_URL"]
    render(spec, tmp_path / "cluster", environ={"HERALD_CLUSTER": "1"})
    for service, environment in env_files(tmp_path / "cluster").items():
        settings = RabbitSettings(
            url=environment["RABBITMQ_URL"], urls=environment["RABBITMQ_URLS"]
        )
        assert [URL(address).host for address in settings.addresses] == [
            "rabbitmq",
            "rabbitmq-2",
            "rabbitmq-3",
        ], service
