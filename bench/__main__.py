"""`python -m bench` (or `./scripts/bench`): the whole-pipeline benchmark; see bench/run.py."""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from pathlib import Path

from bench.run import SCENARIOS, Options, run
from bench.services import parse_replicas

EPILOG = """\
figures:
  A notification is one recipient of one message. It is COMPLETE when the router's ledger has
  its row and every delivery it is owed was accepted by the local provider (its push, and its
  e-mail if the recipient has e-mail on). After posting, the benchmark drains: it waits while
  deliveries keep coming, until every owed delivery was accepted and the pipeline SETTLED (no
  message in any queue of the run's vhost, ready or unacknowledged, dead-letter queues aside, no
  unpublished outbox row, and, while deliveries are missing, none accepted for 5 s), or no
  delivery came for --stall-timeout seconds, or --drain-timeout seconds passed. A notification
  still missing then is
    LOST         if it can never arrive: the pipeline had settled (nothing left anywhere to bring
                 it), or the router's ledger has its delivery as failed;
    NOT DRAINED  otherwise: still on its way (a backlog, not a loss).
  Duplicates: a delivery (same notification id, so the same collapse id / Message-ID) accepted
  more than once, or a second ledger row. Unexpected: a delivery nobody was owed.
  CPU per notification: each process's CPU from the start of the load to the last delivery (or
  the end of the drain) divided by the notifications completed; a service's replicas together;
  RabbitMQ is the whole node (other users of the broker included; with --cluster, the three
  private nodes, nobody else's), PostgreSQL the run's own backends. RSS: a group's sum, and
  with several processes (replicas, nodes) the largest of any one.
  Calibration: a fixed pure-Python loop (CPU ms, best of 3) and a raw aio-pika loop on the same
  broker (persistent messages, each publish awaiting its confirm, a quorum queue in the run's
  vhost, consumed meanwhile; messages/s), so that figures of different machines compare.

scenarios:
  default   rooms of --room-size members, messages posted in turn by every member; every
            recipient has one FCM device, --email-share of them e-mail on.
  big-room  one message to one room of the most members the API allows (1,000), every member
            with an FCM device and e-mail on, against an FCM fake that takes --fcm-latency-ms
            per request and processes at most --fcm-concurrency at once (default 50 ms, 50);
            reports pushes, repeats, e-mails and the last push's time after the 201 next to the
            bound devices / concurrency x latency + 1 s. A harsher provider, e.g.
            --fcm-latency-ms 1000 --fcm-concurrency 10, keeps requests waiting longer than the
            push-sender's FCM timeout (FCM_TIMEOUT, 10 s).

  lanes     --count messages (default 20) to one room of 1,000 members at level all, posted at
            once (~20,000 pushes of room chatter), then 50 direct messages between two other
            users, one every 0.1 s, against the FCM fake of big-room (50 ms, 50 at once:
            ~1,000 pushes/s, so the chatter takes ~20 s); reports the direct messages' 201 →
            push latencies (target: p99 250 ms) and how much chatter still waited when the
            last one was posted.

  chat      the default rooms with a chat app's defaults and habits: every user at the
            default levels (DMs, invitations and mentions), 5 % of room messages mention a
            member, 2 % of messages are direct (between --rooms pairs of users of their own),
            one user in five holds a real-time stream open with their room in view; reports
            decisions/s (the router's ledger rows) and sends/s (pushes and e-mails accepted),
            the decisions by reason, and checks every decided delivery was accepted once.

find-rate: --find-rate --duration 30 searches the highest offered rate whose 201 → push p99 stays
within --p99-bound-ms (250) while nothing is lost, repeated or left behind and at least 98 % of
the offer is sustained: up or down by 1.25x until a pass and a failure bracket it, then halving
the gap, at most --find-steps runs. Near the limit one rate's p99 swings from run to run; the
answer is a run's, so repeat it to see the spread.

long runs: --duration caps the posting (60 s by default), so a run of 30,000 messages wants e.g.
--count 30000 --duration 1800; its CPU per notification and RSS compare with a short run's.

exit status: 0 every notification complete once; 1 lost, duplicated or unexpected ones;
2 some not drained (and nothing worse).
"""

# Per scenario, the defaults of the workload options left unset.
DEFAULTS: dict[str, dict[str, float | int]] = {
    "default": {
        "count": 1000,
        "rooms": 50,
        "room_size": 10,
        "email_share": 0.1,
        "fcm_latency_ms": 0,
        "fcm_concurrency": 0,
    },
    "big-room": {
        "count": 1,
        "rooms": 1,
        "room_size": 0,  # the API's maximum, looked up
        "email_share": 1.0,
        "fcm_latency_ms": 50,
        "fcm_concurrency": 50,
    },
    "lanes": {
        "count": 20,  # messages to the big room: ~20,000 pushes of chatter
        "rooms": 1,
        "room_size": 0,  # the API's maximum, looked up
        "email_share": 0.0,
        "fcm_latency_ms": 50,
        "fcm_concurrency": 50,
    },
    "chat": {
        "count": 2000,
        "rooms": 50,
        "room_size": 10,
        "email_share": 1.0,  # every user at the default levels: e-mail for what concerns them
        "fcm_latency_ms": 0,
        "fcm_concurrency": 0,
    },
}


def max_room_members() -> int:
    """The message-service's limit on members per room (creator included)."""
    from message_service.service import MAX_ROOM_MEMBERS

    return MAX_ROOM_MEMBERS


def replicas_argument(text: str) -> dict[str, int]:
    try:
        return parse_replicas(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse(argv: list[str]) -> Options:
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Run the four Herald services as processes on this machine's RabbitMQ (or a "
        "private three-node cluster: --cluster) and "
        "PostgreSQL (a private vhost and databases, removed afterwards) with local FCM and SMTP "
        "servers, post chat messages over HTTP and report throughput, latency, CPU (per "
        "notification too), memory, queue depths, the run's calibration and lost / not drained "
        "/ duplicate notifications.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--scenario", choices=SCENARIOS, default="default", help="workload (default: default)"
    )
    parser.add_argument(
        "--count",
        type=int,
        help="messages to post at most (default 1000; with --rate on the default workload, "
        "enough for the whole --duration; big-room: 1)",
    )
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
    parser.add_argument("--rooms", type=int, help="rooms (default 50; big-room: 1)")
    parser.add_argument(
        "--room-size",
        type=int,
        help="members per room (default 10; big-room: the API's maximum, 1000)",
    )
    parser.add_argument(
        "--email-share",
        type=float,
        help="share of users with e-mail (default 0.1; big-room: 1)",
    )
    parser.add_argument(
        "--connections", type=int, default=16, help="concurrent HTTP requests (default 16)"
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=900,
        help="after the last post, seconds to drain at most (default 900); the drain ends "
        "sooner when everything arrived or nothing arrives any more",
    )
    parser.add_argument(
        "--stall-timeout",
        type=float,
        default=120,
        help="end the drain when no delivery came for this long (default 120, above the "
        "longest retry tier of 25 s)",
    )
    parser.add_argument(
        "--fcm-latency-ms",
        type=float,
        help="milliseconds the FCM fake takes per send (default 0; big-room: 50)",
    )
    parser.add_argument(
        "--fcm-concurrency",
        type=int,
        help="FCM sends the fake processes at once, further ones wait (default 0 = unbounded; "
        "big-room: 50)",
    )
    parser.add_argument(
        "--replicas",
        type=replicas_argument,
        default=parse_replicas("1"),
        metavar="N|SERVICE=N,…",
        help="processes of every service (N), or of some (e.g. router=2,push-sender=2; the "
        "others 1), or both (2,push-sender=3); the load spreads its requests over "
        "message-service's processes in turn (default 1)",
    )
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="run on a private three-node RabbitMQ cluster of this machine's rabbitmq-server "
        "(spare ports, started for the run and removed afterwards) instead of the machine's "
        "node; every service process gets the three addresses, each process a different node "
        "first",
    )
    parser.add_argument(
        "--no-calibration",
        action="store_true",
        help="skip the calibration (about 3 s before the services start)",
    )
    parser.add_argument(
        "--no-vacuum",
        action="store_true",
        help="where the PostgreSQL server has autovacuum off, do not stand in for it (by default "
        "the benchmark runs VACUUM (ANALYZE) of its databases once a minute, as autovacuum would)",
    )
    parser.add_argument(
        "--compare",
        metavar="GIT_REF",
        help="run GIT_REF's services and the working tree's back to back (a temporary git "
        "worktree with its own .venv, removed afterwards) and print both figures and new/old",
    )
    parser.add_argument(
        "--compare-runs",
        type=int,
        default=2,
        metavar="N",
        help="with --compare: runs of each side, interleaved old, new, old, new… (default 2)",
    )
    parser.add_argument(
        "--find-rate",
        action="store_true",
        help="search the highest offered rate whose 201 → push p99 is within --p99-bound-ms "
        "(default workload; paced runs of --duration s each, the first at --rate, default "
        "1000; see bench/find_rate.py)",
    )
    parser.add_argument(
        "--p99-bound-ms",
        type=float,
        default=250,
        help="with --find-rate: the bound on 201 → push p99 (default 250)",
    )
    parser.add_argument(
        "--find-steps",
        type=int,
        default=6,
        metavar="N",
        help="with --find-rate: runs at most (default 6)",
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
    count_given = args.count is not None
    defaults = DEFAULTS[args.scenario]
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.room_size == 0:
        args.room_size = max_room_members()
    if args.find_rate:
        if args.scenario != "default" or args.compare:
            parser.error("--find-rate runs the default scenario, without --compare")
        if args.p99_bound_ms <= 0 or args.find_steps < 1:
            parser.error("--p99-bound-ms and --find-steps must be > 0")
        args.rate = args.rate or 1000
    if args.scenario == "default" and args.rate > 0 and not count_given and args.room_size >= 2:
        # A rate is measured over the duration asked for, not cut short by the default count
        # (1,000 messages at 1,000 notifications/s in rooms of 10 last 9 s, mostly warm-up).
        args.count = math.ceil(args.rate * args.duration / (args.room_size - 1))
    if args.room_size < 2 or args.rooms < 1 or args.count < 1 or args.connections < 1:
        parser.error("--rooms, --count and --connections must be ≥ 1 and --room-size ≥ 2")
    if not 0 <= args.email_share <= 1:
        parser.error("--email-share must be between 0 and 1")
    if args.fcm_latency_ms < 0 or args.fcm_concurrency < 0:
        parser.error("--fcm-latency-ms and --fcm-concurrency must be ≥ 0")
    if args.drain_timeout <= 0 or args.stall_timeout <= 0 or args.compare_runs < 1:
        parser.error("--drain-timeout, --stall-timeout and --compare-runs must be > 0")
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
        stall_timeout=args.stall_timeout,
        out=args.out,
        env=env,
        profile_seconds=args.profile,
        command=" ".join(["scripts/bench", *argv]),
        scenario=args.scenario,
        fcm_latency=args.fcm_latency_ms / 1000,
        fcm_concurrency=args.fcm_concurrency,
        calibrate=not args.no_calibration,
        compare=args.compare,
        compare_runs=args.compare_runs,
        replicas=args.replicas,
        cluster=args.cluster,
        vacuum=not args.no_vacuum,
        find_rate=args.find_rate,
        p99_bound_ms=args.p99_bound_ms,
        find_steps=args.find_steps,
    )


def main() -> int:
    try:
        return asyncio.run(run(parse(sys.argv[1:])))
    except KeyboardInterrupt:  # what the run started is stopped and removed by then
        print("[bench] interrupted", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
