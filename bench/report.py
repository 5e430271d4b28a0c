"""The benchmark's figures: summary statistics, per-second series, CPU per notification, the
big-room summary, the printed table, the JSON document and the PNG chart."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from bench import loop_lag, stages, vacuum
from bench.calibrate import describe as describe_calibration
from bench.checker import CheckResult
from bench.monitor import QueueDepths

TOTAL = "total"
POSTGRES_GROUP = "postgres (our backends)"


def figure_at(document: Mapping[str, Any], path: Sequence[str]) -> float | None:
    """The number at `path` (keys, outermost first) in a run's document; None where there is
    none (a figure the run did not measure, or a document of an older version)."""
    value: Any = document
    for key in path:
        if not isinstance(value, Mapping) or key not in value:
            return None
        value = value[key]
    return float(value) if isinstance(value, int | float) else None


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted `values` (0 when there are none)."""
    if not values:
        return 0.0
    rank = max(1, math.ceil(fraction * len(values)))
    return values[rank - 1]


def latency_summary(latencies: Iterable[float]) -> dict[str, float | int]:
    """p50/p95/p99/max in milliseconds."""
    ordered = sorted(latencies)
    return {
        "count": len(ordered),
        "p50": round(percentile(ordered, 0.50) * 1000, 1),
        "p95": round(percentile(ordered, 0.95) * 1000, 1),
        "p99": round(percentile(ordered, 0.99) * 1000, 1),
        "max": round((ordered[-1] if ordered else 0.0) * 1000, 1),
    }


def rate(count: int, first: float, last: float) -> float:
    """Events per second between the first and the last event (0 for fewer than two)."""
    return round(count / (last - first), 1) if count > 1 and last > first else 0.0


def per_second(times: Iterable[float], start: float, weight: int = 1) -> list[int]:
    buckets: list[int] = []
    for moment in times:
        second = max(0, int(moment - start))
        if second >= len(buckets):
            buckets.extend([0] * (second + 1 - len(buckets)))
        buckets[second] += weight
    return buckets


def cpu_per_notification(
    seconds_by_process: Mapping[str, float], notifications: int
) -> dict[str, float]:
    """Milliseconds of CPU per notification of each process (group) and of all of them together
    (`total`): the CPU it used from the start of the load to the end of the drain, divided by the
    notifications completed. Empty when none completed."""
    if notifications <= 0:
        return {}
    figures = {
        name: round(seconds * 1000 / notifications, 3)
        for name, seconds in seconds_by_process.items()
    }
    figures[TOTAL] = round(sum(seconds_by_process.values()) * 1000 / notifications, 3)
    return figures


def cpu_per_notification_by_half(
    progress: Sequence[tuple[int, Mapping[str, float]]],
) -> dict[str, dict[str, float]]:
    """`cpu_per_notification` of the first and of the second half of the notifications completed
    (`progress`: at each sample, the notifications completed so far and each group's CPU seconds
    so far), split at the first sample with half of them done. One run's own halves share the
    machine's state, which back-to-back runs do not always: a cost that grows with history shows
    as a second half dearer than the first. They compare best when the posting keeps pace (a
    `--rate` the pipeline sustains): under a backlog the first half also carries the posting of
    messages completed in the second. Empty with fewer than two samples or nothing completed."""
    if len(progress) < 2 or progress[-1][0] < 2:
        return {}
    total_done, total_seconds = progress[-1]
    start_done, start_seconds = progress[0]
    middle_done, middle_seconds = next(
        (done, seconds) for done, seconds in progress if done >= total_done / 2
    )

    def spent(upto: Mapping[str, float], since: Mapping[str, float]) -> dict[str, float]:
        return {name: upto[name] - since.get(name, 0.0) for name in upto}

    return {
        "first": cpu_per_notification(
            spent(middle_seconds, start_seconds), middle_done - start_done
        ),
        "second": cpu_per_notification(
            spent(total_seconds, middle_seconds), total_done - middle_done
        ),
    }


def big_room_summary(
    *,
    devices: int,
    emails_owed: int,
    pushes_received: int,
    devices_reached: int,
    emails_received: int,
    emails_distinct: int,
    first_push_after_201: float | None,
    last_push_after_201: float | None,
    last_email_after_201: float | None,
    provider_latency: float,
    provider_concurrency: int,
) -> dict[str, Any]:
    """What one message to a big room did: pushes and repeats (the same notification, so the same
    collapse id, received more than once), e-mails, and the last push's time after the 201 next to
    the bound devices / provider concurrency * latency + 1 s (an unbounded provider: latency + 1 s).
    """
    rounds = devices / provider_concurrency if provider_concurrency > 0 else 1.0
    bound = rounds * provider_latency + 1.0
    return {
        "devices": devices,
        "pushes_received": pushes_received,
        "devices_reached": devices_reached,
        "push_repeats": pushes_received - devices_reached,
        "emails_owed": emails_owed,
        "emails_received": emails_received,
        "email_repeats": emails_received - emails_distinct,
        "first_push_after_201_s": _round(first_push_after_201),
        "last_push_after_201_s": _round(last_push_after_201),
        "last_email_after_201_s": _round(last_email_after_201),
        "provider_latency_ms": round(provider_latency * 1000, 1),
        "provider_concurrency": provider_concurrency,
        "bound_s": round(bound, 3),
        "within_bound": last_push_after_201 is not None and last_push_after_201 <= bound,
    }


def lanes_summary(
    *,
    direct_latencies: Sequence[float],
    direct_messages: int,
    room_pushes_owed: int,
    room_pushes_pending_at_last_direct: int,
    provider_latency: float,
    provider_concurrency: int,
) -> dict[str, Any]:
    """How fast direct messages were pushed while a backlog of room chatter drained: the
    latencies from their 201 to their push's acceptance, next to the 250 ms the lanes promise,
    and how much of the backlog still waited when the last direct message was posted (a backlog
    that had drained by then proves nothing)."""
    ordered = sorted(direct_latencies)
    p99 = percentile(ordered, 0.99) if ordered else None
    return {
        "direct_messages": direct_messages,
        "direct_pushes": len(ordered),
        "direct_push_p50_ms": None if not ordered else round(percentile(ordered, 0.5) * 1000, 1),
        "direct_push_p99_ms": None if p99 is None else round(p99 * 1000, 1),
        "direct_push_max_ms": None if not ordered else round(ordered[-1] * 1000, 1),
        # In the order the direct messages were posted: where the slow ones fall.
        "direct_push_ms": [round(latency * 1000, 1) for latency in direct_latencies],
        "room_pushes_owed": room_pushes_owed,
        "room_pushes_pending_at_last_direct": room_pushes_pending_at_last_direct,
        "provider_latency_ms": round(provider_latency * 1000, 1),
        "provider_concurrency": provider_concurrency,
        "target_ms": 250,
        "within_target": p99 is not None and p99 <= 0.25,
    }


def lanes_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    concurrency = summary["provider_concurrency"] or "unbounded"
    return [
        (
            "lanes: provider fake",
            f"{summary['provider_latency_ms']:g} ms per FCM request, at most {concurrency} at "
            "once (others wait)",
        ),
        (
            "lanes: backlog",
            f"{summary['room_pushes_owed']} room pushes, "
            f"{summary['room_pushes_pending_at_last_direct']} still waiting when the last direct "
            "message was posted",
        ),
        (
            "lanes: 201 → direct push (ms)",
            f"p50 {summary['direct_push_p50_ms']}  p99 {summary['direct_push_p99_ms']}  "
            f"max {summary['direct_push_max_ms']}  "
            f"(n={summary['direct_pushes']} of {summary['direct_messages']}); target p99 "
            f"{summary['target_ms']} ms: "
            + ("within" if summary["within_target"] else "NOT within"),
        ),
    ]


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def latency_per_second(
    accepted_at: Sequence[float], latencies: Sequence[float], start: float, fraction: float
) -> list[float | None]:
    """The `fraction` percentile (ms) of the latencies of deliveries accepted in each second."""
    by_second: dict[int, list[float]] = {}
    for accepted, latency in zip(accepted_at, latencies, strict=True):
        by_second.setdefault(max(0, int(accepted - start)), []).append(latency)
    if not by_second:
        return []
    return [
        round(percentile(sorted(by_second[s]), fraction) * 1000, 1) if s in by_second else None
        for s in range(max(by_second) + 1)
    ]


def in_flight(
    accepted_at: Iterable[float], recipients_per_message: int, check: CheckResult, start: float
) -> list[int]:
    """At the end of each second: notifications accepted over HTTP and not yet complete, wherever
    they are (outbox, queues, consumers' prefetch, providers). Lost ones stay in flight."""
    offered = per_second(accepted_at, start, recipients_per_message)
    completed = per_second(check.completed_at, start)
    length = max(len(offered), len(completed))
    offered += [0] * (length - len(offered))
    completed += [0] * (length - len(completed))
    backlog, total = [], 0
    for second in range(length):
        total += offered[second] - completed[second]
        backlog.append(total)
    return backlog


def series(
    *,
    start: float,
    accepted_at: Iterable[float],
    recipients_per_message: int,
    check: CheckResult,
    queues: QueueDepths,
) -> dict[str, Any]:
    """Per-second throughput and latency, and the queue-depth samples, from the start of load."""
    return {
        "offered_notifications_per_s": per_second(accepted_at, start, recipients_per_message),
        "completed_notifications_per_s": per_second(check.completed_at, start),
        "in_flight_notifications": in_flight(accepted_at, recipients_per_message, check, start),
        "push_latency_p50_ms": latency_per_second(
            check.push_accepted_at, check.push_latency, start, 0.50
        ),
        "push_latency_p99_ms": latency_per_second(
            check.push_accepted_at, check.push_latency, start, 0.99
        ),
        "email_latency_p99_ms": latency_per_second(
            check.email_accepted_at, check.email_latency, start, 0.99
        ),
        "queue_depths": [
            {"t": round(moment - start, 2), **depths} for moment, depths in queues.samples
        ],
    }


def table_rows(document: dict[str, Any]) -> list[tuple[str, str]]:
    notifications = document["notifications"]
    checker = document["checker"]
    rows: list[tuple[str, str]] = []
    if document.get("services", {}).get("label"):
        rows.append(("services", document["services"]["label"]))
    rows += [
        ("messages posted (HTTP 201)", f"{document['messages']['posted']}"),
        ("HTTP errors", f"{sum(document['messages']['http_errors'].values())}"),
        ("notifications expected", f"{notifications['expected']}"),
        ("notifications completed", f"{notifications['completed']}"),
        ("target offered notifications/s", f"{notifications['target_offered_per_s'] or 'max'}"),
        ("offered notifications/s", f"{notifications['offered_per_s']}"),
        ("sustained notifications/s", f"{notifications['sustained_per_s']}"),
    ]
    for channel in ("http_post", "push", "email"):
        latency = document["latency_ms"][channel]
        rows.append(
            (
                "POST round trip (ms)"
                if channel == "http_post"
                else f"201 → {channel} accepted (ms)",
                f"p50 {latency['p50']}  p95 {latency['p95']}  p99 {latency['p99']}  "
                f"max {latency['max']}  (n={latency['count']})",
            )
        )
    behind = document["latency_ms"].get("post_behind_schedule")
    if behind is not None and notifications["target_offered_per_s"]:
        rows.append(
            (
                "POST start behind schedule (ms)",
                f"p50 {behind['p50']}  p99 {behind['p99']}  max {behind['max']}",
            )
        )
    cpu = document["cpu"]
    per_notification = cpu.get("per_notification_ms", {})
    rss = document.get("rss_mb", {})
    for name, figures in cpu["processes"].items():
        value = f"{figures['seconds']:.1f} s  {figures['percent_of_one_core']:.0f} %"
        if name in per_notification:
            value += f"  {per_notification[name]:.3f} ms/notification"
        processes = rss.get(name, {}).get("processes", 1)
        rows.append((f"CPU {name}" + (f", {processes} processes" if processes > 1 else ""), value))
    if TOTAL in per_notification:
        rows.append(
            (
                "CPU all of the above",
                f"{sum(f['seconds'] for f in cpu['processes'].values()):.1f} s  "
                f"{per_notification[TOTAL]:.3f} ms/notification",
            )
        )
    halves = cpu.get("per_notification_ms_by_half") or {}
    if halves.get("first") and halves.get("second"):
        rows.append(("CPU per notification, 1st → 2nd half", describe_halves(halves)))
    rows.append(
        (
            "CPU machine busy (2 cores = 200 %)",
            f"{cpu['machine_busy_percent']:.0f} %  (others: {cpu['others_percent']:.0f} %)",
        )
    )
    if rss:
        rows.append(
            (
                "RSS max (MB; start → max)",
                "  ".join(describe_rss(name, figures) for name, figures in rss.items()),
            )
        )
    depths = "  ".join(f"{q} {n}" for q, n in document["queues"]["max_ready"].items() if n)
    rows.append(("max queue depth (ready)", depths or "0"))
    drain = document.get("drain")
    if drain:
        rows.append(("drain", describe_drain(drain)))
    rows.append(
        (
            "checker",
            f"lost {checker['lost']}  not drained {checker.get('not_drained', 0)}  "
            f"duplicates {checker['duplicates']}  unexpected {checker['unexpected']}",
        )
    )
    dead = checker.get("dead_letters")
    if dead:
        rows.append(("dead letters", "  ".join(f"{q} {n}" for q, n in dead.items())))
    autovacuum = document.get("autovacuum")
    if autovacuum:
        rows.append(("PostgreSQL autovacuum", vacuum.describe(autovacuum)))
    calibration = document.get("calibration")
    if calibration:
        rows += list(describe_calibration(calibration))
    return rows


def describe_halves(halves: dict[str, dict[str, float]]) -> str:
    """All processes and PostgreSQL, first half → second half (ms per notification), and the
    ratio."""
    parts = []
    for name, label in ((TOTAL, "all"), (POSTGRES_GROUP, "postgres")):
        first, second = halves["first"].get(name), halves["second"].get(name)
        if first and second is not None:
            parts.append(f"{label} {first:.3f} → {second:.3f} ms (x{second / first:.2f})")
    return "  ".join(parts)


def describe_rss(name: str, figures: dict[str, Any]) -> str:
    """`name first → max`; for a group of several processes (their sums), each one's largest."""
    text = f"{name} {figures['first']:.0f} → {figures['max']:.0f}"
    processes = figures.get("processes", 1)
    if processes > 1:
        text += f" ({processes} processes, largest {figures['max_per_process']:.0f})"
    return text


def describe_drain(drain: dict[str, Any]) -> str:
    delivered = drain.get("delivered_seconds")
    text = {
        "all delivered": "every owed delivery accepted"
        + ("" if delivered is None else f" {delivered:.1f} s after the last post"),
        "settled": "pipeline settled (nothing in any queue or outbox) with deliveries missing",
        "stalled": f"no delivery for {drain['stall_seconds']:g} s while work was still queued",
        "bound": f"drain bound of {drain['bound_seconds']:g} s reached",
    }.get(drain["reason"], drain["reason"])
    settled = "settled" if drain["settled"] else "not settled"
    return f"{text}; drain ended {drain['seconds']:.1f} s after the last post, {settled}"


def big_room_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    latency = summary["provider_latency_ms"]
    concurrency = summary["provider_concurrency"] or "unbounded"
    first_push = summary["first_push_after_201_s"]
    last_push = summary["last_push_after_201_s"]
    last_email = summary["last_email_after_201_s"]
    return [
        (
            "big room: provider fake",
            f"{latency:g} ms per FCM request, at most {concurrency} at once (others wait)",
        ),
        (
            "big room: pushes received",
            f"{summary['pushes_received']} for {summary['devices']} devices  "
            f"(devices reached {summary['devices_reached']}; repeats {summary['push_repeats']}, "
            "i.e. pushes of a collapse id already received)",
        ),
        (
            "big room: e-mails received",
            f"{summary['emails_received']} for {summary['emails_owed']}  "
            f"(repeats {summary['email_repeats']})",
        ),
        (
            "big room: last push after the 201",
            ("none" if last_push is None else f"{last_push:.2f} s")
            + ("" if first_push is None else f" (first {first_push:.2f} s)")
            + f"  bound {summary['bound_s']:.2f} s (devices / concurrency * latency + 1 s): "
            + ("within" if summary["within_bound"] else "NOT within"),
        ),
        (
            "big room: last e-mail after the 201",
            "none" if last_email is None else f"{last_email:.2f} s",
        ),
    ]


def print_table(document: dict[str, Any]) -> None:
    rows = table_rows(document)
    rows += loop_lag.rows(document.get("event_loop_lag", {}))
    if document.get("lanes"):
        rows += lanes_rows(document["lanes"])
        if document["lanes"].get("timelines"):
            rows += stages.rows(document["lanes"]["timelines"])
    if document.get("big_room"):
        rows += big_room_rows(document["big_room"])
        stats = document.get("provider_stats", {}).get("fcm")
        if stats:
            rows.append(
                (
                    "big room: at the FCM fake",
                    f"{stats['send_requests']} sends over {stats['connections']} connections, "
                    f"at most {stats['max_in_progress']} in progress and "
                    f"{stats['max_waiting']} waiting at once",
                )
            )
    width = max(len(label) for label, _ in rows)
    print()
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")
    print()


def write_json(document: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")


def prepare_chart() -> None:
    """Import matplotlib (several seconds on a busy machine) ahead of `write_chart`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot


def write_chart(document: dict[str, Any], path: Path) -> None:
    """Throughput, push latency and queue depths over time, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = document["series"]
    figure, (throughput, latency, depth) = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    offered = data["offered_notifications_per_s"]
    completed = data["completed_notifications_per_s"]
    throughput.plot(range(len(offered)), offered, label="offered (HTTP 201 x recipients)")
    throughput.plot(range(len(completed)), completed, label="completed (ledger + providers)")
    throughput.set_ylabel("notifications/s")
    throughput.legend(loc="upper right")
    throughput.set_title(document["title"])
    for key, label in (
        ("push_latency_p50_ms", "push p50"),
        ("push_latency_p99_ms", "push p99"),
        ("email_latency_p99_ms", "email p99"),
    ):
        values = [math.nan if v is None else v for v in data[key]]
        latency.plot(range(len(values)), values, label=label)
    latency.set_ylabel("201 → accepted (ms)")
    latency.set_yscale("log")
    latency.legend(loc="upper right")
    backlog = data["in_flight_notifications"]
    depth.plot(range(len(backlog)), backlog, label="in flight (accepted, not complete)", color="k")
    samples = data["queue_depths"]
    times = [sample["t"] for sample in samples]
    for queue in document["queues"]["max_ready"]:
        if document["queues"]["max_ready"][queue]:
            depth.plot(times, [sample.get(queue, 0) for sample in samples], label=queue)
    depth.set_ylabel("notifications / ready messages")
    depth.set_xlabel("seconds since load start")
    if depth.get_legend_handles_labels()[0]:
        depth.legend(loc="upper right")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
