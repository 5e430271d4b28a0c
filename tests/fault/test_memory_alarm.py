"""RabbitMQ raises a memory alarm under traffic: every publishing connection is blocked (the
broker stops reading from it) without being closed. The API must keep answering 201 at once
(the outbox relay, not the request, waits for the broker) and everything is delivered, once,
after the alarm clears."""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import pytest

from tests.support.faults import (
    Expectation,
    HeraldFactory,
    Report,
    elapsed,
    populated,
    settle,
    steady_traffic,
)
from tests.support.infra import wait_until

pytestmark = pytest.mark.e2e

# The request never waits for the broker; this bound only catches one that does (a publish
# inside the request would take the whole RABBITMQ_PUBLISH_TIMEOUT, 5 s).
REQUEST_NEVER_WAITS_S = 5.0


async def test_the_api_answers_at_once_during_a_memory_alarm_and_everything_is_delivered_after(
    fault_report: Report, start_herald: HeraldFactory
) -> None:
    herald = await start_herald()
    node = herald.node
    rng = random.Random(41)

    async def blocked_connections() -> int:
        listing = await asyncio.to_thread(node.ctl, "list_connections", "name", "state")
        return sum(" blocked" in line or "\tblocked" in line for line in listing.splitlines())

    async with httpx.AsyncClient(base_url=herald.api, timeout=30) as client:
        population = await populated(
            herald, client, users=6, room_sizes=(3, 4), rng=rng, max_devices=1
        )
        async with steady_traffic(client, population, per_second=8, rng=rng) as accepted:

            async def posted(count: int) -> bool:
                return len(accepted.answers) >= count

            await wait_until(lambda: posted(16), timeout=30)
            await asyncio.to_thread(node.ctl, "set_vm_memory_high_watermark", "0.0001")
            alarm_at = time.monotonic()
            # The alarm is real once the broker blocks a publisher (the relay's next publish).
            blocked = await wait_until(blocked_connections, timeout=30, interval=0.2)
            during_from = len(accepted.answers)
            # ~25 s at 8 posts a second: longer than a handler's publish timeout (5 s) plus the
            # retry middleware's own republish timeout (10 s) together.
            await wait_until(lambda: posted(during_from + 200), timeout=60)
            during = accepted.answers[during_from:]
            during_seconds = accepted.seconds[during_from:]
            await asyncio.to_thread(node.ctl, "set_vm_memory_high_watermark", "0.4")
            cleared_at = time.monotonic()
            after = len(accepted.answers)
            await wait_until(lambda: posted(after + 16), timeout=30)
    expected = Expectation.of(population, accepted)
    result = await settle(herald, expected, timeout=120)
    fault_report(
        **result.fields(),
        posted=len(accepted.answers),
        posted_during_alarm=len(during),
        blocked_connections=blocked,
        alarm_s=round(cleared_at - alarm_at, 2),
        slowest_post_during_alarm_s=round(max(during_seconds), 3),
        recover_s=elapsed(cleared_at),
    )
    assert {status for _, status in during} == {201}, accepted.errors[:5]
    assert max(during_seconds) < REQUEST_NEVER_WAITS_S
    assert accepted.statuses.keys() == {201}, accepted.errors[:5]
    assert result.lost == 0
    assert result.duplicate_ledger_rows == 0
    assert result.duplicates == 0
    assert sum(result.dead_letters.values()) == 0, result.dead_letters
    assert herald.crashed() == {}
