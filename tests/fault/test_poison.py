"""Poison on every consumer queue: each message ends in its queue's dead-letter queue with a
reason, the consumers go on with good messages, no process dies, and nothing planted in the poison
(an e-mail address, a device token, message text) reaches a log."""

from __future__ import annotations

import random
import time
from collections import Counter

import aio_pika
import httpx
import pytest

from herald_shared.retry import ATTEMPT_HEADER, REASON_HEADER
from herald_shared.topology import CONSUMER_QUEUES, DEVICE_INVALIDATIONS
from tests.support.faults import (
    POISON_KINDS,
    Expectation,
    HeraldFactory,
    Planted,
    Report,
    elapsed,
    peek_queue,
    poison,
    populated,
    post_burst,
    projected_devices,
    publish_raw,
    queue_depths,
    settle,
)
from tests.support.infra import wait_until

pytestmark = pytest.mark.e2e


async def test_poison_is_dead_lettered_with_a_reason_and_never_logged(
    fault_report: Report, start_herald: HeraldFactory
) -> None:
    herald = await start_herald()
    planted = Planted.new()
    rng = random.Random(13)
    started = time.monotonic()
    for consumer_queue in CONSUMER_QUEUES:
        for kind in POISON_KINDS:
            body, content_type = poison(consumer_queue.name, kind, planted)
            await publish_raw(
                herald.rabbit_url,
                consumer_queue.routing_keys[0],
                body,
                content_type=content_type,
                message_id=f"poison:{consumer_queue.name}:{kind}",
            )

    async def all_dead_lettered() -> bool:
        dlqs = [queue.dead_letter_queue.name for queue in CONSUMER_QUEUES]
        depths = await queue_depths(herald.rabbit_url, dlqs)
        return all(depth >= len(POISON_KINDS) for depth in depths.values())

    await wait_until(all_dead_lettered, timeout=60, interval=0.2)
    dead_lettered_s = elapsed(started)

    # Every consumer still does its work: chat messages through router and senders (and their
    # reports), then a dead device through push-sender, message-service and the projection.
    async with httpx.AsyncClient(base_url=herald.api, timeout=30) as client:
        population = await populated(
            herald, client, users=4, room_sizes=(4,), rng=rng, max_devices=1
        )
        accepted = await post_burst(client, population, 10, rng=rng, concurrency=2)
        result = await settle(herald, Expectation.of(population, accepted), timeout=60)
        victim = population.member(population.rooms[0].member_ids[-1])
        herald.fcm.fail(victim.device_tokens[0], 404, "UNREGISTERED")
        more = await post_burst(client, population, 5, rng=rng, concurrency=1)

        async def device_removed() -> bool:
            devices = await client.get("/users/me/devices", headers=victim.auth)
            return devices.status_code == 200 and devices.json() == []

        await wait_until(device_removed, timeout=60, interval=0.2)

    async def projection_updated() -> bool:
        router_db = herald.databases["notification-router"]
        return await projected_devices(router_db, victim.id) == 0

    await wait_until(projection_updated, timeout=30, interval=0.2)

    reasons: Counter[str] = Counter()
    misplaced: list[str] = []
    for consumer_queue in CONSUMER_QUEUES:
        dead = await peek_queue(herald.rabbit_url, consumer_queue.dead_letter_queue.name)
        expected_ids = {f"poison:{consumer_queue.name}:{kind}" for kind in POISON_KINDS}
        if {message.message_id for message in dead} != expected_ids:
            misplaced.append(
                f"{consumer_queue.name}: {sorted(str(message.message_id) for message in dead)}"
            )
        for message in dead:
            reason = (message.headers or {}).get(REASON_HEADER)
            if isinstance(reason, bytes):
                reason = reason.decode()
            kind = str(message.message_id).rsplit(":", 1)[1]
            reasons[f"{kind}:{reason}"] += 1
    leaks = planted.found_in(herald.logs())
    crashed = herald.crashed()
    ready = await herald.ready()
    fault_report(
        poison=len(CONSUMER_QUEUES) * len(POISON_KINDS),
        dead_lettered_s=dead_lettered_s,
        good_messages=len(accepted.messages) + len(more.messages),
        lost=result.lost,
        reasons=",".join(f"{key}={count}" for key, count in sorted(reasons.items())),
        leaks=sum(len(values) for values in leaks.values()),
        crashed=len(crashed),
    )
    assert not misplaced, misplaced
    # Every kind is a body that cannot become the queue's event: dead-lettered at once.
    assert reasons == {f"{kind}:unparsable": len(CONSUMER_QUEUES) for kind in POISON_KINDS}, reasons
    assert leaks == {}, leaks
    assert crashed == {}
    assert all(ready.values()), ready
    assert result.lost == 0
    assert result.duplicates == 0


@pytest.mark.parametrize("kind", ["invalid-json", "invalid-utf8"])
async def test_a_body_that_is_not_json_is_dead_lettered_at_once_as_unparsable(
    fault_report: Report, start_herald: HeraldFactory, kind: str
) -> None:
    herald = await start_herald()
    queue = DEVICE_INVALIDATIONS
    body, content_type = poison(queue.name, kind, Planted.new())
    await publish_raw(
        herald.rabbit_url,
        queue.routing_keys[0],
        body,
        content_type=content_type,
        message_id=f"poison:{queue.name}:{kind}",
    )

    async def dead_lettered() -> list[aio_pika.abc.AbstractIncomingMessage]:
        return await peek_queue(herald.rabbit_url, queue.dead_letter_queue.name)

    (dead,) = await wait_until(dead_lettered, timeout=30, interval=0.2)
    headers = dead.headers or {}
    fault_report(reason=headers.get(REASON_HEADER), attempts=headers.get(ATTEMPT_HEADER))
    assert headers.get(REASON_HEADER) == "unparsable"
    assert headers.get(ATTEMPT_HEADER) == 1
