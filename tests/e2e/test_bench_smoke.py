"""A short run of the benchmark command, so that it keeps working: it starts the four services on
a private vhost and databases, posts a few messages and checks every notification arrived once.
The figures it measures are not asserted (timed assertions would be flaky on shared CI)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_small_benchmark_run_completes_with_nothing_lost_or_duplicated(tmp_path: Path) -> None:
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--count",
            "20",
            "--rooms",
            "2",
            "--rate",
            "90",
            "--duration",
            "30",
            "--drain-timeout",
            "45",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]

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
    } <= report.keys()
    assert report["messages"]["posted"] == 20
    assert report["notifications"]["expected"] == 20 * 9
    assert report["notifications"]["completed"] == 20 * 9
    assert report["checker"]["lost"] == 0
    assert report["checker"]["duplicates"] == 0
    assert report["checker"]["unexpected"] == 0
    assert report["latency_ms"]["push"]["count"] == 20 * 9
    assert set(report["cpu"]["processes"]) >= {
        "message-service",
        "notification-router",
        "push-sender",
        "email-sender",
    }
    assert Path(report["chart"]).stat().st_size > 0
    assert report["service_exit_codes"] == dict.fromkeys(
        ["message-service", "notification-router", "push-sender", "email-sender"], 0
    )
