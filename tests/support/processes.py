"""Herald's console scripts as real processes, for end-to-end tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.fakes.fcm import FakeFcm
from tests.fakes.smtp import FakeSmtp

BIN_DIR = Path(sys.executable).parent
SERVICES = ("message-service", "notification-router", "push-sender", "email-sender")


# Ports handed out by `free_port` in the last minute, one empty file each: tests run in several
# processes at once (pytest-xdist workers, and other runs on the same machine), and a port is
# free only until the server it is meant for binds it, seconds later.
PORT_RESERVATIONS = Path(tempfile.gettempdir()) / "herald-test-ports"
# What uvicorn logs when its port is taken, and how often a service is started again elsewhere.
PORT_TAKEN = "address already in use"
REBINDS = 3
PORT_RESERVED_S = 60.0
_swept: list[bool] = []


def free_port() -> int:
    """A loopback port nothing listens on, and that no other `free_port` call on this machine
    handed out within the last minute."""
    PORT_RESERVATIONS.mkdir(exist_ok=True)
    if not _swept:  # once per process: forget the reservations that ran out
        for stale in PORT_RESERVATIONS.iterdir():
            with contextlib.suppress(OSError):
                if time.time() - stale.stat().st_mtime > PORT_RESERVED_S:
                    stale.unlink()
        _swept.append(True)
    for _ in range(1000):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        reservation = PORT_RESERVATIONS / str(port)
        try:
            reservation.touch(exist_ok=False)
        except FileExistsError:
            with contextlib.suppress(OSError):
                if time.time() - reservation.stat().st_mtime > PORT_RESERVED_S:
                    reservation.unlink()  # stale: the port may be handed out again next time
            continue
        return port
    raise RuntimeError(f"no free port: {PORT_RESERVATIONS} holds only recent reservations")


def _tcp_sockets(pid: int) -> list[list[str]]:
    """The /proc/net/tcp* rows of process `pid`'s TCP sockets (Linux: its descriptors in
    /proc/<pid>/fd against the sockets' inodes); empty if it is gone."""
    try:
        links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    except OSError:
        return []
    inodes = {link[len("socket:[") : -1] for link in links if link.startswith("socket:[")}
    rows: list[list[str]] = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as lines:
            next(lines)  # the header
            rows.extend(fields for line in lines if (fields := line.split())[9] in inodes)
    return rows


def local_ports(pid: int) -> set[int]:
    """The local ports of process `pid`'s TCP sockets; empty if it is gone."""
    return {int(fields[1].rsplit(":", 1)[1], 16) for fields in _tcp_sockets(pid)}


def peer_ports(pid: int) -> set[int]:
    """The remote ports of process `pid`'s established TCP connections; empty if it is gone."""
    return {
        int(fields[2].rsplit(":", 1)[1], 16)
        for fields in _tcp_sockets(pid)
        if fields[3] == "01"  # TCP_ESTABLISHED
    }


@dataclass
class ServiceProcess:
    name: str
    port: int
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {**os.environ, **self.env, "PORT": str(self.port), "HOST": "127.0.0.1"}
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [str(BIN_DIR / self.name)], env=env, stdout=log, stderr=subprocess.STDOUT
            )

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        rebinds = 0
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                if PORT_TAKEN in self.log() and rebinds < REBINDS:
                    # Something took the port between `free_port` and the service's bind (an
                    # outgoing connection's source port can be any free one; CI once: the
                    # router of a cluster test): start it again on another port.
                    rebinds += 1
                    self.port = free_port()
                    self.start()
                    continue
                raise RuntimeError(f"{self.name} exited early:\n{self.log()}")
            try:
                if httpx.get(f"{self.base_url}/health/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{self.name} not ready within {timeout} s:\n{self.log()}")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, as an orchestrator would; returns the exit code."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def service_env(
    *,
    rabbit_url: str,
    databases: Mapping[str, str],
    fcm: FakeFcm,
    credentials: Path,
    smtp: FakeSmtp,
    overrides: Mapping[str, str] | None = None,
) -> dict[str, dict[str, str]]:
    """The environment of each service: small retry tiers, a heartbeat that notices a dead peer
    within seconds, an outbox relay that backs off at most 2 s (default 30 s).

    `EMAIL_VERIFICATION=false` (message-service): every address counts as verified when it is
    set, as for an operator who verifies addresses elsewhere. These suites are about what
    happens to notifications; a verification e-mail per registered user would land in the SMTP
    fake among the notification e-mails they count, and each registration would wait for it.
    `tests/e2e/test_email_verification.py` runs with verification on (`overrides`), and the
    README walk-through's test with the defaults."""
    common = {
        "RABBITMQ_URL": rabbit_url,
        "RABBITMQ_RETRY_DELAYS": "0.2,0.5,1",
        "RABBITMQ_HEARTBEAT": "5",
        "RABBITMQ_CONNECTION_TIMEOUT": "5",
        "RABBITMQ_GRACEFUL_TIMEOUT": "5",
        "OUTBOX_RELAY_INTERVAL": "0.5",
        "OUTBOX_MAX_BACKOFF": "2",
        "LOG_LEVEL": "INFO",
        "EMAIL_VERIFICATION": "false",
        **(overrides or {}),
    }
    extra = {
        "push-sender": {
            "PUSH_PROVIDER": "fcm",
            "FCM_CREDENTIALS_FILE": str(credentials),
            "FCM_BASE_URL": fcm.base_url,
        },
        "email-sender": {
            "EMAIL_BACKEND": "smtp",
            "SMTP_HOST": smtp.host,
            "SMTP_PORT": str(smtp.port),
            "SMTP_TLS": "none",
        },
    }
    return {
        name: {**common, "DATABASE_URL": databases[name], **extra.get(name, {})}
        for name in SERVICES
    }


@contextlib.asynccontextmanager
async def running_services(
    environments: Mapping[str, dict[str, str]], log_dir: Path
) -> AsyncIterator[dict[str, ServiceProcess]]:
    """The four console scripts as processes, each ready, with logs in `log_dir`. On the way out
    each gets SIGTERM and must drain and exit 0 (asserted, with the failing services' logs)."""
    services = {
        name: ServiceProcess(
            name=name, port=free_port(), env=environments[name], log_path=log_dir / f"{name}.log"
        )
        for name in SERVICES
    }
    try:
        for service in services.values():
            service.start()
        for service in services.values():
            await asyncio.to_thread(service.wait_ready)
        yield services
    finally:
        exit_codes = {name: service.stop() for name, service in services.items()}
    assert exit_codes == dict.fromkeys(SERVICES, 0), {
        name: services[name].log()[-3000:] for name, code in exit_codes.items() if code != 0
    }
