"""The benchmark's FCM fake under a fixed latency and bounded concurrency."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from bench.fakes import SEND_PATH, FcmState, RecordFile


async def test_sends_beyond_the_concurrency_bound_wait_for_a_free_place(tmp_path: Path) -> None:
    records = RecordFile(tmp_path / "push.tsv")
    state = FcmState(records, latency=0.05, concurrency=2)
    started = time.monotonic()

    answers = await asyncio.gather(
        *(state.handle_slowly("POST", SEND_PATH, {}, b"{}") for _ in range(6))
    )

    assert time.monotonic() - started >= 0.15  # three rounds of two
    assert [status for status, _ in answers] == [401] * 6  # no token: still an FCM answer
    assert (state.stats.send_requests, state.stats.max_in_progress) == (6, 2)
    assert state.stats.max_waiting == 4  # two went straight in
    records.close()
