"""A rolling restart under load, as an orchestrator does one: two replicas of every service,
each stopped (SIGTERM, a graceful drain) and started again in turn while messages keep coming,
the clients posting through whichever API replica is up. Nothing is lost, nothing is recorded
or sent twice, and the API answers nothing but 201."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time

import httpx
import pytest

from tests.support.faults import (
    Accepted,
    Expectation,
    HeraldFactory,
    Report,
    populated,
    post_one,
    settle,
)

pytestmark = pytest.mark.e2e

SERVICES = ("message-service", "notification-router", "push-sender", "email-sender")
PER_SECOND = 10


async def test_every_replica_restarted_in_turn_under_load_loses_nothing(
    fault_report: Report, start_herald: HeraldFactory
) -> None:
    herald = await start_herald(replicas=dict.fromkeys(SERVICES, 2))
    rng = random.Random(44)
    apis = herald.replicas("message-service")
    clients = {
        name: httpx.AsyncClient(base_url=herald.services[name].base_url, timeout=30)
        for name in apis
    }
    # The API replica the clients post through: never the one being restarted, as a load
    # balancer that takes a replica out before it stops.
    serving = [apis[0]]
    accepted = Accepted()
    restarts: list[tuple[str, float, int]] = []  # replica, seconds to ready, exit code
    try:
        population = await populated(herald, clients[apis[0]], users=12, room_sizes=(6, 6), rng=rng)
        tasks: set[asyncio.Task[None]] = set()

        async def pace() -> None:
            for number in itertools.count():
                client = clients[serving[0]]
                task = asyncio.create_task(post_one(client, population, accepted, rng, number))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                await asyncio.sleep(1 / PER_SECOND)

        pacer = asyncio.create_task(pace())
        try:
            for service in SERVICES:
                for name in herald.replicas(service):
                    if name in clients:
                        serving[0] = next(api for api in apis if api != name)
                        # Requests already sent to it finish: uvicorn drains them on SIGTERM.
                    started = time.monotonic()
                    code = await asyncio.to_thread(herald.services[name].stop)
                    await herald.restart(name)
                    restarts.append((name, time.monotonic() - started, code))
        finally:
            pacer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pacer
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for client in clients.values():
            await client.aclose()

    expected = Expectation.of(population, accepted)
    result = await settle(herald, expected, timeout=120)
    fault_report(
        **result.fields(),
        restarts=len(restarts),
        restart_max_s=f"{max(seconds for _, seconds, _ in restarts):.1f}",
        exit_codes=sorted({code for _, _, code in restarts}),
        resent_posts=len(accepted.resent),
    )
    assert len(restarts) == 2 * len(SERVICES)
    assert {code for _, _, code in restarts} == {0}  # every stop was a clean drain
    assert set(accepted.statuses) == {201}, accepted.errors[:5]
    assert result.lost == 0
    assert result.not_delivered_in_ledger == 0
    assert result.duplicate_ledger_rows == 0
    assert result.most_copies <= 1
    assert sum(result.dead_letters.values()) == 0, result.dead_letters
    assert herald.crashed() == {}
