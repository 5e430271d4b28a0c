"""RabbitMQ failing under traffic: every connection closed by the broker, and the node stopped for
a while then started again on its data."""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import pytest

from tests.support.faults import (
    SHORT_LEASES,
    WORK_QUEUES,
    Accepted,
    Expectation,
    HeraldFactory,
    RecordingFcm,
    Report,
    consumers_back,
    dead_letter_reasons,
    elapsed,
    ledger_rows,
    populated,
    post_burst,
    post_one,
    settle,
    steady_traffic,
)
from tests.support.infra import wait_until

pytestmark = pytest.mark.e2e


async def test_every_service_reconnects_and_consumes_again_after_its_connections_are_closed(
    fault_report: Report, start_herald: HeraldFactory
) -> None:
    herald = await start_herald(overrides=SHORT_LEASES)
    router_db = herald.databases["notification-router"]
    rng = random.Random(5)
    async with httpx.AsyncClient(base_url=herald.api, timeout=30) as client:
        population = await populated(
            herald, client, users=8, room_sizes=(3, 4, 5, 6), rng=rng, max_devices=1
        )
        before = await asyncio.to_thread(herald.node.consumer_channels, herald.rabbit_url)
        old_channels = set().union(*before.values())
        assert set(WORK_QUEUES) <= before.keys(), before
        burst = asyncio.create_task(post_burst(client, population, 150, rng=rng))

        async def busy() -> bool:
            return await ledger_rows(router_db) >= 150

        await wait_until(busy, timeout=60, interval=0.05)
        await asyncio.to_thread(herald.node.close_all_connections)
        closed_at = time.monotonic()

        async def consuming_on_new_channels() -> dict[str, int] | None:
            channels = await asyncio.to_thread(herald.node.consumer_channels, herald.rabbit_url)
            fresh = {name: len(channels.get(name, set()) - old_channels) for name in WORK_QUEUES}
            return fresh if all(fresh.values()) else None

        fresh = await wait_until(consuming_on_new_channels, timeout=60, interval=0.2)
        consumers_s = elapsed(closed_at)

        async def all_ready() -> bool:
            return all((await herald.ready()).values())

        await wait_until(all_ready, timeout=60, interval=0.2)
        ready_s = elapsed(closed_at)
        accepted = await burst
    expected = Expectation.of(population, accepted)
    result = await settle(herald, expected, timeout=120)
    consumers = await consumers_back(herald)
    fault_report(
        **result.fields(),
        consumers_back_s=consumers_s,
        ready_s=ready_s,
        recover_s=elapsed(closed_at),
    )
    assert accepted.statuses == {201: 150}, accepted.errors[:5]
    # One consumer per queue again, on a new channel (none doubled, none left on a dead one).
    assert fresh == dict.fromkeys(WORK_QUEUES, 1)
    assert consumers == dict.fromkeys(WORK_QUEUES, 1), consumers
    assert result.lost == 0
    assert result.duplicate_ledger_rows == 0
    # A handler cancelled by the lost connection lets its provider call finish and records it, so
    # duplicates come only from a process dying mid-send; none dies here, but the guarantee this
    # test holds the services to is the general one: one duplicate (same collapse id /
    # Message-ID) at most.
    assert result.most_copies <= 2
    assert result.unexpected == 0
    assert sum(result.dead_letters.values()) == 0, result.dead_letters
    assert herald.crashed() == {}
    # Closed by the broker (connection-forced) and restored: warnings, not errors.
    assert herald.client_errors() == []


async def test_a_push_in_flight_when_its_connection_is_closed_is_delivered_not_dead_lettered(
    fault_report: Report, start_herald: HeraldFactory
) -> None:
    herald = await start_herald()  # tiers 0.2, 0.5, 1 s; push lease 4 * 10 + 15 s
    fcm = herald.fcm
    assert isinstance(fcm, RecordingFcm)
    rng = random.Random(11)
    async with httpx.AsyncClient(base_url=herald.api, timeout=30) as client:
        population = await populated(
            herald, client, users=2, room_sizes=(2,), rng=rng, max_devices=1
        )
        room = population.rooms[0]
        sender, recipient = (population.member(member) for member in room.member_ids)
        token = recipient.device_tokens[0]
        fcm.stall(token, 4.0, times=1)  # the provider is slow for this one push
        accepted = Accepted()
        await post_one(client, population, accepted, rng, 0, room=room, sender=sender)

        async def push_in_flight() -> bool:
            return bool(fcm.attempts_for(token))

        await wait_until(push_in_flight, timeout=30)
        await asyncio.to_thread(herald.node.close_all_connections)
        closed_at = time.monotonic()
    expected = Expectation.of(population, accepted)
    result = await settle(herald, expected, timeout=90, until_dead_letter=True)
    reasons = await dead_letter_reasons(herald.rabbit_url)
    fault_report(**result.fields(), recover_s=elapsed(closed_at), reasons=dict(reasons))
    assert sum(result.dead_letters.values()) == 0, reasons
    assert result.not_delivered_in_ledger == 0
    assert result.lost == 0
    # The cancelled handler let the provider call finish and recorded it: no second push.
    assert result.duplicate_pushes == 0
    assert herald.client_errors() == []


async def test_the_api_accepts_messages_while_rabbitmq_is_down_and_delivers_them_after(
    fault_report: Report, start_herald: HeraldFactory
) -> None:
    herald = await start_herald(overrides=SHORT_LEASES)
    rng = random.Random(7)
    async with httpx.AsyncClient(base_url=herald.api, timeout=30) as client:
        population = await populated(
            herald, client, users=6, room_sizes=(3, 4), rng=rng, max_devices=1
        )
        async with steady_traffic(client, population, per_second=8, rng=rng) as accepted:

            async def posted(count: int) -> bool:
                return len(accepted.answers) >= count

            await wait_until(lambda: posted(16), timeout=30)
            stopping_at = time.monotonic()
            await asyncio.to_thread(herald.node.stop)
            stopped_at = time.monotonic()
            # The outage lasts as long as the API takes to answer another 40 messages (~5 s).
            during = len(accepted.answers)
            await wait_until(lambda: posted(during + 40), timeout=30)
            boot_s = await asyncio.to_thread(herald.node.start)
            started_at = time.monotonic()
            consumers = await wait_until(lambda: consumers_back(herald), timeout=60, interval=0.2)
            consumers_s = elapsed(started_at)
            after = len(accepted.answers)
            await wait_until(lambda: posted(after + 16), timeout=30)
    expected = Expectation.of(population, accepted)
    result = await settle(herald, expected, timeout=120)
    outage = [status for at, status in accepted.answers if stopping_at <= at <= started_at]
    fault_report(
        **result.fields(),
        posted=len(accepted.answers),
        posted_during_outage=len(outage),
        resent_after_connection_errors=len(accepted.resent),
        outage_s=round(started_at - stopping_at, 2),
        stop_s=round(stopped_at - stopping_at, 2),
        boot_s=round(boot_s, 2),
        consumers_back_s=consumers_s,
        recover_s=elapsed(started_at),
    )
    assert outage, "no message was posted during the outage"
    assert set(outage) == {201}, accepted.errors[:5]
    assert accepted.statuses.keys() == {201}, accepted.errors[:5]
    assert consumers == dict.fromkeys(WORK_QUEUES, 1)
    assert result.lost == 0
    assert result.duplicate_ledger_rows == 0
    assert result.most_copies <= 2
    assert result.unexpected == 0
    assert sum(result.dead_letters.values()) == 0, result.dead_letters
    assert herald.crashed() == {}
