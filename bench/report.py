"""The benchmark's figures: summary statistics, per-second series, the printed table, the JSON
document and the PNG chart."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from bench.checker import CheckResult
from bench.monitor import QueueDepths


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


def latency_per_second(
    samples: Iterable[tuple[float, float]], start: float, fraction: float
) -> list[float | None]:
    """The `fraction` percentile (ms) of the latencies of deliveries accepted in each second."""
    by_second: dict[int, list[float]] = {}
    for accepted_at, latency in samples:
        by_second.setdefault(max(0, int(accepted_at - start)), []).append(latency)
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
        "push_latency_p50_ms": latency_per_second(check.push_latency, start, 0.50),
        "push_latency_p99_ms": latency_per_second(check.push_latency, start, 0.99),
        "email_latency_p99_ms": latency_per_second(check.email_latency, start, 0.99),
        "queue_depths": [
            {"t": round(moment - start, 2), **depths} for moment, depths in queues.samples
        ],
    }


def print_table(document: dict[str, Any]) -> None:
    notifications = document["notifications"]
    checker = document["checker"]
    rows: list[tuple[str, str]] = [
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
    cpu = document["cpu"]
    for name, figures in cpu["processes"].items():
        rows.append(
            (f"CPU {name}", f"{figures['seconds']:.1f} s  {figures['percent_of_one_core']:.0f} %")
        )
    rows.append(
        (
            "CPU machine busy (2 cores = 200 %)",
            f"{cpu['machine_busy_percent']:.0f} %  (others: {cpu['others_percent']:.0f} %)",
        )
    )
    depths = "  ".join(f"{q} {n}" for q, n in document["queues"]["max_ready"].items() if n)
    rows.append(("max queue depth (ready)", depths or "0"))
    rows.append(
        (
            "checker",
            f"lost {checker['lost']}  duplicates {checker['duplicates']}  "
            f"unexpected {checker['unexpected']}",
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
