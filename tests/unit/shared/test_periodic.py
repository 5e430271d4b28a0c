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
