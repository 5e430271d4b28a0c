"""A short run of the benchmark command, so that it keeps working: it calibrates, starts the four
services on a private vhost and databases, posts a few messages and checks every notification
arrived once and the pipeline settled. The figures it measures are not asserted (timed assertions
would be flaky on shared CI), only that they are there."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_bench(*args: str, out: Path, timeout: float = 150) -> subprocess.CompletedProcess[str]:
    """`python -m bench ARGS --out OUT` from the repository's root; fails the test, with the
    output's tail, when the command does not exit 0."""
    completed = subprocess.run(
        [sys.executable, "-m", "bench", *args, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return completed


def test_a_small_benchmark_run_completes_with_nothing_lost_or_duplicated(tmp_path: Path) -> None:
    completed = run_bench(
        *("--count", "20", "--rooms", "2", "--rate", "90", "--duration", "30"),
        *("--drain-timeout", "45"),
        out=tmp_path,
    )

    [report_file] = tmp_path.glob("*.json")
    report = json.loads(report_file.read_text())
    assert {
        "command",
        "machine",
        "config",
        "messages",
        "notifications",
        "latency_ms",
        "cpu",
        "queues",
        "checker",
        "series",
        "chart",
        "calibration",
        "rss_mb",
        "drain",
    } <= report.keys()
    assert report["messages"]["posted"] == 20
    assert report["notifications"]["expected"] == 20 * 9
    assert report["notifications"]["completed"] == 20 * 9
    assert report["checker"]["lost"] == 0
    assert report["checker"]["not_drained"] == 0
    assert report["checker"]["duplicates"] == 0
    assert report["checker"]["unexpected"] == 0
    assert report["latency_ms"]["push"]["count"] == 20 * 9
    services = {"message-service", "notification-router", "push-sender", "email-sender"}
    assert set(report["cpu"]["processes"]) >= services
    assert set(report["cpu"]["per_notification_ms"]) >= {*services, "total"}
    assert set(report["rss_mb"]) >= services
    assert (report["drain"]["reason"], report["drain"]["settled"]) == ("all delivered", True)
    assert report["calibration"]["python_loop_ms"] > 0
    assert report["calibration"]["amqp_messages_per_s"] > 0
    assert report["calibration"]["postgres_commits_per_s"] > 0
    assert "ms/notification" in completed.stdout
    assert "calibration: aio-pika loop" in completed.stdout
    assert "calibration: PostgreSQL loop" in completed.stdout
    assert Path(report["chart"]).stat().st_size > 0
    assert report["service_exit_codes"] == dict.fromkeys(
        ["message-service", "notification-router", "push-sender", "email-sender"], 0
    )


def test_a_small_chat_run_decides_every_recipient_and_sends_what_it_decided(
    tmp_path: Path,
) -> None:
    run_bench(
        *("--scenario", "chat", "--count", "60", "--rooms", "2", "--drain-timeout", "45"),
        out=tmp_path,
    )

    [report_file] = tmp_path.glob("*.json")
    figures = json.loads(report_file.read_text())["chat"]
    assert figures["messages"] == 60
    assert figures["streams"] == 4  # one member in five of two rooms of ten
    assert figures["stream_failures"] == 0
    # Every room message decided for its 9 recipients, every direct one for 1.
    directs = figures["triggers"].get("dm", 0)
    assert figures["decisions"] == (60 - directs) * 9 + directs
    assert figures["sends"] == figures["deliveries_decided"] == figures["accepted"]
    assert (figures["lost"], figures["duplicates"], figures["unexpected"]) == (0, 0, 0)
    assert figures["not_delivered_in_ledger"] == 0


def test_a_short_rate_search_runs_each_step_and_reports_its_verdicts(tmp_path: Path) -> None:
    completed = run_bench(
        *("--find-rate", "--rate", "45", "--duration", "2", "--find-steps", "2"),
        *("--rooms", "2", "--no-calibration", "--drain-timeout", "45"),
        out=tmp_path,
        timeout=300,
    )

    [search_file] = tmp_path.glob("*-find-rate.json")
    search = json.loads(search_file.read_text())
    first, second = search["steps"]
    assert first["rate"] == 45
    # Up by 1.25x after a pass, down after a failure (whether 45/s passes is the machine's).
    assert second["rate"] == (56 if first["passed"] else 36)
    for step in (first, second):
        assert step["status"] == 0
        assert step["sustained"] > 0
        assert step["passed"] == (step["why"] == "")
    passed = [step["rate"] for step in (first, second) if step["passed"]]
    failed = [step["rate"] for step in (first, second) if not step["passed"]]
    below_failures = [rate for rate in passed if not failed or rate < min(failed)]
    assert search["carried_per_s"] == max(below_failures, default=None)
    assert search["lowest_failure_per_s"] == min(failed, default=None)
    assert "find-rate: the highest offered rate" in completed.stdout
