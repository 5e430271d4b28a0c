"""`--compare <git ref>`: the ref's services and the working tree's, back to back on this machine
with the same command, interleaved (old, new, old, new…), and the ratio new/old of the figures
that matter.

The ref is checked out with `git worktree add --detach` in a temporary directory and installed
there with `uv sync --all-packages --no-dev` into its own `.venv` (the working tree's `uv.lock` is
copied in first when the ref has none, so the same pinned versions are used, from uv's cache when
it has them all); the harness (load
generator, fakes, checker) is the working tree's for both, only the four services' console scripts
differ. The worktree is removed afterwards, whatever happened.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.report import TOTAL, figure_at, write_json
from bench.services import OWN_BIN_DIR, SERVICES

if TYPE_CHECKING:
    from bench.run import Options

ROOT = Path(__file__).resolve().parents[1]
SYNC_TIMEOUT = 900

# (label, where in a run's document, higher is better)
FIGURES: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("sustained notifications/s", ("notifications", "sustained_per_s"), True),
    ("CPU per notification, all (ms)", ("cpu", "per_notification_ms", TOTAL), False),
    *(
        (f"CPU per notification, {name} (ms)", ("cpu", "per_notification_ms", name), False)
        for name in SERVICES
    ),
    ("201 → push p99 (ms)", ("latency_ms", "push", "p99"), False),
    # The lanes scenario's only.
    ("lanes: 201 → direct push p50 (ms)", ("lanes", "direct_push_p50_ms"), False),
    ("lanes: 201 → direct push p99 (ms)", ("lanes", "direct_push_p99_ms"), False),
    ("calibration: Python loop (ms)", ("calibration", "python_loop_ms"), False),
    ("calibration: aio-pika (messages/s)", ("calibration", "amqp_messages_per_s"), True),
    ("calibration: PostgreSQL (commits/s)", ("calibration", "postgres_commits_per_s"), True),
)


def _say(text: str) -> None:
    print(f"[bench] {text}", flush=True)


def _git(*args: str, cwd: Path = ROOT) -> str:
    git = shutil.which("git")
    if git is None:
        raise RuntimeError("--compare needs git on PATH")
    return subprocess.run(
        [git, *args], cwd=cwd, check=True, capture_output=True, text=True, timeout=300
    ).stdout.strip()


def _uv() -> str:
    found = os.environ.get("UV") or shutil.which("uv")
    if not found:
        raise RuntimeError("uv is not on PATH (run through ./scripts/bench)")
    return found


@contextlib.contextmanager
def checked_out(ref: str) -> Iterator[tuple[Path, str]]:
    """(the directory of the ref's console scripts, its short commit) while inside."""
    try:
        commit = _git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    except subprocess.CalledProcessError:
        raise SystemExit(f"--compare: {ref!r} is not a commit of this repository") from None
    short = _git("rev-parse", "--short", commit)
    parent = Path(tempfile.mkdtemp(prefix="herald-bench-compare-"))
    tree = parent / "tree"
    try:
        _say(f"compare: checking out {ref} ({short}) in {tree}")
        _git("worktree", "add", "--detach", str(tree), commit)
        lock = ROOT / "uv.lock"
        if lock.exists() and not (tree / "uv.lock").exists():
            shutil.copy2(lock, tree / "uv.lock")
        env = {
            key: value
            for key, value in os.environ.items()
            if key not in {"VIRTUAL_ENV", "UV_PROJECT_ENVIRONMENT"}
        }
        _say(f"compare: installing {short}'s services (uv sync --all-packages --no-dev)")
        sync = [_uv(), "sync", "--quiet", "--all-packages", "--no-dev"]
        # From uv's cache when it can (the same pins as this tree's); from the index otherwise.
        offline = subprocess.run(
            [*sync, "--offline"], cwd=tree, env=env, capture_output=True, timeout=SYNC_TIMEOUT
        )
        if offline.returncode != 0:
            subprocess.run(sync, cwd=tree, env=env, check=True, timeout=SYNC_TIMEOUT)
        bin_dir = tree / ".venv" / "bin"
        missing = [name for name in SERVICES if not (bin_dir / name).exists()]
        if missing:
            raise RuntimeError(f"{ref} has no console script for {', '.join(missing)}")
        yield bin_dir, short
    finally:
        with contextlib.suppress(subprocess.CalledProcessError, OSError):
            _git("worktree", "remove", "--force", str(tree))
        shutil.rmtree(parent, ignore_errors=True)
        with contextlib.suppress(subprocess.CalledProcessError, OSError):
            _git("worktree", "prune")


def comparison(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per figure: each run's value, the median of each side and the ratio new/old of the
    medians (None where a side has no value or the old median is 0)."""
    rows = []
    for label, path, higher_is_better in FIGURES:
        old_values = [v for v in (figure_at(d, path) for d in old) if v is not None]
        new_values = [v for v in (figure_at(d, path) for d in new) if v is not None]
        old_median = statistics.median(old_values) if old_values else None
        new_median = statistics.median(new_values) if new_values else None
        ratio = round(new_median / old_median, 3) if old_median and new_median is not None else None
        rows.append(
            {
                "figure": label,
                "higher_is_better": higher_is_better,
                "old": old_values,
                "new": new_values,
                "old_median": old_median,
                "new_median": new_median,
                "ratio_new_over_old": ratio,
            }
        )
    return rows


def _values(values: list[float], median: float | None) -> str:
    if median is None:
        return "n/a"
    runs = ", ".join(f"{v:g}" for v in values)
    return f"{runs} → {median:g}" if len(values) > 1 else f"{median:g}"


def print_comparison(rows: list[dict[str, Any]], *, ref: str, short: str, runs: int) -> None:
    order = ", ".join(["old, new"] * runs)
    name = ref if short.startswith(ref) or ref.startswith(short) else f"{ref} ({short})"
    print()
    print(
        f"  compare: old = {name}, new = the working tree; {runs} run{'s' if runs > 1 else ''} "
        f"each, in the order {order}; same command and harness; medians of each side"
    )
    table = [("figure", "old (runs → median)", "new (runs → median)", "new/old")]
    for row in rows:
        if not row["old"] and not row["new"]:
            continue  # a figure this scenario has not
        ratio = row["ratio_new_over_old"]
        table.append(
            (
                row["figure"],
                _values(row["old"], row["old_median"]),
                _values(row["new"], row["new_median"]),
                "n/a" if ratio is None else f"{ratio:.2f}x",
            )
        )
    widths = [max(len(line[column]) for line in table) for column in range(4)]
    for line in table:
        print("  " + "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)))
    print()


async def run_compare(options: Options) -> int:
    from bench.run import run_once

    ref = options.compare
    if not ref:
        raise ValueError("run_compare needs options.compare")
    documents: dict[str, list[dict[str, Any]]] = {"old": [], "new": []}
    statuses: list[int] = []
    with checked_out(ref) as (old_bin, short):
        name = ref if short.startswith(ref) or ref.startswith(short) else f"{ref} ({short})"
        sides = (("old", old_bin, name), ("new", OWN_BIN_DIR, "the working tree"))
        total = 2 * options.compare_runs
        number = 0
        for _ in range(options.compare_runs):
            for side, bin_dir, label in sides:
                number += 1
                _say(f"compare: run {number}/{total}: {side} = {label}")
                document, status = await run_once(
                    replace(options, compare=None), bin_dir=bin_dir, label=f"{side}: {label}"
                )
                documents[side].append(document)
                statuses.append(status)
    rows = comparison(documents["old"], documents["new"])
    print_comparison(rows, ref=ref, short=short, runs=options.compare_runs)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = options.out / f"{stamp}-compare-{short}.json"
    write_json(
        {
            "command": options.command,
            "ref": ref,
            "commit": short,
            "runs_per_side": options.compare_runs,
            "order": "interleaved, old first",
            "figures": rows,
            "runs": {
                side: [
                    {"title": d["title"], "chart": d.get("chart"), "checker": d["checker"]}
                    for d in docs
                ]
                for side, docs in documents.items()
            },
        },
        path,
    )
    _say(f"compare JSON: {path}")
    return 1 if 1 in statuses else max(statuses, default=0)
