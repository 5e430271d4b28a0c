"""`--find-rate`: the highest offered rate this machine carries within a latency bound.

Paced runs of the default workload, each of `--duration` seconds with the services started
afresh, the rate moved by a search: up by `STEP` after a pass and down by it after a failure
until both were seen, then the geometric middle of the highest pass below the lowest failure and
that failure, until the two are within `PRECISION` of each other or `--find-steps` runs are done.

A run passes when its checker found nothing lost, repeated, unexpected or left undrained, it
sustained at least `SUSTAINED_SHARE` of what it offered (a growing backlog fails it even when
the p99 of what did arrive looks fine), and its 201 → push p99 is within `--p99-bound-ms`.

Near a machine's limit the p99 of one rate swings two- to threefold from run to run (every
stage queues a little, and a stage that falls behind for a second builds a queue the others then
wait on), so the search can meet a pass above a failure. It then keeps to the lowest failure,
reports the pass above it as such, and its answer is a run's, not a distribution's: repeat it
to see the spread.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from bench.report import TOTAL, figure_at, write_json

if TYPE_CHECKING:
    from bench.run import Options

STEP = 1.25  # the factor between runs until a pass and a failure bracket the answer
PRECISION = 0.05  # stop when the lowest failure is within 5 % above the highest pass
SUSTAINED_SHARE = 0.98
MIN_RATE = 10.0  # notifications/s: below this there is nothing left to find


@dataclass(frozen=True)
class Step:
    """One run of the search and its verdict."""

    rate: float  # offered notifications/s asked for
    # As measured; None where the run's document has no such figure.
    offered: float | None
    sustained: float | None
    push_p50_ms: float | None
    push_p99_ms: float | None
    cpu_ms: float | None  # CPU per notification, all processes
    busy_percent: float | None
    others_percent: float | None
    status: int  # the run's exit status: 0 complete, 1 lost/duplicated/unexpected, 2 not drained
    passed: bool
    why: str  # what failed it ("" when it passed)


def _text(figure: float | None, style: str = "{:g}") -> str:
    return "n/a" if figure is None else style.format(figure)


def judge(rate: float, document: dict[str, Any], status: int, *, p99_bound_ms: float) -> Step:
    """The verdict of the run at `rate` whose document and exit status are given."""
    offered = figure_at(document, ("notifications", "offered_per_s"))
    sustained = figure_at(document, ("notifications", "sustained_per_s"))
    p99 = figure_at(document, ("latency_ms", "push", "p99"))
    reasons = []
    if status == 1:
        reasons.append("lost, repeated or unexpected notifications")
    elif status != 0:
        reasons.append("not drained")
    if sustained is None or offered is None or sustained < SUSTAINED_SHARE * offered:
        reasons.append(f"sustained {_text(sustained)} of {_text(offered)} offered")
    if p99 is None or p99 > p99_bound_ms:
        reasons.append(f"p99 {_text(p99)} ms > {p99_bound_ms:g} ms")
    return Step(
        rate=rate,
        offered=offered,
        sustained=sustained,
        push_p50_ms=figure_at(document, ("latency_ms", "push", "p50")),
        push_p99_ms=p99,
        cpu_ms=figure_at(document, ("cpu", "per_notification_ms", TOTAL)),
        busy_percent=figure_at(document, ("cpu", "machine_busy_percent")),
        others_percent=figure_at(document, ("cpu", "others_percent")),
        status=status,
        passed=not reasons,
        why="; ".join(reasons),
    )


def bracket(steps: Sequence[Step]) -> tuple[float | None, float | None]:
    """(the highest passing rate below the lowest failing one, the lowest failing rate)."""
    lowest_failure = min((step.rate for step in steps if not step.passed), default=None)
    highest_pass = max(
        (
            step.rate
            for step in steps
            if step.passed and (lowest_failure is None or step.rate < lowest_failure)
        ),
        default=None,
    )
    return highest_pass, lowest_failure


def next_rate(steps: Sequence[Step], *, precision: float = PRECISION) -> float | None:
    """The rate to run next after `steps` (at least one), or None when the search is done."""
    if not steps:
        raise ValueError("the search starts from a first run")
    passed, failed = bracket(steps)
    if failed is None:  # every run passed: go higher
        candidate = max(step.rate for step in steps) * STEP
    elif passed is None:  # nothing passed below the lowest failure: go lower
        candidate = failed / STEP
    elif failed <= passed * (1 + precision):
        return None
    else:
        candidate = math.sqrt(passed * failed)
    candidate = float(round(candidate))
    if candidate < MIN_RATE or any(step.rate == candidate for step in steps):
        return None
    return candidate


def _print_steps(steps: Sequence[Step], *, p99_bound_ms: float) -> None:
    passed, failed = bracket(steps)
    print()
    print(f"  find-rate: the highest offered rate with 201 → push p99 ≤ {p99_bound_ms:g} ms")
    table = [("asked/s", "offered/s", "sustained/s", "push p50/p99 ms", "CPU ms", "busy", "")]
    for step in steps:
        verdict = "pass" if step.passed else f"fail: {step.why}"
        if step.passed and failed is not None and step.rate > failed:
            verdict += " (above a failure: the spread near the limit)"
        table.append(
            (
                f"{step.rate:g}",
                _text(step.offered),
                _text(step.sustained),
                f"{_text(step.push_p50_ms)} / {_text(step.push_p99_ms)}",
                _text(step.cpu_ms, "{:.3f}"),
                f"{_text(step.busy_percent, '{:.0f}')} % "
                f"({_text(step.others_percent, '{:.0f}')} % others)",
                verdict,
            )
        )
    widths = [max(len(row[column]) for row in table) for column in range(len(table[0]))]
    for row in table:
        print("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    if passed is None:
        print(f"  no rate passed (the lowest tried: {failed:g}/s)")
    elif failed is None:
        print(f"  every rate passed, up to {passed:g}/s (more steps would go higher)")
    else:
        print(f"  carried: {passed:g} notifications/s; the lowest failure: {failed:g}/s")
    print()


async def run_find_rate(options: Options) -> int:
    """The search; exit status 1 if any run lost, repeated or made up a notification, else 0."""
    from bench.run import run_once

    recipients = options.room_size - 1
    steps: list[Step] = []
    rate: float | None = options.rate
    while rate is not None and len(steps) < options.find_steps:
        count = math.ceil(rate * options.duration / recipients)
        print(f"[bench] find-rate: run {len(steps) + 1}: {rate:g} notifications/s", flush=True)
        document, status = await run_once(
            replace(options, rate=rate, count=count), label=f"find-rate {rate:g}/s"
        )
        steps.append(judge(rate, document, status, p99_bound_ms=options.p99_bound_ms))
        rate = next_rate(steps)
    _print_steps(steps, p99_bound_ms=options.p99_bound_ms)
    passed, failed = bracket(steps)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = options.out / f"{stamp}-find-rate.json"
    write_json(
        {
            "command": options.command,
            "p99_bound_ms": options.p99_bound_ms,
            "duration_s": options.duration,
            "steps": [asdict(step) for step in steps],
            "carried_per_s": passed,
            "lowest_failure_per_s": failed,
        },
        path,
    )
    print(f"[bench] find-rate JSON: {path}", flush=True)
    return 1 if any(step.status == 1 for step in steps) else 0
