"""The compose stack of `scripts/containers`: compose.yaml's four services, rendered for podman on
the host network against the machine's own RabbitMQ and PostgreSQL, and the wait for their
health checks.

compose.yaml names RabbitMQ and PostgreSQL images from an image registry, which these machines
cannot reach; the machine runs both servers anyway. So the stack takes each service's definition
from compose.yaml (its environment, volumes, restart policy, read-only root file system) and
changes only what the host network requires:

* no `build`: the images are built beforehand by `scripts/containers build` (podman-compose
  1.0.3's build cannot mount the host's CA bundle);
* `network_mode: host` and no `ports`, no `depends_on` (the servers are not containers);
* the broker and database URLs, ports and providers from a spec (JSON), and every variable in an
  env file of mode 600 instead of `environment:` (podman-compose prints the `podman run` command
  lines it runs, and they would show the unsubscribe secret);
* what it copies from compose.yaml is interpolated first, as Compose does, with the variables of
  the environment the script runs in (`interpolate`): an env file is read literally, so a
  `${VAR:+...}` left in it would reach the service as its value;
* a service scaled to N replicas becomes N services `<name>`, `<name>-2`, ... on ports of their
  own: on one host network every replica needs its own port, and podman-compose 1.0.3 ignores
  `--scale`.

    python -m scripts.container_stack render --dir DIR --spec SPEC.json
    python -m scripts.container_stack wait --dir DIR [--timeout 180]
    python -m scripts.container_stack facts --dir DIR [--starts 5]
    python -m scripts.container_stack default-spec --project NAME > SPEC.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ("message-service", "notification-router", "push-sender", "email-sender")
DEFAULT_PORTS = {"message-service": 8000, "notification-router": 8001, "push-sender": 8002,
                 "email-sender": 8003}  # fmt: skip
# Variables the host network makes meaningless or that the spec sets.
DROPPED_VARIABLES = {"RABBITMQ_DECLARE", "HOST"}


# A variable name as Compose reads one.
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class InterpolationError(ValueError):
    """A `${VAR:?message}` whose variable is missing, or a `$` Compose would not read."""


def _name_end(text: str, start: int) -> int:
    """Where the variable name starting at `start` ends (`start` itself when there is none)."""
    match = _NAME.match(text, start)
    return match.end() if match else start


def _closing_brace(text: str, start: int) -> int:
    """The index of the `}` closing a `${` whose body starts at `start`: a nested `${...}` in a
    default (`${A:-${B}}`) is part of the body."""
    depth = 1
    index = start
    while index < len(text):
        if text.startswith("${", index):
            depth += 1
            index += 2
            continue
        if text[index] == "}":
            depth -= 1
            if depth == 0:
                return index
        index += 1
    raise InterpolationError(f"unclosed ${{ in {text!r}")


def interpolate(text: str, environ: Mapping[str, str]) -> str:
    """`text` with its Compose variables substituted from `environ`, as Docker Compose does:
    `$$` is a `$`; `$VAR` and `${VAR}` are the value, empty when unset; `${VAR:-default}` the
    default when VAR is unset or empty, `${VAR-default}` only when unset; `${VAR:+alt}` the
    alternative when VAR is set and not empty, `${VAR+alt}` when set at all, else the value
    (empty); `${VAR:?message}` and `${VAR?message}` fail when VAR is empty or unset, or unset.
    A default, alternative or message is interpolated in turn. Any other `$` is an error, as in
    Compose ("Invalid template"), rather than text passed on unread."""
    out: list[str] = []
    index = 0
    while True:
        dollar = text.find("$", index)
        if dollar < 0:
            out.append(text[index:])
            return "".join(out)
        out.append(text[index:dollar])
        after = dollar + 1
        if text.startswith("$", after):
            out.append("$")
            index = after + 1
            continue
        end = _name_end(text, after)
        if end > after:
            out.append(environ.get(text[after:end], ""))
            index = end
            continue
        if not text.startswith("{", after):
            raise InterpolationError(f"invalid template: {text!r} (a lone $; write $$ for one)")
        close = _closing_brace(text, after + 1)
        out.append(_braced(text[after + 1 : close], text, environ))
        index = close + 1


def _braced(body: str, text: str, environ: Mapping[str, str]) -> str:
    """The value of `${body}`."""
    end = _name_end(body, 0)
    name, rest = body[:end], body[end:]
    if not name:
        raise InterpolationError(f"invalid template: {text!r}")
    value = environ.get(name)
    if not rest:
        return value or ""
    colon = rest.startswith(":")
    operator, argument = (rest[1:2], rest[2:]) if colon else (rest[:1], rest[1:])
    # With the colon an empty value counts as unset, as in Compose and the shell.
    present = value is not None and (value != "" or not colon)
    if operator == "-":
        return value if present and value is not None else interpolate(argument, environ)
    if operator == "+":
        return interpolate(argument, environ) if present else (value or "")
    if operator == "?":
        if not present or value is None:
            message = interpolate(argument, environ)
            raise InterpolationError(f"required variable {name} is missing a value: {message}")
        return value
    raise InterpolationError(f"invalid template: {text!r}")


def interpolated(value: Any, environ: Mapping[str, str]) -> Any:
    """`value` from a loaded compose file (a string, list or mapping, nested) with each string
    interpolated; other scalars as they are."""
    if isinstance(value, str):
        return interpolate(value, environ)
    if isinstance(value, list):
        return [interpolated(item, environ) for item in value]
    if isinstance(value, dict):
        return {key: interpolated(item, environ) for key, item in value.items()}
    return value


def image(service: str) -> str:
    """The service's image as `scripts/containers build` tags it (HERALD_IMAGE_TAG, default dev)."""
    return f"localhost/herald-{service}:{os.environ.get('HERALD_IMAGE_TAG') or 'dev'}"


def instance_names(service: str, replicas: int) -> list[str]:
    return [service if number == 1 else f"{service}-{number}" for number in range(1, replicas + 1)]


def service_environment(
    definition: dict[str, Any], overrides: Mapping[str, Any], environ: Mapping[str, str]
) -> dict[str, str]:
    """A compose service's `environment:` as Compose hands it to the container, interpolated
    from `environ`, less DROPPED_VARIABLES, and with `overrides` (the spec's) on top. A value
    that interpolates to nothing stays, empty, as Compose passes it; a variable listed without a
    value takes the one in `environ`, and is left out when `environ` has none. The overridden
    variables are not interpolated: their `${VAR:?...}` asks for what the spec gives instead."""
    environment: dict[str, str] = {}
    for key, value in definition.get("environment", {}).items():
        if key in DROPPED_VARIABLES or key in overrides:
            continue
        if value is None:
            if key in environ:
                environment[key] = environ[key]
            continue
        environment[key] = interpolate(str(value), environ)
    environment.update({key: str(value) for key, value in overrides.items()})
    return environment


def render(spec: dict[str, Any], directory: Path, environ: Mapping[str, str] | None = None) -> Path:
    """Write DIR/compose.yaml and DIR/env/<instance>.env from compose.yaml and `spec`:

    {"project": "herald-ct-1a2b", "owner_pid": 1234,            # optional: the starting process
     "volume_dir": "/abs/out",                                # optional: bind mount, not volume
     "services": {"push-sender": {"ports": [8002, 8102], "env": {"RABBITMQ_URL": ...},
                                  "volumes": ["/host/file:/in/container:ro"]}, ...}}  # optional

    compose.yaml's variables come from `environ` (default: this process's environment), as
    `docker compose` run here would read them. Returns the compose file's path."""
    environ = os.environ if environ is None else environ
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    env_dir = directory / "env"
    env_dir.mkdir(parents=True, exist_ok=True)
    services: dict[str, Any] = {}
    for service in SERVICES:
        definition = compose["services"][service]
        wanted = spec["services"][service]
        ports: list[int] = wanted["ports"]
        for name, port in zip(instance_names(service, len(ports)), ports, strict=True):
            environment = service_environment(definition, wanted["env"], environ)
            if "RABBITMQ_URL" in wanted["env"] and environment.get("RABBITMQ_URLS", "").strip():
                # RABBITMQ_URLS wins over RABBITMQ_URL, and what compose.yaml gives it (with
                # HERALD_CLUSTER set) are the cluster profile's host names, which the host
                # network does not resolve: every service would fail to connect.
                raise SystemExit(
                    f"{service}: compose.yaml's RABBITMQ_URLS is set (HERALD_CLUSTER?) but the"
                    " stack's broker is the spec's RABBITMQ_URL: unset HERALD_CLUSTER"
                )
            environment["PORT"] = str(port)
            environment["HOST"] = "127.0.0.1"
            env_file = env_dir / f"{name}.env"
            env_file.touch(mode=0o600)
            env_file.write_text("".join(f"{key}={value}\n" for key, value in environment.items()))
            rendered: dict[str, Any] = {
                "image": image(service),
                "network_mode": "host",
                "env_file": [str(env_file)],
                "labels": {
                    "herald.service": service,
                    "herald.port": str(port),
                    # Who started it: the tests remove stacks whose owner died without `down`.
                    "herald.owner-pid": str(spec.get("owner_pid", "")),
                },
            }
            for key in ("restart", "read_only", "tmpfs", "user"):
                if key in definition:
                    rendered[key] = interpolated(definition[key], environ)
            volumes = list(wanted.get("volumes", []))
            for volume in interpolated(definition.get("volumes", []), environ):
                source, target = volume.split(":", 1)
                if spec.get("volume_dir") and source == "herald-out":
                    source = str(spec["volume_dir"])
                volumes.append(f"{source}:{target}")
            if volumes:
                rendered["volumes"] = volumes
            services[name] = rendered
    document: dict[str, Any] = {"services": services}
    named = {
        volume.split(":", 1)[0]
        for service in services.values()
        for volume in service.get("volumes", [])
        if not volume.startswith("/")
    }
    if named:
        document["volumes"] = {name: {} for name in sorted(named)}
    path = directory / "compose.yaml"
    path.write_text(
        "# Rendered by scripts/container_stack.py from compose.yaml: do not edit.\n"
        + yaml.safe_dump(document, sort_keys=False)
    )
    (directory / "project").write_text(spec["project"])
    return path


def podman(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`podman ARGS...` (with the CONTAINERS_CONF of the caller), its output captured."""
    executable = shutil.which("podman") or "/usr/bin/podman"
    return subprocess.run(  # noqa: S603  (arguments of our own)
        [executable, *args], check=check, capture_output=True, text=True
    )


def containers(project: str) -> list[dict[str, Any]]:
    """The project's containers as `podman ps --all` sees them."""
    done = podman(
        "ps", "--all", "--format", "json", "--filter", f"label=io.podman.compose.project={project}"
    )
    found: list[dict[str, Any]] = json.loads(done.stdout or "[]")
    return found


def healthy(container: str) -> bool:
    """Run the image's HEALTHCHECK once (there is no systemd here to run it on a timer)."""
    return podman("healthcheck", "run", container, check=False).returncode == 0


def started_at(container: str) -> float:
    """When the container's process was last started (epoch seconds)."""
    started = "{{.State.StartedAt.Unix}}.{{.State.StartedAt.Nanosecond}}"
    done = podman("inspect", "--format", started, container)
    seconds, nanoseconds = done.stdout.strip().split(".")
    return int(seconds) + int(nanoseconds) / 1e9


def wait(directory: Path, timeout: float) -> dict[str, float]:
    """Until every container of the stack is healthy; returns each one's seconds from its start
    to the first healthy check (the checks run every half second or so, one container after the
    other: an upper bound). Fails with the unready ones' last log lines."""
    project = (directory / "project").read_text().strip()
    expected = set(yaml.safe_load((directory / "compose.yaml").read_text())["services"])
    deadline = time.monotonic() + timeout
    ready: dict[str, float] = {}
    while True:
        found = {c["Labels"]["com.docker.compose.service"]: c for c in containers(project)}
        for service in sorted(expected - set(ready)):
            container = found.get(service)
            if container is None:  # `up` did not create it: waiting will not help
                raise SystemExit(f"{service}: no container in project {project}")
            if container["State"] != "running":
                continue
            if healthy(container["Names"][0]):
                ready[service] = round(time.time() - started_at(container["Names"][0]), 1)
        if set(ready) == expected:
            return ready
        if time.monotonic() > deadline:
            for service in sorted(expected - set(ready)):
                name = found[service]["Names"][0] if service in found else service
                state = found[service]["State"] if service in found else "missing"
                print(f"--- {service} ({state}) not healthy; its last log lines:", file=sys.stderr)
                logs = podman("logs", "--tail", "40", name, check=False)
                print(logs.stdout + logs.stderr, file=sys.stderr)
            raise SystemExit(f"not healthy within {timeout:.0f} s: {sorted(expected - set(ready))}")
        time.sleep(0.5)


def _ready_after_start(container: str, port: int, timeout: float) -> float:
    """Seconds from the container's start to its service's first 200 on /health/ready (polled
    every 50 ms over HTTP, as a load balancer would)."""
    deadline = time.monotonic() + timeout
    url = f"http://127.0.0.1:{port}/health/ready"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return time.time() - started_at(container)
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"{container}: not ready within {timeout:.0f} s")


def facts(directory: Path, starts: int) -> dict[str, dict[str, Any]]:
    """Per service of a running stack: its image's size, the median start-to-ready time over
    `starts` restarts, and the RSS of its process once ready and idle (VmRSS of the container's
    PID 1, which is the service: the image's CMD execs it)."""
    project = (directory / "project").read_text().strip()
    found = {c["Labels"]["com.docker.compose.service"]: c for c in containers(project)}
    result: dict[str, dict[str, Any]] = {}
    for service in SERVICES:
        container = found[service]["Names"][0]
        port = int(found[service]["Labels"]["herald.port"])
        size = json.loads(podman("image", "inspect", image(service)).stdout)[0]["Size"]
        times = []
        for _ in range(starts):
            podman("stop", "--time", "30", container)
            podman("start", container)
            times.append(_ready_after_start(container, port, timeout=120))
        result[service] = {"image_mb": round(size / 1e6), "start_to_ready_s": times}
    # Idle: every service ready, nothing posted, a few seconds for start-up work to settle.
    time.sleep(5)
    for service in SERVICES:
        pid = podman("inspect", "--format", "{{.State.Pid}}", found[service]["Names"][0]).stdout
        status = Path(f"/proc/{pid.strip()}/status").read_text()
        rss_kb = next(
            int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")
        )
        result[service]["idle_rss_mb"] = round(rss_kb / 1024)
    return result


def default_spec(project: str, rabbit_url: str, pg_base_url: str) -> dict[str, Any]:
    """`scripts/containers up` without a spec: the standard ports, one database per service
    (created by the script), the log push provider and .eml files in the compose volume."""
    secret = secrets.token_urlsafe(32)
    services: dict[str, Any] = {}
    for service in SERVICES:
        database = f"{project.replace('-', '_')}_{service.replace('-', '_')}"
        env = {"RABBITMQ_URL": rabbit_url, "DATABASE_URL": f"{pg_base_url}/{database}"}
        if service in {"message-service", "email-sender"}:
            env["UNSUBSCRIBE_SECRET"] = secret
        services[service] = {"ports": [DEFAULT_PORTS[service]], "env": env}
    return {"project": project, "services": services}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    render_parser = commands.add_parser("render")
    render_parser.add_argument("--dir", type=Path, required=True)
    render_parser.add_argument("--spec", type=Path, required=True)
    wait_parser = commands.add_parser("wait")
    wait_parser.add_argument("--dir", type=Path, required=True)
    wait_parser.add_argument("--timeout", type=float, default=180)
    facts_parser = commands.add_parser("facts")
    facts_parser.add_argument("--dir", type=Path, required=True)
    facts_parser.add_argument("--starts", type=int, default=5)
    spec_parser = commands.add_parser("default-spec")
    spec_parser.add_argument("--project", required=True)
    spec_parser.add_argument("--rabbitmq-url", required=True)
    spec_parser.add_argument("--postgres-url", required=True)
    args = parser.parse_args()
    if args.command == "render":
        print(render(json.loads(args.spec.read_text()), args.dir))
    elif args.command == "wait":
        for service, seconds in wait(args.dir, args.timeout).items():
            print(f"{service}: healthy, {seconds} s after its start")
    elif args.command == "facts":
        measured = facts(args.dir, args.starts)
        print(f"| service | image | start to ready (median of {args.starts}, min-max) | idle RSS |")
        print("| --- | --- | --- | --- |")
        for service, fact in measured.items():
            times = sorted(fact["start_to_ready_s"])
            median = statistics.median(times)
            print(
                f"| {service} | {fact['image_mb']} MB | {median:.2f} s "
                f"({times[0]:.2f}-{times[-1]:.2f}) | {fact['idle_rss_mb']} MB |"
            )
    else:
        spec = default_spec(args.project, args.rabbitmq_url, args.postgres_url)
        print(json.dumps(spec, indent=2))


if __name__ == "__main__":
    main()
