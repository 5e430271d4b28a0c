"""A sender SIGKILLed after its provider accepted and before it could record that: at-least-once
means the push (or e-mail) goes out again, once, with the same collapse id (or Message-ID), so the
phone replaces the first notification instead of showing two."""

from __future__ import annotations

import random
import time

import httpx
import pytest

from tests.support.faults import (
    SHORT_LEASES,
    Accepted,
    Expectation,
    HeraldFactory,
    RecordingFcm,
    RecordingSmtp,
    Report,
    elapsed,
    populated,
    post_one,
    push_notification_id,
    settle,
)
from tests.support.infra import wait_until

pytestmark = pytest.mark.e2e


async def test_a_sender_killed_between_provider_and_ledger_pushes_again_once_with_one_collapse_id(
    fault_report: Report, start_herald: HeraldFactory
) -> None:
    # The redelivered job waits (deferred, no attempt spent) for the dead attempt's 19 s lease.
    herald = await start_herald(overrides=SHORT_LEASES)
    fcm = herald.fcm
    assert isinstance(fcm, RecordingFcm)
    rng = random.Random(29)
    async with httpx.AsyncClient(base_url=herald.api, timeout=30) as client:
        population = await populated(
            herald, client, users=2, room_sizes=(2,), rng=rng, max_devices=1
        )
        room = population.rooms[0]
        sender, recipient = (population.member(member) for member in room.member_ids)
        token = recipient.device_tokens[0]
        fcm.on_accept(token, lambda: herald.kill("push-sender"))
        accepted = Accepted()
        await post_one(client, population, accepted, rng, 0, room=room, sender=sender)

    async def killed() -> bool:
        return "push-sender" in herald.crashed()

    await wait_until(killed, timeout=30)
    killed_at = time.monotonic()
    assert len(fcm.messages_to(token)) == 1  # accepted, and its answer never read
    await herald.restart("push-sender")
    result = await settle(herald, Expectation.of(population, accepted), timeout=90)
    pushes = fcm.messages_to(token)
    collapse_ids = {
        (
            str(push_notification_id(push)),
            push["message"]["apns"]["headers"]["apns-collapse-id"],
            push["message"]["android"]["notification"]["tag"],
            push["message"]["android"]["collapse_key"],
        )
        for push in pushes
    }
    fault_report(
        **result.fields(),
        pushes_to_victim=len(pushes),
        collapse_ids=len(collapse_ids),
        recover_s=elapsed(killed_at),
    )
    assert result.lost == 0
    assert result.not_delivered_in_ledger == 0
    # At most one duplicate per crash, and it carries the first push's collapse ids everywhere:
    # the notification's on iOS, the room's on Android (a room has one notification there).
    assert len(pushes) <= 2
    assert len(collapse_ids) == 1
    ((notification_id, apns_collapse_id, tag, collapse_key),) = collapse_ids
    assert notification_id == apns_collapse_id
    assert tag == collapse_key == pushes[0]["message"]["data"]["room_id"]
    assert result.duplicate_emails == 0
    assert sum(result.dead_letters.values()) == 0, result.dead_letters
    assert herald.crashed() == {}


async def test_an_email_sender_killed_after_the_server_accepted_sends_once_more_same_message_id(
    fault_report: Report, start_herald: HeraldFactory
) -> None:
    herald = await start_herald(overrides=SHORT_LEASES)
    smtp = herald.smtp
    assert isinstance(smtp, RecordingSmtp)
    rng = random.Random(31)
    async with httpx.AsyncClient(base_url=herald.api, timeout=30) as client:
        population = await populated(
            herald, client, users=2, room_sizes=(2,), rng=rng, max_devices=1
        )
        room = population.rooms[0]
        sender, recipient = (population.member(member) for member in room.member_ids)
        smtp.on_accept(recipient.email, lambda: herald.kill("email-sender"))
        accepted = Accepted()
        await post_one(client, population, accepted, rng, 0, room=room, sender=sender)

    async def killed() -> bool:
        return "email-sender" in herald.crashed()

    await wait_until(killed, timeout=30)
    killed_at = time.monotonic()
    assert len(smtp.messages_to(recipient.email)) == 1  # accepted, and its 250 never read
    await herald.restart("email-sender")
    result = await settle(herald, Expectation.of(population, accepted), timeout=90)
    emails = smtp.messages_to(recipient.email)
    message_ids = {str(email["Message-ID"]) for email in emails}
    fault_report(
        **result.fields(),
        emails_to_victim=len(emails),
        message_ids=len(message_ids),
        recover_s=elapsed(killed_at),
    )
    assert result.lost == 0
    assert result.not_delivered_in_ledger == 0
    # At most one duplicate per crash, with the first e-mail's Message-ID (clients thread or
    # deduplicate on it).
    assert len(emails) <= 2
    assert len(message_ids) == 1
    assert result.duplicate_pushes == 0
    assert sum(result.dead_letters.values()) == 0, result.dead_letters
    assert herald.crashed() == {}
