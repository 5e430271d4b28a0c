"""The four services as containers (podman, `scripts/containers`) on the host network, against a
RabbitMQ vhost and PostgreSQL databases of the test's own and the test's own FCM and SMTP servers
on the host.

The images are built once per test process (`scripts/containers build`, cached by podman: a few
seconds per image when nothing changed; a file lock keeps two processes from building at once),
tagged for this checkout.
Without podman the layer is skipped, except in CI (`CI` set), where `.ci/run` installs it
(`scripts/containers install`) and a missing podman fails the layer.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from scripts.container_stack import SERVICES, instance_names
from tests.fakes.fcm import FakeFcm
from tests.fakes.smtp import FakeSmtp
from tests.support import infra
from tests.support.processes import free_port

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "containers"
CONTAINERS_CONF = ROOT / "deploy" / "podman" / "containers.conf"
BUILD_LOCK = Path(tempfile.gettempdir()) / "herald-containers-build.lock"
# Inside the push-sender container: where the FCM service-account file is mounted.
FCM_CREDENTIALS = "/run/herald/fcm-service-account.json"

T = TypeVar("T")


def podman_env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}


# The images of this checkout: a tag of its own, so that test runs of two checkouts on one machine
# do not replace each other's images (the layers are shared: the second build is a cache hit).
os.environ["HERALD_IMAGE_TAG"] = "test-" + hashlib.sha256(str(ROOT).encode()).hexdigest()[:10]


def podman(
    *args: str, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["podman", *args],
        check=check,
        capture_output=True,
        text=True,
        env=podman_env(),
        timeout=timeout,
    )


def script(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """`scripts/containers ARGS...`; fails the test with its output when it fails."""
    done = subprocess.run(
        [str(SCRIPT), *args], capture_output=True, text=True, env=podman_env(), timeout=timeout
    )
    assert done.returncode == 0, f"scripts/containers {' '.join(args)}:\n{done.stdout}{done.stderr}"
    return done


def wait_for(condition: Callable[[], T], *, timeout: float, interval: float = 0.2) -> T:
    """Poll `condition` until it returns a truthy value; TimeoutError otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout} s")
        time.sleep(interval)


@pytest.fixture(scope="session")
def images() -> None:
    """The four images, built from the working tree (cached)."""
    missing = [tool for tool in ("podman", "mmdebstrap", "runc") if shutil.which(tool) is None]
    if missing:
        message = f"{', '.join(missing)} not installed: run scripts/containers install"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with BUILD_LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _remove_orphans()
        script("build")


def _remove_orphans() -> None:
    """Remove the containers of test stacks whose test process died without tearing them down
    (killed by a timeout, say): they would restart for ever against a deleted vhost."""
    listed = podman(
        "ps", "--all", "--filter", "label=herald.owner-pid", "--format",
        "{{.ID}} {{index .Labels \"herald.owner-pid\"}}",
    ).stdout  # fmt: skip
    orphans = []
    for line in listed.splitlines():
        container, _, owner = line.partition(" ")
        if owner.isdigit() and not _alive(int(owner)):
            orphans.append(container)
    if orphans:
        podman("rm", "--force", "--time", "5", *orphans, timeout=300)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Stack:
    """A running stack: `ports[service]` lists its replicas' ports."""

    directory: Path
    project: str
    ports: dict[str, list[int]]
    databases: dict[str, str]
    rabbit_url: str
    fcm: FakeFcm
    smtp: FakeSmtp

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.ports['message-service'][0]}"

    def urls(self, service: str) -> list[str]:
        return [f"http://127.0.0.1:{port}" for port in self.ports[service]]

    def instances(self, service: str) -> list[str]:
        return instance_names(service, len(self.ports[service]))

    def compose(self, *args: str) -> subprocess.CompletedProcess[str]:
        return script("compose", "--dir", str(self.directory), *args, timeout=300)

    def containers(self) -> dict[str, dict[str, Any]]:
        """Compose service name -> `podman inspect` of its container."""
        names = podman(
            "ps", "--all", "--quiet", "--filter", f"label=io.podman.compose.project={self.project}"
        ).stdout.split()
        inspected: list[dict[str, Any]] = json.loads(podman("inspect", *names).stdout)
        return {item["Config"]["Labels"]["com.docker.compose.service"]: item for item in inspected}

    def ready(self, service: str) -> bool:
        try:
            return all(
                httpx.get(f"{url}/health/ready", timeout=2).status_code == 200
                for url in self.urls(service)
            )
        except httpx.HTTPError:
            return False


@contextlib.contextmanager
def running_stack(tmp: Path, replicas: int) -> Iterator[Stack]:
    """The stack with `replicas` of the router and of each sender, ready; torn down after."""
    rabbit_url = infra.create_vhost()
    databases = {service: asyncio.run(infra.create_database()) for service in SERVICES}
    project = f"herald-ct-{uuid.uuid4().hex[:8]}"
    directory = tmp / project
    directory.mkdir(parents=True)
    try:
        with FakeFcm() as fcm, FakeSmtp() as smtp:
            # Readable by the container's user (uid 10001): a test key, not a secret.
            credentials = fcm.write_credentials(directory / "fcm-service-account.json")
            credentials.chmod(0o644)
            ports = {
                service: [
                    free_port() for _ in range(1 if service == "message-service" else replicas)
                ]
                for service in SERVICES
            }
            secret = uuid.uuid4().hex + uuid.uuid4().hex
            common = {
                "RABBITMQ_URL": rabbit_url,
                "RABBITMQ_RETRY_DELAYS": "0.2,0.5,1",
                "RABBITMQ_HEARTBEAT": "5",
                "RABBITMQ_GRACEFUL_TIMEOUT": "5",
                "OUTBOX_RELAY_INTERVAL": "0.5",
                "OUTBOX_MAX_BACKOFF": "2",
                "LOG_LEVEL": "INFO",
            }
            extra: dict[str, dict[str, str]] = {
                # As in tests.support.processes.service_env: the stack's tests count the
                # notification e-mails, not verification ones.
                "message-service": {"UNSUBSCRIBE_SECRET": secret, "EMAIL_VERIFICATION": "false"},
                "push-sender": {
                    "PUSH_PROVIDER": "fcm",
                    "FCM_CREDENTIALS_FILE": FCM_CREDENTIALS,
                    "FCM_BASE_URL": fcm.base_url,
                },
                "email-sender": {
                    "EMAIL_BACKEND": "smtp",
                    "SMTP_HOST": smtp.host,
                    "SMTP_PORT": str(smtp.port),
                    "SMTP_TLS": "none",
                    "UNSUBSCRIBE_SECRET": secret,
                },
            }
            services: dict[str, dict[str, Any]] = {}
            for service in SERVICES:
                env = {**common, "DATABASE_URL": databases[service], **extra.get(service, {})}
                services[service] = {"ports": ports[service], "env": env}
            services["push-sender"]["volumes"] = [f"{credentials}:{FCM_CREDENTIALS}:ro"]
            spec = {"project": project, "owner_pid": os.getpid(), "services": services}
            spec_file = directory / "spec.json"
            spec_file.touch(mode=0o600)
            spec_file.write_text(json.dumps(spec))
            stack = Stack(directory, project, ports, databases, rabbit_url, fcm, smtp)
            try:
                script("up", "--dir", str(directory), "--spec", str(spec_file), timeout=300)
                yield stack
            finally:
                script("down", "--dir", str(directory), timeout=300)
    finally:
        for url in databases.values():
            asyncio.run(infra.drop_database(url))
        infra.delete_vhost(rabbit_url)
