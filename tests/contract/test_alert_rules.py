"""The alert rules, checked and unit-tested by Prometheus' own `promtool` (Debian's prometheus
package; `.ci/run` installs it through `scripts/containers install`): every alert of
deploy/prometheus/alerts.yml has synthetic-series tests in alerts.test.yml."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

PROMETHEUS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
RULES = PROMETHEUS / "alerts.yml"
RULE_TESTS = PROMETHEUS / "alerts.test.yml"


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        message = "promtool not installed (Debian's prometheus: scripts/containers install)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return promtool


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_promtool(), *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_the_rules_are_valid() -> None:
    done = _run("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_passes_its_unit_tests() -> None:
    done = _run("test", "rules", str(RULE_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_has_a_unit_test_that_fires_it() -> None:
    alerts = {
        rule["alert"]
        for group in yaml.safe_load(RULES.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }
    fired = {
        check["alertname"]
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for check in test["alert_rule_test"]
        if check.get("exp_alerts")
    }
    assert alerts == fired


def test_a_broken_rule_fails_its_unit_test(tmp_path: Path) -> None:
    """The unit tests can fail: with HeraldServiceDown's `for:` shortened they do."""
    rules = RULES.read_text()
    assert rules.count("for: 3m") == 2
    (tmp_path / "alerts.yml").write_text(rules.replace("for: 3m", "for: 2m"))
    shutil.copy(RULE_TESTS, tmp_path / "alerts.test.yml")
    done = _run("test", "rules", str(tmp_path / "alerts.test.yml"))
    assert done.returncode != 0
    assert "HeraldServiceDown" in done.stdout + done.stderr
