"""The four services as processes, started from a given directory of console scripts: the working
tree's own `.venv/bin` for a normal run, another checkout's for `--compare` (same environment
variable names, same ports and readiness endpoint); with `--replicas`, several processes of a
service, named `service`, `service#2`… (as the fault tests name them)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

SERVICES = ("message-service", "notification-router", "push-sender", "email-sender")
OWN_BIN_DIR = Path(sys.executable).parent
# Short names `--replicas` takes besides the full ones.
ALIASES = {"router": "notification-router"}


def parse_replicas(text: str) -> dict[str, int]:
    """`--replicas`: processes per service. `N` for every service; `service=N` for one (the others
    keep 1); both, comma-separated: `2,push-sender=3`. Every service appears in the result."""
    default = 1
    counts: dict[str, int] = {}
    for item in (part.strip() for part in text.split(",")):
        name, sep, number = item.rpartition("=")
        if not number.isdigit() or int(number) < 1 or (sep and not name):
            raise ValueError(f"{item!r}: want N or SERVICE=N, N a whole number ≥ 1")
        if not sep:
            default = int(number)
            continue
        service = ALIASES.get(name.strip(), name.strip())
        if service not in SERVICES:
            raise ValueError(f"{name!r} is not one of {', '.join(SERVICES)} (or router)")
        counts[service] = int(number)
    return {service: counts.get(service, default) for service in SERVICES}


def replica_names(replicas: Mapping[str, int]) -> list[tuple[str, str]]:
    """(process name, service) of every process to start, service by service in SERVICES order:
    the first process of a service is named after it, the others `service#2`, `service#3`…"""
    return [
        (name if number == 1 else f"{name}#{number}", name)
        for name in SERVICES
        for number in range(1, replicas.get(name, 1) + 1)
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class ServiceProcess:
    name: str
    port: int
    env: dict[str, str]
    log_path: Path
    bin_dir: Path = OWN_BIN_DIR
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {**os.environ, **self.env, "PORT": str(self.port), "HOST": "127.0.0.1"}
        env.pop("VIRTUAL_ENV", None)  # the script's own interpreter decides
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [str(self.bin_dir / self.name)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches only the benchmark, which stops us
            )

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited early:\n{self.log()[-3000:]}")
            try:
                with urllib.request.urlopen(  # noqa: S310 (our own loopback URL)
                    f"{self.base_url}/health/ready", timeout=2
                ) as answer:
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{self.name} not ready within {timeout} s:\n{self.log()[-3000:]}")

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
