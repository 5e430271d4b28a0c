"""The push provider failing transiently, for ever, for one device: that job is tried 1 +
RABBITMQ_MAX_RETRIES times on the retry tiers, then parked (in the delivery that carries it) in
push_notifications.dlq and reported failed; everything else is delivered, once."""

from __future__ import annotations

import itertools
import json
import random
import uuid

import httpx
import pytest

from herald_shared.events import Channel, notification_id_for
from herald_shared.retry import ATTEMPT_HEADER, REASON_HEADER
from herald_shared.topology import PUSH_NOTIFICATIONS
from tests.support.faults import (
    Accepted,
    Expectation,
    HeraldFactory,
    RecordingFcm,
    Report,
    observe,
    peek_queue,
    populated,
    post_one,
    settle,
)
from tests.support.infra import wait_until

pytestmark = pytest.mark.e2e

TIERS = (0.2, 0.5, 1.0)
MAX_RETRIES = 3
# How much later than its tier a retry may come (processing, TTL expiry sweeps, a busy machine).
SLACK = 1.0


async def test_a_transient_provider_failure_is_retried_on_the_tiers_then_dead_lettered(
    fault_report: Report, start_herald: HeraldFactory
) -> None:
    herald = await start_herald(
        overrides={
            "RABBITMQ_RETRY_DELAYS": ",".join(str(tier) for tier in TIERS),
            "RABBITMQ_MAX_RETRIES": str(MAX_RETRIES),
        }
    )
    fcm = herald.fcm
    assert isinstance(fcm, RecordingFcm)
    rng = random.Random(17)
    async with httpx.AsyncClient(base_url=herald.api, timeout=30) as client:
        population = await populated(
            herald, client, users=4, room_sizes=(4,), rng=rng, max_devices=1
        )
        room = population.rooms[0]
        sender, *recipients = (population.member(member) for member in room.member_ids)
        failing = recipients[0]
        fcm.fail(failing.device_tokens[0], 503, "UNAVAILABLE")  # for ever
        accepted = Accepted()
        await post_one(client, population, accepted, rng, 0, room=room, sender=sender)
    (message_id,) = accepted.messages
    parked = notification_id_for(
        message_id=message_id,
        recipient_id=failing.id,
        channel=Channel.PUSH,
        target=str(failing.device_ids[0]),
    )
    expected = Expectation.of(population, accepted).without(pushes=[parked])
    result = await settle(herald, expected, timeout=60)

    attempts = fcm.attempts_for(failing.device_tokens[0])
    gaps = [round(later - earlier, 3) for earlier, later in itertools.pairwise(attempts)]
    dead = await peek_queue(herald.rabbit_url, PUSH_NOTIFICATIONS.dead_letter_queue.name)
    observed = await observe(herald)
    fault_report(
        **result.fields(),
        attempts=len(attempts),
        gaps_s="/".join(str(gap) for gap in gaps),
        tiers_s="/".join(str(tier) for tier in TIERS),
        parked_ledger_status=observed.delivery_status.get(parked),
    )
    assert len(attempts) == 1 + MAX_RETRIES
    for gap, tier in zip(gaps, TIERS, strict=True):
        assert tier * 0.9 <= gap <= tier + SLACK, (gaps, TIERS)
    assert len(dead) == 1
    headers = dead[0].headers or {}
    assert headers[REASON_HEADER] == "retries-exhausted"
    assert headers[ATTEMPT_HEADER] == 1 + MAX_RETRIES
    # The whole delivery that carried it (the message's pushes, as the router publishes them)
    # was dead-lettered with it: its other jobs had been delivered on the first attempt and were
    # no-ops on every retry.
    dead_batch = json.loads(dead[0].body)
    assert dead_batch["type"] == "push_jobs_requested"
    batch_ids = {job["notification_id"] for job in dead_batch["jobs"]}
    assert str(parked) in batch_ids
    # Every other target was delivered, once; nothing else was dead-lettered.
    assert result.lost == 0
    assert result.duplicates == 0
    assert result.not_delivered_in_ledger == 0
    assert {name: count for name, count in result.dead_letters.items() if count} == {
        PUSH_NOTIFICATIONS.dead_letter_queue.name: 1
    }

    # The dead-lettered job was reported failed, so the router's ledger does not keep it pending.
    async def parked_status() -> str | None:
        status = (await observe(herald)).delivery_status.get(parked)
        return status if status == "failed" else None

    assert await wait_until(parked_status, timeout=10) == "failed"
    # ... and the hook's "failed" report for the whole batch left its delivered jobs delivered.
    statuses = (await observe(herald)).delivery_status
    assert {statuses.get(uuid.UUID(id_)) for id_ in batch_ids - {str(parked)}} == {"delivered"}
    assert herald.crashed() == {}
