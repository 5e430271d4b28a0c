"""The notification-router's PostgreSQL goes away under steady traffic, then comes back.

The router gets a cluster of its own (`router_cluster`), stopped with `pg_ctl -m immediate`: every
backend dies at once, like a crashed or failed-over server, and new connections are refused until
it is started again; message-service and the senders keep their databases on the shared cluster.
"""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import pytest

from tests.support.faults import (
    Expectation,
    Figures,
    HeraldFactory,
    PostgresCluster,
    Report,
    dead_letter_reasons,
    elapsed,
    populated,
    settle,
    steady_traffic,
)
from tests.support.infra import wait_until

pytestmark = pytest.mark.e2e

# An unreachable database spends no attempt: the router's messages wait on the tiers instead.
DEFERRED = "herald.message.deferred"


async def _outage(
    start_herald: HeraldFactory,
    router_cluster: PostgresCluster,
    *,
    retry_delays: str,
    outage_messages: int,
    until_dead_letter: bool = False,
) -> tuple[dict[str, object], Figures]:
    herald = await start_herald(
        router_cluster=router_cluster, overrides={"RABBITMQ_RETRY_DELAYS": retry_delays}
    )
    rng = random.Random(3)
    async with httpx.AsyncClient(base_url=herald.api, timeout=30) as client:
        population = await populated(
            herald, client, users=6, room_sizes=(3, 4), rng=rng, max_devices=1
        )
        async with steady_traffic(client, population, per_second=8, rng=rng) as accepted:

            async def posted(count: int) -> bool:
                return len(accepted.answers) >= count

            await wait_until(lambda: posted(16), timeout=30)
            down_at = time.monotonic()
            await asyncio.to_thread(router_cluster.stop, "immediate")
            # The outage lasts while the API answers `outage_messages` more posts (8 a second).
            during = len(accepted.answers)
            await wait_until(lambda: posted(during + outage_messages), timeout=30)
            await asyncio.to_thread(router_cluster.start)
            up_at = time.monotonic()
            after = len(accepted.answers)
            await wait_until(lambda: posted(after + 16), timeout=30)
    expected = Expectation.of(population, accepted)
    result = await settle(herald, expected, timeout=120, until_dead_letter=until_dead_letter)
    deferrals = sum(
        text.count(DEFERRED)
        for name, text in herald.logs().items()
        if name.startswith("notification-router")
    )
    reasons = await dead_letter_reasons(herald.rabbit_url)
    fields: dict[str, object] = {
        **result.fields(),
        "posted": len(accepted.answers),
        "outage_s": round(up_at - down_at, 2),
        "router_deferrals": deferrals,
        "recover_s": elapsed(up_at),
    }
    if reasons:
        fields["reasons"] = dict(reasons)
    assert accepted.statuses.keys() == {201}, (accepted.errors[:5], herald.unhandled_errors()[:5])
    assert herald.crashed() == {}
    return fields, result


async def test_a_router_database_outage_within_the_retry_budget_is_retried_and_loses_nothing(
    fault_report: Report, start_herald: HeraldFactory, router_cluster: PostgresCluster
) -> None:
    # Tiers 1, 2, 4 s: a message failing at the start of a ~3 s outage retries until ~7 s later.
    fields, result = await _outage(
        start_herald, router_cluster, retry_delays="1,2,4", outage_messages=24
    )
    fault_report(**fields)
    assert fields["router_deferrals"], "the outage did not reach the router"
    assert result.lost == 0
    assert result.duplicate_ledger_rows == 0
    assert result.unexpected == 0
    assert sum(result.dead_letters.values()) == 0, fields


async def test_a_router_database_outage_longer_than_the_retry_budget_dead_letters_nothing(
    fault_report: Report, start_herald: HeraldFactory, router_cluster: PostgresCluster
) -> None:
    fields, result = await _outage(
        start_herald,
        router_cluster,
        retry_delays="0.2,0.5,1",
        outage_messages=40,
        until_dead_letter=True,
    )
    fault_report(**fields)
    assert fields["router_deferrals"], "the outage did not reach the router"
    assert sum(result.dead_letters.values()) == 0, fields
    assert result.lost == 0
