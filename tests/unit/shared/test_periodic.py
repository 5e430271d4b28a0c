"""herald_shared.periodic: passes until stopped, and a failing pass never ends the loop."""

from __future__ import annotations

import logging

import pytest

from herald_shared.periodic import PeriodicTask
from tests.support.infra import wait_until

LOGGER = logging.getLogger("test.periodic")


async def test_passes_repeat_until_stopped_and_a_failure_is_logged_without_its_text(
    caplog: pytest.LogCaptureFixture,
) -> None:
    passes: list[int] = []

    async def work() -> None:
        passes.append(len(passes))
        if len(passes) == 2:
            raise RuntimeError("secret detail")

    task = PeriodicTask(work, interval=0.01, name="t", logger=LOGGER, failure="test.pass_failed")
    caplog.set_level(logging.ERROR, logger=LOGGER.name)

    task.start()
    task.start()  # a second start changes nothing
    try:

        async def past_the_failure() -> bool:
            return len(passes) >= 4

        await wait_until(past_the_failure)
        assert task.running
    finally:
        await task.stop()

    assert not task.running
    (record,) = [r for r in caplog.records if r.getMessage().startswith("test.pass_failed")]
    assert "RuntimeError" in record.getMessage()
    assert "secret detail" not in record.getMessage()
    await task.stop()  # stopping twice is harmless


async def test_a_wake_brings_the_next_pass_forward() -> None:
    passes: list[int] = []

    async def work() -> None:
        passes.append(len(passes))

    # An interval no test waits out: a second pass can only come from the wake.
    task = PeriodicTask(work, interval=3600, name="t", logger=LOGGER, failure="test.pass_failed")
    task.wake()  # not running: nothing to wake
    task.start()
    try:

        async def passes_done(count: int) -> bool:
            return len(passes) >= count

        await wait_until(lambda: passes_done(1))
        task.wake(after=0.05)
        await wait_until(lambda: passes_done(2))
    finally:
        await task.stop()
    assert passes == [0, 1]
