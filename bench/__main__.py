"""`python -m bench` (or `./scripts/bench`): the whole-pipeline benchmark; see bench/run.py."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from bench.run import Options, run


def parse(argv: list[str]) -> Options:
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Run the four Herald services as processes on this machine's RabbitMQ and "
        "PostgreSQL (a private vhost and databases, removed afterwards) with local FCM and SMTP "
        "servers, post chat messages over HTTP and report throughput, latency, CPU, queue depths "
        "and lost/duplicate notifications. A notification is one recipient of one message.",
    )
    parser.add_argument("--count", type=int, default=1000, help="messages to post at most")
    parser.add_argument(
        "--duration", type=float, default=60, help="seconds of posting at most (default 60)"
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=0,
        help="offered NOTIFICATIONS per second (messages/s = rate / recipients per message); "
        "0 = as fast as the API takes them (default)",
    )
    parser.add_argument("--rooms", type=int, default=50, help="rooms (default 50)")
    parser.add_argument("--room-size", type=int, default=10, help="members per room (default 10)")
    parser.add_argument(
        "--email-share", type=float, default=0.1, help="share of users with e-mail (default 0.1)"
    )
    parser.add_argument(
        "--connections", type=int, default=16, help="concurrent HTTP requests (default 16)"
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=90,
        help="seconds to wait for deliveries after the last post (default 90)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path(".herald/bench"), help="where JSON and PNG go"
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for every service (repeatable), e.g. LOG_LEVEL=WARNING",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="SECONDS",
        help="py-spy record each service for SECONDS, starting 2 s into the load "
        "(needs py-spy on PATH: `uv run --with py-spy==0.4.3 python -m bench ...`)",
    )
    args = parser.parse_args(argv)
    if args.room_size < 2 or args.rooms < 1 or args.count < 1 or args.connections < 1:
        parser.error("--rooms, --count and --connections must be ≥ 1 and --room-size ≥ 2")
    if not 0 <= args.email_share <= 1:
        parser.error("--email-share must be between 0 and 1")
    env = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--env wants KEY=VALUE, not {item!r}")
        env[key] = value
    return Options(
        count=args.count,
        duration=args.duration,
        rate=args.rate,
        rooms=args.rooms,
        room_size=args.room_size,
        email_share=args.email_share,
        connections=args.connections,
        drain_timeout=args.drain_timeout,
        out=args.out,
        env=env,
        profile_seconds=args.profile,
        command=" ".join(["scripts/bench", *argv]),
    )


def main() -> int:
    return asyncio.run(run(parse(sys.argv[1:])))


if __name__ == "__main__":
    sys.exit(main())
