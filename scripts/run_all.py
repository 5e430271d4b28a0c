"""Run the four Herald services as child processes in one terminal.

Checks RabbitMQ first (a clear message and exit code 2 if it is unreachable), prefixes every
output line with the service name, and on Ctrl-C (or SIGTERM) stops all services gracefully.
If one service exits on its own, the others are stopped and its exit code is returned.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aio_pika
from yarl import URL

SERVICES = ("message-service", "notification-router", "push-sender", "email-sender")
COLOURS = ("\033[36m", "\033[35m", "\033[33m", "\033[32m")
RESET = "\033[0m"
STOP_TIMEOUT = 30.0
DEFAULT_RABBITMQ_URL = "amqp://guest:guest@localhost:5672/"


async def rabbitmq_reachable(url: str) -> str | None:
    """None if an AMQP connection opens, else why not (without the password)."""
    try:
        connection = await aio_pika.connect(url, timeout=5)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}".replace(URL(url).password or "\0", "***")
    await connection.close()
    return None


async def pump(name: str, colour: str, stream: asyncio.StreamReader) -> None:
    prefix = f"{colour}{name:>19}{RESET} | " if sys.stdout.isatty() else f"{name:>19} | "
    while line := await stream.readline():
        sys.stdout.write(prefix + line.decode(errors="replace"))
        sys.stdout.flush()


async def main() -> int:
    url = os.environ.get("RABBITMQ_URL", DEFAULT_RABBITMQ_URL)
    problem = await rabbitmq_reachable(url)
    if problem is not None:
        where = URL(url)
        print(
            f"Herald cannot reach RabbitMQ at {where.host}:{where.port} ({problem}).\n"
            "Start it (for example `rabbitmq-server -detached`) or set RABBITMQ_URL.",
            file=sys.stderr,
        )
        return 2

    bin_dir = Path(sys.executable).parent
    # Readable lines in a terminal; containers keep the services' default, JSON. Everyone on
    # this machine registers from one address: the README's walk-through registers three users
    # each time it is pasted, more often than the default 20 registrations an hour allow.
    environment = {"LOG_FORMAT": "text", "RATE_LIMIT_REGISTRATION": "300 per hour", **os.environ}
    children: list[asyncio.subprocess.Process] = []
    pumps = []
    for name, colour in zip(SERVICES, COLOURS, strict=True):
        child = await asyncio.create_subprocess_exec(
            str(bin_dir / name),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=environment,
            start_new_session=True,  # Ctrl-C reaches only us; we stop the children in order
        )
        children.append(child)
        if child.stdout is not None:
            pumps.append(asyncio.create_task(pump(name, colour, child.stdout)))

    print(
        "Herald is starting: API http://127.0.0.1:8000/docs · pushes in .herald/pushes.jsonl · "
        "e-mails in .herald/emails/ · Ctrl-C stops everything",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    waits = {asyncio.create_task(child.wait()): child for child in children}
    stop_wait = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({*waits, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
    exit_code = 0
    for task in done:
        if task in waits:
            exit_code = waits[task].returncode or 1
            print(f"a service exited with code {waits[task].returncode}; stopping the others")

    for child in children:
        if child.returncode is None:
            child.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(asyncio.gather(*(c.wait() for c in children)), STOP_TIMEOUT)
    except TimeoutError:
        for child in children:
            if child.returncode is None:
                child.kill()
    await asyncio.gather(*pumps, return_exceptions=True)
    stop_wait.cancel()
    return exit_code


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
