"""The real-time stream with two message-service replicas on one database: Bob's stream on one,
Alice posting through the other (four requests at a time, so transactions commit out of order),
every message reaches Bob's stream promptly; a forced reconnect, to the other replica, with
`Last-Event-ID` misses nothing and repeats nothing."""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.fakes.fcm import FakeFcm
from tests.fakes.smtp import FakeSmtp
from tests.support import infra
from tests.support.faults import emit
from tests.support.processes import ServiceProcess, free_port, service_env
from tests.support.sse import SseClient, SseEvent

MESSAGES = 200
RECONNECT_AFTER = 100
CONCURRENT_POSTS = 4


@pytest.fixture
async def replicas(
    rabbit_url: str, fcm: FakeFcm, smtp: FakeSmtp, credentials: Path, tmp_path: Path
) -> AsyncIterator[tuple[ServiceProcess, ServiceProcess]]:
    database = await infra.create_database()
    environment = service_env(
        rabbit_url=rabbit_url,
        databases={"message-service": database}
        | dict.fromkeys(("notification-router", "push-sender", "email-sender"), ""),
        fcm=fcm,
        credentials=credentials,
        smtp=smtp,
    )["message-service"]
    # Alice posts 200 messages within seconds: above the default posting budget (per user).
    environment["RATE_LIMIT_POSTING"] = f"{MESSAGES} per minute"
    started = [
        ServiceProcess(
            name="message-service",
            port=free_port(),
            env=environment,
            log_path=tmp_path / f"message-service-{index}.log",
        )
        for index in range(2)
    ]
    try:
        for replica in started:  # one after the other: the first migrates the database
            replica.start()
            await asyncio.to_thread(replica.wait_ready)
        yield started[0], started[1]
    finally:
        # SIGTERM with a stream open: the stream ends, and the replica exits 0.
        codes = [replica.stop() for replica in started]
        await infra.drop_database(database)
    assert codes == [0, 0], [replica.log()[-3000:] for replica in started]


async def test_a_stream_on_one_replica_shows_what_the_other_stored_once_across_a_reconnect(
    replicas: tuple[ServiceProcess, ServiceProcess], request: pytest.FixtureRequest
) -> None:
    first, second = replicas
    async with httpx.AsyncClient(timeout=10) as client:

        async def register(name: str) -> dict[str, str]:
            response = await client.post(
                f"{first.base_url}/users",
                json={
                    "username": name,
                    "display_name": name,
                    "email": f"{name}@example.test",
                    "password": "correct horse battery",
                },
            )
            assert response.status_code == 201, response.text
            user: dict[str, str] = response.json()
            return user

        alice, bob = await register("alice"), await register("bob")
        alice_auth = {"Authorization": f"Bearer {alice['token']}"}
        room = await client.post(
            f"{first.base_url}/rooms",
            json={"name": "general", "member_ids": [bob["id"]]},
            headers=alice_auth,
        )
        assert room.status_code == 201, room.text
        room_id = room.json()["id"]
        joined = await client.post(
            f"{first.base_url}/rooms/{room_id}/join",
            headers={"Authorization": f"Bearer {bob['token']}"},
        )
        assert joined.status_code == 200, joined.text

        posted_at: dict[str, float] = {}
        numbers = iter(range(MESSAGES))
        halfway = asyncio.Event()

        async def poster() -> None:
            for number in numbers:
                if number == RECONNECT_AFTER:
                    halfway.set()
                response = await client.post(
                    f"{second.base_url}/rooms/{room_id}/messages",
                    json={"content": f"message {number}"},
                    headers=alice_auth,
                )
                assert response.status_code == 201, response.text
                posted_at[response.json()["id"]] = time.monotonic()

        async def take(stream: SseClient, until: set[str]) -> list[SseEvent]:
            """The stream's message events until every id of `until` came (or the stream
            ends), within 30 s."""
            taken: list[SseEvent] = []
            async with asyncio.timeout(30):
                while not until <= {event.json()["id"] for event in taken}:
                    taken.append(await stream.events.get())
            return taken

        async with SseClient(first.base_url, bob["token"]) as before:
            posting = [asyncio.create_task(poster()) for _ in range(CONCURRENT_POSTS)]
            await halfway.wait()
            # What has come by now; then the connection drops.
            await asyncio.sleep(0)
            before_events = before.pending()
        dropped_at = time.monotonic()
        last_id = next((event.id for event in reversed(before_events)), None)
        assert last_id is not None  # something came before the drop
        async with SseClient(second.base_url, bob["token"], last_event_id=last_id) as after:
            reconnected_at = time.monotonic()
            await asyncio.gather(*posting)
            missing = set(posted_at) - {event.json()["id"] for event in before_events}
            after_events = await take(after, missing)
            await asyncio.sleep(0.5)  # a repeat, if any, would come right behind
            after_events += after.pending()

    shown = [event.json()["id"] for event in (*before_events, *after_events)]
    assert sorted(shown) == sorted(posted_at)  # every message, once
    assert len(shown) == len(set(shown)) == MESSAGES
    for events in (before_events, after_events):
        positions = [tuple(map(int, (event.id or "").split("-"))) for event in events]
        assert positions == sorted(positions)
        assert all(a < b for a, b in itertools.pairwise(positions))
    # From the 201 to the stream, for the messages stored while a stream was open (those of the
    # gap come with the reconnect).
    latencies = sorted(
        event.received_at - posted_at[event.json()["id"]]
        for event in (*before_events, *after_events)
        if not dropped_at <= posted_at[event.json()["id"]] <= reconnected_at
    )
    p99 = latencies[int(0.99 * (len(latencies) - 1))]
    emit(
        request.config,
        f"STREAM two_replicas messages={MESSAGES} p50_s={statistics.median(latencies):.3f}"
        f" p99_s={p99:.3f} max_s={latencies[-1]:.3f} before_reconnect={len(before_events)}"
        f" after_reconnect={len(after_events)}",
        request.node,
    )
    # The bound; measured 0.1-0.2 s p99 on an idle machine (one poll of the outbox).
    assert p99 <= 1.0
