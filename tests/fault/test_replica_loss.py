"""Two replicas of a sender, one SIGKILLed while its provider calls are in flight: the other
replica finishes that work within 10 s (the dead replica's ledger leases are short and no longer
renewed, so they run out within `DELIVERY_LEASE`), and the only repeats are of the calls that
were in flight when it died, each with the first one's collapse id or Message-ID."""

from __future__ import annotations

import random
import time
from collections import Counter

import httpx
import pytest

from tests.support.faults import (
    Accepted,
    Expectation,
    Herald,
    HeraldFactory,
    RecordingFcm,
    RecordingSmtp,
    Report,
    email_notification_id,
    figures,
    ledger_rows,
    observe,
    populated,
    post_one,
    push_notification_id,
    settle,
    steady_traffic,
)
from tests.support.infra import wait_until

pytestmark = pytest.mark.e2e

# The bound: a dead replica's work is finished by another within this, not the lease's
# old 15-60 s.
HANDOVER_BOUND_S = 10.0


async def finished_after(herald: Herald, expected: Expectation, since: float) -> float:
    """Seconds from `since` until the router's ledger holds every expected push and e-mail as
    delivered (the reports are in: the work is finished, not only sent)."""

    async def finished() -> bool:
        current = figures(expected, await observe(herald), {})
        return current.lost == 0 and current.not_delivered_in_ledger == 0

    await wait_until(finished, timeout=60, interval=0.1)
    return time.monotonic() - since


async def test_a_killed_push_sender_replicas_pushes_are_finished_by_the_other_within_10_s(
    fault_report: Report, start_herald: HeraldFactory
) -> None:
    herald = await start_herald(replicas={"push-sender": 2})
    fcm = herald.fcm
    assert isinstance(fcm, RecordingFcm)
    replicas = herald.replicas("push-sender")
    rng = random.Random(41)
    killed: list[tuple[float, str, set[int]]] = []  # when, which, its local ports

    def kill_the_sender(port: int) -> None:
        victim, ports = herald.kill_owner_of(port, replicas)
        killed.append((time.monotonic(), victim, ports))

    async with httpx.AsyncClient(base_url=herald.api, timeout=30) as client:
        population = await populated(
            herald, client, users=8, room_sizes=(8,), rng=rng, max_devices=1
        )
        room = population.rooms[0]
        sender = population.member(room.member_ids[0])
        recipients = [population.member(member) for member in room.member_ids[1:]]
        # The other recipients' pushes are still at the provider (answered 2 s late) when the
        # first one's is accepted and its sender dies before reading the answer.
        for recipient in recipients[1:]:
            fcm.stall(recipient.device_tokens[0], 2.0, times=1)
        fcm.on_accept_from(recipients[0].device_tokens[0], kill_the_sender)
        accepted = Accepted()
        await post_one(client, population, accepted, rng, 0, room=room, sender=sender)

    async def kill_happened() -> bool:
        return bool(killed)

    await wait_until(kill_happened, timeout=30)
    killed_at, victim, victim_ports = killed[0]
    expected = Expectation.of(population, accepted)
    handover_s = await finished_after(herald, expected, killed_at)
    result = await settle(herald, expected, timeout=90)

    with fcm._lock:
        bodies = list(fcm.accepted)
        # The dead replica's calls: those that reached the provider from its connections (some
        # arrive after it died: requests it had written, still on their way).
        in_flight_tokens = {token for token, port in fcm.clients if port in victim_ports}
    notification_of = {
        body["message"]["token"]: push_notification_id(body)
        for body in bodies
        if push_notification_id(body) in expected.pushes
    }
    in_flight = {notification_of[token] for token in in_flight_tokens if token in notification_of}
    copies = Counter(
        push_notification_id(body)
        for body in bodies
        if push_notification_id(body) in expected.pushes
    )
    repeated = {notification_id for notification_id, n in copies.items() if n > 1}
    collapse_ids = {
        push_notification_id(body): {
            (
                body["message"]["apns"]["headers"]["apns-collapse-id"],
                body["message"]["android"]["notification"]["tag"],
            )
            for other in bodies
            if push_notification_id(other) == push_notification_id(body)
        }
        for body in bodies
    }
    fault_report(
        **result.fields(),
        killed=victim,
        sent_by_victim=len(in_flight),
        repeated=len(repeated),
        handover_s=f"{handover_s:.1f}",
    )
    assert result.lost == 0
    assert result.not_delivered_in_ledger == 0
    assert result.duplicate_ledger_rows == 0
    # Repeats only of the dead replica's calls (in flight when it died), once each, with the
    # same keys.
    assert repeated <= in_flight, (repeated, in_flight)
    assert result.most_copies <= 2
    assert all(len(keys) == 1 for keys in collapse_ids.values())
    assert result.duplicate_emails == 0
    assert sum(result.dead_letters.values()) == 0, result.dead_letters
    assert handover_s <= HANDOVER_BOUND_S
    assert herald.crashed().keys() == {victim}  # the other replica did the work


async def test_a_killed_email_sender_replicas_emails_are_finished_by_the_other_within_10_s(
    fault_report: Report, start_herald: HeraldFactory
) -> None:
    herald = await start_herald(replicas={"email-sender": 2})
    smtp = herald.smtp
    assert isinstance(smtp, RecordingSmtp)
    replicas = herald.replicas("email-sender")
    rng = random.Random(43)
    killed: list[tuple[float, str, set[int]]] = []  # when, which, its local ports

    def kill_the_sender(port: int) -> None:
        victim, ports = herald.kill_owner_of(port, replicas)
        killed.append((time.monotonic(), victim, ports))

    async with httpx.AsyncClient(base_url=herald.api, timeout=30) as client:
        population = await populated(
            herald, client, users=8, room_sizes=(8,), rng=rng, max_devices=1
        )
        room = population.rooms[0]
        sender = population.member(room.member_ids[0])
        recipients = [population.member(member) for member in room.member_ids[1:]]
        smtp.on_accept_from(recipients[0].email, kill_the_sender)
        accepted = Accepted()
        await post_one(client, population, accepted, rng, 0, room=room, sender=sender)

    async def kill_happened() -> bool:
        return bool(killed)

    await wait_until(kill_happened, timeout=30)
    killed_at, victim, victim_ports = killed[0]
    expected = Expectation.of(population, accepted)
    handover_s = await finished_after(herald, expected, killed_at)
    result = await settle(herald, expected, timeout=90)

    with smtp._lock:
        message_ids = [str(mail["Message-ID"]) for mail in smtp.received]
        # The dead replica's e-mails: those the server got from its connections.
        from_victim = [message_id for message_id, port in smtp.clients if port in victim_ports]
    copies = Counter(
        email_notification_id(message_id)
        for message_id in message_ids
        if email_notification_id(message_id) in expected.emails
    )
    repeated = {notification_id for notification_id, n in copies.items() if n > 1}
    in_flight = {email_notification_id(message_id) for message_id in from_victim}
    fault_report(
        **result.fields(),
        killed=victim,
        sent_by_victim=len(in_flight),
        repeated=len(repeated),
        handover_s=f"{handover_s:.1f}",
    )
    assert result.lost == 0
    assert result.not_delivered_in_ledger == 0
    assert result.duplicate_ledger_rows == 0
    # Repeats only of e-mails the dead replica had sent (their 250s unread, or its outcomes
    # unrecorded), once each; a repeat carries the same Message-ID, which is how it is counted.
    assert repeated <= in_flight, (repeated, in_flight)
    assert result.most_copies <= 2
    assert result.duplicate_pushes == 0
    assert sum(result.dead_letters.values()) == 0, result.dead_letters
    assert handover_s <= HANDOVER_BOUND_S
    assert herald.crashed().keys() == {victim}


async def test_a_killed_router_replicas_messages_are_routed_by_the_other(
    fault_report: Report, start_herald: HeraldFactory
) -> None:
    """Two routers under steady traffic; one is SIGKILLed and stays dead, and the traffic stops
    with it. What it held unacked (routed or not, published or not) comes back to the other at
    once (its channel closed with it), which routes what was not and publishes what was still
    pending: nothing lost, no ledger row twice, no push or e-mail twice."""
    herald = await start_herald(replicas={"notification-router": 2})
    router_db = herald.databases["notification-router"]
    victim = herald.replicas("notification-router")[0]
    rng = random.Random(43)
    async with httpx.AsyncClient(base_url=herald.api, timeout=30) as client:
        population = await populated(herald, client, users=12, room_sizes=(6, 6), rng=rng)
        async with steady_traffic(client, population, per_second=10, rng=rng) as accepted:

            async def busy() -> bool:
                return await ledger_rows(router_db) >= 150

            await wait_until(busy, timeout=60, interval=0.05)
            herald.kill(victim)
            killed_at = time.monotonic()
            rows_at_kill = await ledger_rows(router_db)
    expected = Expectation.of(population, accepted)
    handover_s = await finished_after(herald, expected, killed_at)
    result = await settle(herald, expected, timeout=90)
    fault_report(
        **result.fields(),
        killed=victim,
        ledger_rows_at_kill=rows_at_kill,
        unrouted_at_kill=len(expected.ledger) - rows_at_kill,
        handover_s=f"{handover_s:.1f}",
    )
    assert set(accepted.statuses) == {201}, accepted.errors[:5]
    assert result.lost == 0
    assert result.not_delivered_in_ledger == 0
    assert result.duplicate_ledger_rows == 0
    assert sum(result.dead_letters.values()) == 0, result.dead_letters
    # Pushes the victim published and whose reports it had not recorded may be sent again by
    # the survivor's republication: the senders dedupe them by notification id.
    assert result.most_copies <= 1
    # No lease to run out here: what the victim held is redelivered the moment its connection
    # drops. `handover_s` (reported, not bounded) is until everything posted is delivered, the
    # routers' backlog at the kill included, which a loaded machine makes long.
    assert herald.crashed().keys() == {victim}
