"""A rolling restart under load: two replicas of each of the four services, each replica stopped
(SIGTERM, as an orchestrator does) and started again in turn while messages are posted through
the two API replicas in turn. The replica being restarted stays in the rotation, as behind a
load balancer whose health checks have not noticed yet: a connection it refuses goes to the
other replica (the balancer's retry: nothing was sent), and a post whose connection breaks
under it is sent once more with the same Idempotency-Key (the chat client's retry). Nothing is
lost, no ledger row or delivery is made twice, and every post is answered 201 (no 5xx)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Iterable

import httpx
import pytest

from tests.support.faults import (
    Expectation,
    HeraldFactory,
    Report,
    populated,
    settle,
    steady_traffic,
)
from tests.support.infra import wait_until
from tests.support.processes import SERVICES

pytestmark = pytest.mark.e2e


class RoundRobin(httpx.AsyncBaseTransport):
    """A load balancer in front of the API replicas: each request goes to the next one, and to
    the one after when a connection to it cannot be made (nothing was sent: nginx's
    `proxy_next_upstream error`). A request whose connection breaks once sent is not retried
    here: that is the client's, with its Idempotency-Key."""

    def __init__(self, base_urls: Iterable[str]) -> None:
        self.targets = [httpx.URL(url) for url in base_urls]
        self.turn = 0
        self.transport = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.turn += 1
        for attempt in range(len(self.targets) - 1):
            with contextlib.suppress(httpx.ConnectError):
                return await self._send(request, self.turn + attempt)
        return await self._send(request, self.turn + len(self.targets) - 1)

    async def _send(self, request: httpx.Request, turn: int) -> httpx.Response:
        target = self.targets[turn % len(self.targets)]
        request.url = request.url.copy_with(host=target.host, port=target.port)
        return await self.transport.handle_async_request(request)

    async def aclose(self) -> None:
        await self.transport.aclose()


async def test_every_replica_restarted_in_turn_under_load_loses_nothing_and_answers_201(
    start_herald: HeraldFactory, fault_report: Report
) -> None:
    herald = await start_herald(replicas=dict.fromkeys(SERVICES, 2))
    balancer = RoundRobin(
        herald.services[replica].base_url for replica in herald.replicas("message-service")
    )
    rng = random.Random(61)
    restarts: dict[str, float] = {}
    async with httpx.AsyncClient(
        base_url="http://api.invalid", transport=balancer, timeout=30
    ) as client:
        population = await populated(herald, client, users=12, room_sizes=(6, 6, 4), rng=rng)
        # Five a second: on a loaded machine eight restarts take minutes, and the traffic of
        # all that time must drain within the settle's bound.
        async with steady_traffic(client, population, per_second=5, rng=rng) as accepted:
            for service in SERVICES:
                for replica in herald.replicas(service):
                    at = len(accepted.answers)

                    async def some_traffic(at: int = at) -> bool:
                        return len(accepted.answers) >= at + 10

                    await wait_until(some_traffic, timeout=60)
                    started = time.monotonic()
                    exit_code = await asyncio.to_thread(herald.services[replica].stop, 30)
                    assert exit_code == 0, herald.services[replica].log()[-4000:]
                    await herald.restart(replica)
                    restarts[replica] = time.monotonic() - started
    result = await settle(herald, Expectation.of(population, accepted), timeout=300)
    fault_report(
        **result.fields(),
        posted=len(accepted.answers),
        statuses=dict(accepted.statuses),
        resent=len(accepted.resent),
        slowest_restart_s=f"{max(restarts.values()):.1f}",
    )
    assert set(accepted.statuses) == {201}, (accepted.errors[:5], herald.unhandled_errors()[:5])
    assert result.lost == 0
    assert result.not_delivered_in_ledger == 0
    assert result.duplicate_ledger_rows == 0
    assert sum(result.dead_letters.values()) == 0, result.dead_letters
    # A sender stopped with a provider call in flight may have that call made again by the
    # replica its job goes to (the one case the senders cannot dedupe; same collapse id or
    # Message-ID): at most one repeat of it.
    assert result.most_copies <= 2
    assert herald.crashed() == {}
