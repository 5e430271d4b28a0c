"""SIGTERM, as an orchestrator sends it on a rolling update: a sender stops taking work, finishes
the push it has in flight (the provider is slow to answer), records and reports it, and exits 0.
Its successor finds nothing to send again."""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import pytest

from tests.support.faults import (
    Accepted,
    Expectation,
    HeraldFactory,
    RecordingFcm,
    Report,
    populated,
    post_one,
    settle,
)
from tests.support.infra import wait_until

pytestmark = pytest.mark.e2e

PROVIDER_STALL_S = 2.0  # well inside the services' RABBITMQ_GRACEFUL_TIMEOUT (5 s in these tests)


async def test_sigterm_finishes_the_push_in_flight_then_exits_zero(
    fault_report: Report, start_herald: HeraldFactory
) -> None:
    herald = await start_herald()
    fcm = herald.fcm
    assert isinstance(fcm, RecordingFcm)
    rng = random.Random(53)
    async with httpx.AsyncClient(base_url=herald.api, timeout=30) as client:
        population = await populated(
            herald, client, users=2, room_sizes=(2,), rng=rng, max_devices=1
        )
        room = population.rooms[0]
        sender, recipient = (population.member(member) for member in room.member_ids)
        token = recipient.device_tokens[0]
        fcm.stall(token, PROVIDER_STALL_S, times=1)
        accepted = Accepted()
        await post_one(client, population, accepted, rng, 0, room=room, sender=sender)

        async def push_in_flight() -> bool:
            return bool(fcm.attempts_for(token))

        await wait_until(push_in_flight, timeout=30)
    stopping_at = time.monotonic()
    exit_code = await asyncio.to_thread(herald.services["push-sender"].stop)
    stop_s = round(time.monotonic() - stopping_at, 2)
    await herald.restart("push-sender")
    result = await settle(herald, Expectation.of(population, accepted), timeout=60)
    fault_report(**result.fields(), exit_code=exit_code, stop_s=stop_s)
    assert exit_code == 0
    assert len(fcm.messages_to(token)) == 1
    assert result.lost == 0
    assert result.duplicates == 0
    assert result.not_delivered_in_ledger == 0
    assert sum(result.dead_letters.values()) == 0, result.dead_letters
