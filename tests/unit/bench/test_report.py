"""The benchmark's arithmetic: CPU per notification, the big-room bound, the comparison."""

from __future__ import annotations

import math
from typing import Any

import pytest

from bench import loop_lag
from bench.compare import comparison
from bench.monitor import VhostQueue
from bench.report import (
    TOTAL,
    big_room_rows,
    big_room_summary,
    cpu_per_notification,
    cpu_per_notification_by_half,
    describe_halves,
    lanes_rows,
    lanes_summary,
    table_rows,
)
from bench.run import Probe
from bench.stages import STAGES, Timeline, summarize
from bench.stages import rows as stage_rows


def test_cpu_per_notification_is_each_process_and_the_total_in_ms() -> None:
    figures = cpu_per_notification({"router": 2.0, "push-sender": 1.0, "rabbitmq": 0.5}, 1000)
    assert figures == {"router": 2.0, "push-sender": 1.0, "rabbitmq": 0.5, TOTAL: 3.5}
    assert cpu_per_notification({"router": 1.0}, 0) == {}


def test_cpu_per_notification_by_half_splits_at_the_sample_with_half_done() -> None:
    # (completed so far, CPU seconds so far): the second half costs twice the first in postgres
    progress = [
        (0, {"router": 1.0, "postgres": 0.0}),
        (400, {"router": 2.0, "postgres": 0.4}),
        (1000, {"router": 3.0, "postgres": 1.0}),  # the first sample with half done
        (2000, {"router": 4.0, "postgres": 3.0}),
    ]
    halves = cpu_per_notification_by_half(progress)
    assert halves["first"] == {"router": 2.0, "postgres": 1.0, TOTAL: 3.0}
    assert halves["second"] == {"router": 1.0, "postgres": 2.0, TOTAL: 3.0}
    # A group first seen after the start counts from zero.
    late = cpu_per_notification_by_half([(0, {}), (10, {"fakes": 0.01}), (20, {"fakes": 0.03})])
    assert late["first"] == {"fakes": 1.0, TOTAL: 1.0}
    assert late["second"] == {"fakes": 2.0, TOTAL: 2.0}
    assert cpu_per_notification_by_half(progress[:1]) == {}
    assert cpu_per_notification_by_half([(0, {"router": 1.0}), (0, {"router": 2.0})]) == {}


def test_the_halves_are_described_with_their_ratio() -> None:
    halves = {
        "first": {TOTAL: 4.0, "postgres (our backends)": 1.0},
        "second": {TOTAL: 5.0, "postgres (our backends)": 2.0},
    }
    assert describe_halves(halves) == (
        "all 4.000 → 5.000 ms (x1.25)  postgres 1.000 → 2.000 ms (x2.00)"
    )


def summary(**changes: Any) -> dict[str, Any]:
    arguments: dict[str, Any] = {
        "devices": 999,
        "emails_owed": 999,
        "pushes_received": 999,
        "devices_reached": 999,
        "emails_received": 999,
        "emails_distinct": 999,
        "first_push_after_201": 0.4,
        "last_push_after_201": 1.9,
        "last_email_after_201": 20.0,
        "provider_latency": 0.05,
        "provider_concurrency": 50,
        **changes,
    }
    return big_room_summary(**arguments)


def test_big_room_bound_is_devices_over_concurrency_times_latency_plus_one_second() -> None:
    within = summary()
    assert within["bound_s"] == pytest.approx(999 / 50 * 0.05 + 1)
    assert within["within_bound"]
    assert (within["push_repeats"], within["email_repeats"]) == (0, 0)

    late = summary(pushes_received=1121, last_push_after_201=78.0, emails_received=1000)
    assert not late["within_bound"]
    assert (late["push_repeats"], late["email_repeats"]) == (122, 1)
    assert summary(provider_concurrency=0)["bound_s"] == pytest.approx(1.05)
    assert not summary(last_push_after_201=None)["within_bound"]


def test_lanes_are_within_target_when_the_direct_pushes_p99_is_250_ms_at_most() -> None:
    def lanes(latencies: list[float]) -> dict[str, Any]:
        return lanes_summary(
            direct_latencies=latencies,
            direct_messages=50,
            room_pushes_owed=19980,
            room_pushes_pending_at_last_direct=12000,
            provider_latency=0.05,
            provider_concurrency=50,
        )

    fast = lanes([0.1] * 49 + [0.25])
    slow = lanes([0.1] * 49 + [0.26])

    assert (fast["direct_push_p50_ms"], fast["direct_push_p99_ms"]) == (100.0, 250.0)
    assert fast["within_target"]
    assert not slow["within_target"]
    assert not lanes([])["within_target"]
    assert dict(lanes_rows(fast))["lanes: 201 → direct push (ms)"].endswith(": within")
    assert dict(lanes_rows(slow))["lanes: 201 → direct push (ms)"].endswith(": NOT within")


def run_document(sustained: float, cpu_total: float) -> dict[str, Any]:
    return {
        "notifications": {"sustained_per_s": sustained},
        "cpu": {"per_notification_ms": {TOTAL: cpu_total}},
    }


def test_comparison_takes_medians_per_side_and_the_ratio_new_over_old() -> None:
    rows = {
        row["figure"]: row
        for row in comparison(
            [run_document(100, 10.0), run_document(120, 12.0)],
            [run_document(500, 2.0), run_document(540, 2.2)],
        )
    }
    sustained = rows["sustained notifications/s"]
    assert (sustained["old_median"], sustained["new_median"]) == (110, 520)
    assert sustained["ratio_new_over_old"] == pytest.approx(520 / 110, abs=1e-3)
    cpu = rows["CPU per notification, all (ms)"]
    assert cpu["ratio_new_over_old"] == pytest.approx(0.191, abs=1e-3)
    assert rows["calibration: Python loop (ms)"]["ratio_new_over_old"] is None


def test_the_pipeline_settled_only_with_nothing_queued_unacked_or_in_the_outbox() -> None:
    empty = (VhostQueue("push_notifications", 0, 0), VhostQueue("push_notifications.dlq", 3, 0))
    assert Probe(empty, outbox_pending=0).settled  # dead letters do not come back by themselves
    assert Probe(empty, outbox_pending=0).dead_letters() == {"push_notifications.dlq": 3}
    assert not Probe(empty, outbox_pending=1).settled
    assert not Probe(empty, outbox_pending=None).settled  # unknown: cannot prove anything
    unacked = (VhostQueue("delivery_reports", 0, 4),)
    assert not Probe(unacked, outbox_pending=0).settled
    waiting = (VhostQueue("push_notifications.wait.25000ms", 1, 0),)
    assert not Probe(waiting, outbox_pending=0).settled
    assert not Probe((), outbox_pending=0, queues_known=False).settled


def test_the_table_says_not_drained_apart_from_lost_and_cpu_per_notification() -> None:
    latency = {"count": 1, "p50": 1.0, "p95": 1.0, "p99": 1.0, "max": 1.0}
    document: dict[str, Any] = {
        "messages": {"posted": 10, "http_errors": {}},
        "notifications": {
            "expected": 90,
            "completed": 60,
            "target_offered_per_s": 0,
            "offered_per_s": 100.0,
            "sustained_per_s": 50.0,
        },
        "latency_ms": {"http_post": latency, "push": latency, "email": latency},
        "cpu": {
            "processes": {"router": {"seconds": 0.6, "percent_of_one_core": 30.0}},
            "per_notification_ms": cpu_per_notification({"router": 0.6}, 60),
            "machine_busy_percent": 150.0,
            "others_percent": 10.0,
        },
        "rss_mb": {"router": {"first": 90.0, "max": 95.0, "last": 94.0}},
        "queues": {"max_ready": {"push_notifications": 0}},
        "drain": {
            "reason": "bound",
            "seconds": 900.0,
            "settled": False,
            "bound_seconds": 900.0,
            "stall_seconds": 120.0,
        },
        "checker": {
            "lost": 0,
            "not_drained": 30,
            "duplicates": 0,
            "unexpected": 0,
            "dead_letters": {},
        },
        "calibration": {
            "python_loop_ms": 150.0,
            "amqp_messages_per_s": 900.0,
            "amqp_messages": 1800,
        },
        "big_room": summary(),
    }
    rows = dict(table_rows(document))
    assert rows["checker"] == "lost 0  not drained 30  duplicates 0  unexpected 0"
    assert rows["CPU router"].endswith("10.000 ms/notification")
    assert rows["CPU all of the above"] == "0.6 s  10.000 ms/notification"
    assert rows["drain"].startswith("drain bound of 900 s reached")
    assert rows["RSS max (MB; start → max)"] == "router 90 → 95"
    assert rows["calibration: aio-pika loop"].startswith("900 messages/s")
    big_room = dict(big_room_rows(document["big_room"]))
    assert "within" in big_room["big room: last push after the 201"]


def test_a_timeline_summary_gives_each_stage_its_offset_and_its_step_and_the_slowest_messages() -> (
    None
):
    fast = Timeline(
        0,
        {"published": 0.01, "decided": 0.02, "stored": 0.03, "finished": 0.09, "accepted": 0.09},
    )
    slow = Timeline(
        1,
        {"published": 0.01, "decided": 0.2, "stored": 0.21, "finished": 0.27, "accepted": 0.28},
    )
    unknown = Timeline(2, dict.fromkeys(STAGES) | {"accepted": 0.05})
    summary = summarize([fast, slow, unknown], slowest=1)
    decided = summary["stages"]["decided"]
    assert decided == {
        "after_201_p50_ms": 110.0,
        "after_201_max_ms": 200.0,
        "step_p50_ms": 100.0,
        "step_max_ms": 190.0,
    }
    # Without rows of its own, a message's acceptance is a step from the 201.
    assert summary["stages"]["accepted"]["step_max_ms"] == 50.0
    assert summary["slowest"] == [
        {"index": 1, "published": 10.0, "decided": 200.0, "stored": 210.0}
        | {"finished": 270.0, "accepted": 280.0}
    ]
    assert [label for label, _ in stage_rows(summary)][-1] == "slow: message 1"


def test_the_loop_lag_summary_is_the_loads_samples_by_their_buckets() -> None:
    before = {"router": {0.001: 90.0, 0.01: 100.0, 0.05: 100.0, 0.1: 100.0, math.inf: 100.0}}
    after = {"router": {0.001: 140.0, 0.01: 195.0, 0.05: 198.0, 0.1: 199.0, math.inf: 200.0}}

    summary = loop_lag.summarize(before, after)

    # 100 samples during the load: 50 under 1 ms, 95 under 10 ms, one beyond 100 ms.
    assert summary == {
        "router": {
            "samples": 100,
            "p50_le_ms": 1.0,
            "p99_le_ms": 100.0,
            "max_le_ms": "∞",
            "slow_samples": 2,
        }
    }
    assert loop_lag.rows(summary)[0][0] == "event-loop lag router"
