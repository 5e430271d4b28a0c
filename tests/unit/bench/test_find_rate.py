"""`--find-rate`: a run's verdict, the search's next rate and its answer, and the command line."""

from __future__ import annotations

import math
from typing import Any

import pytest

from bench.__main__ import parse
from bench.find_rate import MIN_RATE, STEP, Step, bracket, judge, next_rate
from bench.report import TOTAL


def document(
    *, offered: float = 1000.0, sustained: float = 995.0, p50: float = 80.0, p99: float = 200.0
) -> dict[str, Any]:
    return {
        "notifications": {"offered_per_s": offered, "sustained_per_s": sustained},
        "latency_ms": {"push": {"p50": p50, "p99": p99}},
        "cpu": {
            "per_notification_ms": {TOTAL: 1.8},
            "machine_busy_percent": 180.0,
            "others_percent": 4.0,
        },
    }


def step(rate: float, *, passed: bool) -> Step:
    return judge(rate, document(p99=100.0 if passed else 900.0), 0, p99_bound_ms=250)


def test_a_run_within_the_bound_that_kept_up_passes() -> None:
    verdict = judge(1000, document(), 0, p99_bound_ms=250)

    assert verdict.passed
    assert verdict.why == ""
    assert (verdict.offered, verdict.sustained, verdict.push_p99_ms) == (1000, 995, 200)
    assert (verdict.cpu_ms, verdict.busy_percent, verdict.others_percent) == (1.8, 180, 4)


@pytest.mark.parametrize(
    ("figures", "status", "why"),
    [
        ({"p99": 251.0}, 0, "p99 251 ms > 250 ms"),
        ({"sustained": 900.0}, 0, "sustained 900 of 1000 offered"),
        ({}, 1, "lost, repeated or unexpected notifications"),
        ({}, 2, "not drained"),
    ],
)
def test_a_slow_backlogged_lossy_or_undrained_run_fails(
    figures: dict[str, float], status: int, why: str
) -> None:
    verdict = judge(1000, document(**figures), status, p99_bound_ms=250)

    assert not verdict.passed
    assert verdict.why == why


def test_a_run_without_figures_fails_rather_than_passes() -> None:
    verdict = judge(1000, {}, 0, p99_bound_ms=250)

    assert not verdict.passed
    assert verdict.push_p99_ms is None
    assert verdict.why == "sustained n/a of n/a offered; p99 n/a ms > 250 ms"


def test_the_search_climbs_until_a_failure_then_narrows_the_gap() -> None:
    steps = [step(1000, passed=True)]
    assert next_rate(steps) == 1000 * STEP

    steps.append(step(1250, passed=False))
    assert next_rate(steps) == round(math.sqrt(1000 * 1250))  # 1118

    steps.append(step(1118, passed=True))
    assert next_rate(steps) == round(math.sqrt(1118 * 1250))  # 1182

    steps.append(step(1182, passed=False))  # 1182 / 1118 < 1.06: still above 5 %
    assert next_rate(steps) == round(math.sqrt(1118 * 1182))

    steps.append(step(1150, passed=True))  # 1182 / 1150 < 1.05: done
    assert next_rate(steps) is None
    assert bracket(steps) == (1150, 1182)


def test_the_search_descends_until_a_pass() -> None:
    steps = [step(1000, passed=False)]
    assert next_rate(steps) == 1000 / STEP

    steps.append(step(800, passed=False))
    assert next_rate(steps) == 640
    assert bracket(steps) == (None, 800)


def test_a_pass_above_a_failure_does_not_move_the_answer_up() -> None:
    steps = [step(1000, passed=True), step(1250, passed=False), step(1118, passed=False)]
    steps.append(step(1250 * STEP, passed=True))  # noise near the limit, not a higher answer

    assert bracket(steps) == (1000, 1118)
    assert next_rate(steps) == round(math.sqrt(1000 * 1118))


def test_the_search_stops_at_the_floor_or_at_a_rate_it_already_ran() -> None:
    assert next_rate([step(MIN_RATE, passed=False)]) is None
    assert next_rate([step(10, passed=True), step(11, passed=False)]) is None  # middle: 10
    with pytest.raises(ValueError, match="first run"):
        next_rate([])


def test_the_command_line_starts_at_1000_per_s_and_refuses_other_scenarios() -> None:
    options = parse(["--find-rate", "--duration", "30"])

    assert options.find_rate
    assert (options.rate, options.p99_bound_ms, options.find_steps) == (1000, 250, 6)
    assert parse(["--find-rate", "--rate", "600", "--p99-bound-ms", "100"]).p99_bound_ms == 100
    for refused in (["--scenario", "lanes"], ["--compare", "HEAD"], ["--find-steps", "0"]):
        with pytest.raises(SystemExit):
            parse(["--find-rate", *refused])
