"""What each service's image holds, checked without Docker: its dependency closure, computed from
uv.lock the way `uv sync --package <service> --no-dev` (deploy/Dockerfile) installs it, and the
Dockerfile's shape (multi-stage, non-root, health check)."""

from __future__ import annotations

import re
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from scripts.gen_asyncapi import SERVICES
from tests.contract.test_compose import COMPOSE, _settings_class

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "uv.lock"
DOCKERFILE = (ROOT / "deploy" / "Dockerfile").read_text()

# What a service's image must not carry: the web framework and ORM of message-service, the
# template engine of email-sender, the HTTP/2 stack of push-sender, test tools (message-service
# has httpx and PyJWT of its own: OpenID Connect access tokens and their JWKS).
# push-sender keeps asyncpg: its delivery ledger lives in PostgreSQL (like every service's).
ABSENT: dict[str, set[str]] = {
    "message-service": {"jinja2", "aiosmtplib", "h2", "pytest"},
    "notification-router": {"fastapi", "starlette", "sqlmodel", "jinja2", "httpx", "h2", "pyjwt"},
    "push-sender": {"fastapi", "starlette", "sqlmodel", "jinja2", "aiosmtplib", "pytest"},
    "email-sender": {"fastapi", "starlette", "sqlmodel", "httpx", "h2", "pyjwt", "cryptography"},
}
# And what it needs, so that the closure computation cannot pass by finding nothing.
PRESENT: dict[str, set[str]] = {
    "message-service": {
        "fastapi",
        "sqlmodel",
        "faststream",
        "asyncpg",
        "herald-shared",
        "pyjwt",
        "argon2-cffi",
    },
    "notification-router": {"faststream", "asyncpg", "herald-shared"},
    "push-sender": {"httpx", "h2", "pyjwt", "faststream", "asyncpg", "herald-shared"},
    "email-sender": {"aiosmtplib", "jinja2", "faststream", "asyncpg", "herald-shared"},
}


@cache
def _packages() -> dict[str, dict[str, Any]]:
    if not LOCK.exists():
        pytest.fail("uv.lock missing: run `uv lock` (or `uv sync`) first")
    lock = tomllib.loads(LOCK.read_text())
    return {package["name"]: package for package in lock["package"]}


def closure(root: str) -> set[str]:
    """Every package `uv sync --package root --no-dev` installs: runtime dependencies,
    transitively, with the optional dependencies of the extras requested on the way. Markers are
    ignored, so a platform-specific dependency counts too (an over-approximation, which is the
    safe side for "must not contain")."""
    packages = _packages()
    seen: set[tuple[str, tuple[str, ...]]] = set()
    pending: list[tuple[str, tuple[str, ...]]] = [(root, ())]
    while pending:
        name, extras = pending.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        package = packages[name]
        dependencies = list(package.get("dependencies", []))
        for extra in extras:
            dependencies += package.get("optional-dependencies", {}).get(extra, [])
        pending.extend(
            (dependency["name"], tuple(sorted(dependency.get("extra", ()))))
            for dependency in dependencies
        )
    return {name for name, _ in seen}


def test_closure_follows_extras() -> None:
    # faststream[rabbit] brings aio-pika only through its extra.
    assert {"faststream", "aio-pika", "aiormq"} <= closure("herald-shared")
    assert "fastapi" not in closure("herald-shared")


@pytest.mark.parametrize("service", SERVICES)
def test_image_holds_only_the_service_dependency_closure(service: str) -> None:
    packages = closure(service)
    assert PRESENT[service] <= packages
    assert packages & ABSENT[service] == set()
    other_services = set(SERVICES) - {service}
    assert packages & other_services == set(), "a service's image holds another service"


def test_dockerfile_is_multi_stage_parametrised_and_installs_one_closure() -> None:
    assert len(re.findall(r"^FROM ", DOCKERFILE, flags=re.MULTILINE)) == 2
    assert "ARG SERVICE" in DOCKERFILE
    instructions = "\n".join(
        line for line in DOCKERFILE.splitlines() if not line.lstrip().startswith("#")
    )
    installs = re.findall(r"uv sync ([^\n]+)", instructions)
    assert installs
    for install in installs:
        assert "--frozen" in install
        assert "--no-dev" in install
        assert '--package "${SERVICE}"' in install
    assert "COPY --from=builder --chown=herald:herald /app/.venv /app/.venv" in DOCKERFILE


def test_image_runs_as_a_non_root_user() -> None:
    users = re.findall(r"^USER (\S+)", DOCKERFILE, flags=re.MULTILINE)
    assert users
    assert users[-1] not in {"root", "0"}
    assert re.search(rf"useradd [^\n]*\b{users[-1]}\b", DOCKERFILE)


def test_health_check_asks_readiness_on_each_service_port() -> None:
    healthcheck = DOCKERFILE.split("HEALTHCHECK", 1)[1].split("\nCMD", 1)[0]
    assert "/health/ready" in healthcheck
    defaults = dict(re.findall(r"'([a-z-]+)': '(\d+)'", healthcheck))
    assert set(defaults) == set(SERVICES)
    for service, port in defaults.items():
        assert _settings_class(service).model_fields["port"].default == int(port)
        assert COMPOSE["services"][service]["environment"]["PORT"] == port
