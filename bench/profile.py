"""Optional sampling profiles of the services during a run, with py-spy (not a dependency: run the
benchmark as `uv run --with py-spy==0.4.3 python -m bench --profile 20`), summarised as the
functions that cost the most samples, on their own (self) and with their callees (total)."""

from __future__ import annotations

import asyncio
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

PROFILER = "py-spy"
_LINE = re.compile(r":\d+\)$")
# Frames of the interpreter's own idle wait: not work, and the biggest "cost" of an idle process.
IDLE_FRAMES = ("select (selectors.py", "_run_once (asyncio/base_events.py", "run_forever")
# Herald's own code, whose inclusive cost says which step of a handler the time goes to.
OWN_CODE = (
    "herald_shared/",
    "message_service/",
    "notification_router/",
    "push_sender/",
    "email_sender/",
)
# Entry points every busy sample passes through: no information.
OWN_ENTRY_POINTS = ("serve (herald_shared/ops.py", "main (")


def py_spy() -> str | None:
    return shutil.which(PROFILER)


async def record(pid: int, seconds: int, output: Path) -> asyncio.subprocess.Process:
    """Start `py-spy record` on `pid` in collapsed-stack ("raw") format; non-blocking, so the
    profiled process is not paused while it is sampled."""
    binary = py_spy()
    if binary is None:
        raise RuntimeError("py-spy is not on PATH: run with `uv run --with py-spy==0.4.3 ...`")
    return await asyncio.create_subprocess_exec(
        binary,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(seconds),
        "--rate",
        "100",
        "--nonblocking",
        # Only samples that hold the GIL: where the process spends CPU. Without it, the time a
        # process waits to be scheduled on a saturated machine shows up in whatever it was doing
        # (mostly socket writes), which says nothing about its own cost.
        "--gil",
        "--format",
        "raw",
        "--output",
        str(output),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )


@dataclass(frozen=True)
class ProfileSummary:
    samples: int
    idle_share: float
    top_self: list[tuple[str, float]]  # (frame, share of busy samples)
    top_own_code: list[tuple[str, float]]  # Herald frames, callees included


def summarise(collapsed: str, top: int = 12) -> ProfileSummary:
    """From py-spy's raw output (`frame;frame;…;leaf count` per line)."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = idle = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        # Functions, not lines: "send (fcm.py:386)" and "send (fcm.py:371)" are one cost.
        frames = [_LINE.sub(")", frame) for frame in stack.split(";")]
        samples += count
        if any(marker in frames[-1] for marker in IDLE_FRAMES):
            idle += count
            continue
        own[frames[-1]] += count
        for frame in set(frames):
            if any(package in frame for package in OWN_CODE) and not frame.startswith(
                OWN_ENTRY_POINTS
            ):
                total[frame] += count
    busy = max(1, samples - idle)
    return ProfileSummary(
        samples=samples,
        idle_share=round(idle / samples, 3) if samples else 0.0,
        top_self=[(frame, round(n / busy, 3)) for frame, n in own.most_common(top)],
        top_own_code=[(frame, round(n / busy, 3)) for frame, n in total.most_common(top)],
    )
