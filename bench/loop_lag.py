"""Each service's event-loop lag during the load: `herald_event_loop_lag_seconds` (a timer due
every 50 ms, observed late by however long other work held the loop) read from every process's
`/metrics` before and after the load, the difference summarised by its buckets.

A bucket's upper bound is all a histogram says of its samples, so a figure here reads "at most":
"p99 ≤ 25 ms" means 99 % of the samples were 25 ms late or less.
"""

from __future__ import annotations

import asyncio
import math
import urllib.request
from collections.abc import Mapping
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

SERIES = "herald_event_loop_lag_seconds"
SLOW_S = 0.05  # a sample later than this is counted apart: more than a timer period lost

Buckets = dict[float, float]  # upper bound (s) → cumulative count


def _read(url: str) -> Buckets:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:  # noqa: S310 - our own
        text = response.read().decode()
    buckets: Buckets = {}
    for family in text_string_to_metric_families(text):
        if family.name != SERIES:
            continue
        for sample in family.samples:
            if sample.name == f"{SERIES}_bucket":
                buckets[float(sample.labels["le"])] = sample.value
    return buckets


async def read_all(urls: Mapping[str, str]) -> dict[str, Buckets]:
    """Every process's buckets now (a process that does not answer is left out)."""

    async def one(url: str) -> Buckets | None:
        try:
            return await asyncio.to_thread(_read, url)
        except OSError:
            return None

    read = await asyncio.gather(*(one(url) for url in urls.values()))
    return {name: buckets for name, buckets in zip(urls, read, strict=True) if buckets}


def summarize(before: Mapping[str, Buckets], after: Mapping[str, Buckets]) -> dict[str, Any]:
    """Per process: samples taken during the load, the bucket bounds of their p50, p99 and
    worst, and how many were later than `SLOW_S`."""
    summary = {}
    for name, end in after.items():
        start = before.get(name, {})
        counts = sorted((bound, end[bound] - start.get(bound, 0.0)) for bound in end)
        total = counts[-1][1] if counts else 0.0
        if total <= 0:
            continue

        under_slow = max((count for bound, count in counts if bound <= SLOW_S), default=0.0)
        summary[name] = {
            "samples": int(total),
            "p50_le_ms": _ms(_bound_of(counts, 0.5 * total)),
            "p99_le_ms": _ms(_bound_of(counts, 0.99 * total)),
            "max_le_ms": _ms(_bound_of(counts, total)),
            "slow_samples": int(total - under_slow),
        }
    return summary


def rows(summary: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [
        (
            f"event-loop lag {name}",
            f"p50 ≤ {figures['p50_le_ms']}  p99 ≤ {figures['p99_le_ms']}  "
            f"max ≤ {figures['max_le_ms']} ms; {figures['slow_samples']} of "
            f"{figures['samples']} samples over {SLOW_S * 1000:g} ms late",
        )
        for name, figures in summary.items()
    ]


def _bound_of(counts: list[tuple[float, float]], rank: float) -> float:
    """The upper bound of the first bucket holding `rank` samples."""
    return next(bound for bound, count in counts if count >= rank)


def _ms(bound: float) -> float | str:
    return "∞" if math.isinf(bound) else round(bound * 1000, 1)
