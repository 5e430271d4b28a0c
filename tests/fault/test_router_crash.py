"""The notification-router SIGKILLed: with thousands of events in flight, then restarted; and
again and again by one message, until the delivery limit dead-letters it."""

from __future__ import annotations

import asyncio
import random
import time
import uuid

import asyncpg
import httpx
import pytest

from herald_shared.events import MessageCreated, SenderInfo, utc_now
from herald_shared.topology import DELIVERY_LIMIT, MESSAGE_NEW, MESSAGE_NOTIFICATIONS
from tests.support.faults import (
    Expectation,
    HeraldFactory,
    Report,
    dead_letter_reasons,
    elapsed,
    ledger_rows,
    peek_queue,
    plain_url,
    populated,
    post_burst,
    publish_raw,
    queue_depths,
    settle,
    waiting_for_locks,
)
from tests.support.infra import wait_until

pytestmark = pytest.mark.e2e

MESSAGES = 300
# Rooms of 4 to 10 members: 3 to 9 recipients per message.
ROOM_SIZES = (4, 5, 6, 7, 8, 9, 10)
KILL_AT_LEDGER_ROWS = 400


async def test_router_killed_mid_burst_loses_nothing_and_records_nothing_twice(
    fault_report: Report, start_herald: HeraldFactory
) -> None:
    herald = await start_herald()
    router_db = herald.databases["notification-router"]
    rng = random.Random(20261128)
    async with httpx.AsyncClient(base_url=herald.api, timeout=30) as client:
        population = await populated(herald, client, users=12, room_sizes=ROOM_SIZES, rng=rng)
        posted_at = time.monotonic()
        burst = asyncio.create_task(post_burst(client, population, MESSAGES, rng=rng))

        async def busy() -> bool:
            return await ledger_rows(router_db) >= KILL_AT_LEDGER_ROWS

        await wait_until(busy, timeout=120, interval=0.05)
        herald.kill("notification-router")
        killed_at = time.monotonic()
        rows_at_kill = await ledger_rows(router_db)
        queues_at_kill = await asyncio.to_thread(herald.queues)
        await herald.restart("notification-router")
        restart_s = elapsed(killed_at)
        accepted = await burst
        burst_s = elapsed(posted_at)
    expected = Expectation.of(population, accepted)
    result = await settle(herald, expected, timeout=180)
    queued = sum(
        queues_at_kill[name].messages
        for name in ("message_notifications", "push_notifications", "email_notifications")
        if name in queues_at_kill
    )
    fault_report(
        **result.fields(),
        ledger_rows_at_kill=rows_at_kill,
        queued_at_kill=queued,
        unrouted_at_kill=len(expected.ledger) - rows_at_kill,
        restart_s=restart_s,
        post_s=burst_s,
        recover_s=elapsed(killed_at),
    )
    assert accepted.statuses == {201: MESSAGES}, accepted.errors[:5]
    assert result.lost == 0
    assert result.duplicate_ledger_rows == 0
    # No sender crashed: their ledgers absorb every job the restarted router publishes again.
    assert result.duplicate_pushes == result.duplicate_emails == 0
    assert result.unexpected == 0
    assert sum(result.dead_letters.values()) == 0, result.dead_letters
    assert herald.crashed() == {}


async def test_a_message_that_kills_the_router_every_time_is_dead_lettered_by_the_delivery_limit(
    fault_report: Report, start_herald: HeraldFactory
) -> None:
    """A message whose handling never ends but by a crash: here the test holds an uncommitted
    ledger row for it, so the router's insert waits on that row's lock, and the test SIGKILLs the
    router whenever it is stuck there. RabbitMQ counts every return of the unacked message and,
    past the quorum queue's delivery limit, dead-letters it; the router then goes on."""
    herald = await start_herald()
    router_db = herald.databases["notification-router"]
    rng = random.Random(23)
    async with httpx.AsyncClient(base_url=herald.api, timeout=30) as client:
        population = await populated(
            herald, client, users=3, room_sizes=(3,), rng=rng, max_devices=1
        )
        room = population.rooms[0]
        sender, *recipients = (population.member(member) for member in room.member_ids)
        killer = MessageCreated(
            message_id=uuid.uuid4(),
            room_id=room.id,
            room_name="room 0",
            sender_id=sender.id,
            recipient_ids=[member.id for member in recipients],
            message_content="a message the router never gets past",
            sender_info=SenderInfo(
                user_id=sender.id, username=sender.username, display_name=sender.username
            ),
            timestamp=utc_now(),
        )
        blocker = await asyncpg.connect(plain_url(router_db))
        transaction = blocker.transaction()
        await transaction.start()
        try:
            await blocker.execute(
                "INSERT INTO notifications (message_id, recipient_id, room_id, mentioned,"
                " push_decision, email_decision, decided_at)"
                " VALUES ($1, $2, $3, false, 'pending', 'pending', now())",
                killer.message_id,
                recipients[0].id,
                room.id,
            )
            await publish_raw(
                herald.rabbit_url,
                MESSAGE_NEW,
                killer.model_dump_json().encode(),
                content_type="application/json",
                message_id=str(killer.event_id),
            )
            dlq = MESSAGE_NOTIFICATIONS.dead_letter_queue.name
            started = time.monotonic()
            kills = 0

            async def stuck_or_dead_lettered() -> str | None:
                if (await queue_depths(herald.rabbit_url, [dlq]))[dlq]:
                    return "dead-lettered"
                return "stuck" if await waiting_for_locks(router_db) else None

            while (await wait_until(stuck_or_dead_lettered, timeout=60)) == "stuck":
                assert kills <= DELIVERY_LIMIT + 2, "the delivery limit never struck"
                herald.kill("notification-router")
                kills += 1
                await herald.restart("notification-router")
            dead_lettered_s = elapsed(started)
        finally:
            await transaction.rollback()
            await blocker.close()
        # The router goes on with good messages.
        accepted = await post_burst(client, population, 5, rng=rng, concurrency=1)
    result = await settle(herald, Expectation.of(population, accepted), timeout=60)
    (dead,) = await peek_queue(herald.rabbit_url, dlq)
    reasons = await dead_letter_reasons(herald.rabbit_url)
    fault_report(
        kills=kills,
        delivery_limit=DELIVERY_LIMIT,
        dead_lettered_s=dead_lettered_s,
        reasons=dict(reasons),
        good_messages=len(accepted.messages),
        lost=result.lost,
    )
    assert dead.message_id == str(killer.event_id)
    assert reasons == {f"{dlq} x-death:delivery_limit -": 1}
    # Deliveries 1..limit each ended in a kill; the next return exceeded the limit.
    assert kills == DELIVERY_LIMIT + 1
    assert result.lost == 0
    assert result.duplicates == 0
    assert {name: count for name, count in result.dead_letters.items() if count} == {dlq: 1}
    assert herald.crashed() == {}
