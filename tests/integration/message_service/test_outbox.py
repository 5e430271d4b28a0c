"""The outbox on the machine's PostgreSQL and RabbitMQ: what was committed is published, once,
persistently, by any number of relays, and a broker outage only delays it."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import aio_pika
import pytest
from fastapi import FastAPI
from sqlmodel import col, select, update
from yarl import URL

from herald_shared.database import run_migrations
from herald_shared.events import utc_now
from herald_shared.topology import MESSAGE_NOTIFICATIONS, RECIPIENT_UPDATES, declare_topology
from message_service import repository
from message_service.app import create_app, service_of
from message_service.models import OutboxEvent
from message_service.outbox import session_scope
from tests.integration.message_service.helpers import drain, nothing_pending, pending, settings_for
from tests.integration.message_service.proxy import TcpProxy
from tests.support.infra import wait_until
from tests.unit.message_service.helpers import client_for, create_room, message_created, register


@pytest.fixture
async def app(pg_url: str, rabbit_url: str) -> AsyncIterator[FastAPI]:
    app = create_app(settings_for(pg_url, rabbit_url))
    async with app.router.lifespan_context(app):
        yield app


async def test_only_what_was_committed_is_published(app: FastAPI, rabbit_url: str) -> None:
    runtime = service_of(app)
    kept, discarded = message_created("kept"), message_created("discarded")

    async with runtime.sessions() as session:
        repository.add_outbox_event(session, event=discarded, event_type=discarded.type)
        await session.flush()  # the row exists in the transaction...
        await session.rollback()  # ...which never commits
    async with session_scope(runtime.sessions, runtime.relay.nudge) as session:
        repository.add_outbox_event(session, event=kept, event_type=kept.type)
        await session.commit()
    await wait_until(lambda: nothing_pending(runtime), timeout=10)

    delivered = await drain(rabbit_url, MESSAGE_NOTIFICATIONS.name)
    assert [json.loads(message.body)["event_id"] for message in delivered] == [str(kept.event_id)]


async def test_a_posted_message_arrives_persistent_on_the_message_queue(
    app: FastAPI, rabbit_url: str
) -> None:
    runtime = service_of(app)
    async with client_for(app) as client:
        alice = await register(client, "alice")
        bob = await register(client, "bob")
        room = await create_room(client, alice, [bob])
        posted = await client.post(
            f"/rooms/{room}/messages", json={"content": "Hello @bob 👋"}, headers=alice.headers
        )
    assert posted.status_code == 201
    await wait_until(lambda: nothing_pending(runtime), timeout=10)

    # Bob's invitation to the room, then the message, on the router's one queue.
    invitation, delivered = await drain(rabbit_url, MESSAGE_NOTIFICATIONS.name)
    assert invitation.routing_key == "room.invitation.created"
    invited = json.loads(invitation.body)
    assert (invited["type"], invited["invitee_id"]) == ("invitation_created", str(bob.id))
    assert invited["room_id"] == str(room)
    assert invited["inviter"]["user_id"] == str(alice.id)
    body = json.loads(delivered.body)
    assert delivered.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert delivered.routing_key == "notification.message.new"
    assert delivered.content_type == "application/json"
    assert delivered.message_id == body["event_id"]
    assert body["type"] == "new_message"
    assert body["message_id"] == posted.json()["id"]
    assert body["recipient_ids"] == [str(bob.id)]
    assert body["mentions"] == [str(bob.id)]
    assert body["message_content"] == "Hello @bob 👋"
    updates = await drain(rabbit_url, RECIPIENT_UPDATES.name)
    assert sorted(json.loads(m.body)["username"] for m in updates) == ["alice", "bob"]
    assert all(m.delivery_mode == aio_pika.DeliveryMode.PERSISTENT for m in updates)


async def test_two_relays_on_one_database_publish_each_row_exactly_once(
    pg_url: str, rabbit_url: str
) -> None:
    settings = settings_for(pg_url, rabbit_url, outbox_batch_size=10)
    runtimes = [service_of(create_app(settings)) for _ in range(2)]
    await run_migrations(
        runtimes[0].engine,
        script_location="message_service:migrations",
        service_name="message-service",
    )
    events = [message_created(f"m{i}") for i in range(400)]
    async with runtimes[0].sessions() as session:
        for event in events:
            repository.add_outbox_event(session, event=event, event_type=event.type)
        await session.commit()
    for runtime in runtimes:
        await runtime.broker.start()
    await declare_topology(runtimes[0].broker, retry_delays=settings.rabbitmq.retry_delays)
    try:
        for runtime in runtimes:
            runtime.relay.start()
        await wait_until(lambda: nothing_pending(runtimes[0]), timeout=60)
    finally:
        for runtime in runtimes:
            await runtime.relay.stop()
            await runtime.broker.stop()
            await runtime.engine.dispose()

    delivered = [
        json.loads(m.body)["event_id"] for m in await drain(rabbit_url, MESSAGE_NOTIFICATIONS.name)
    ]
    assert len(delivered) == len(events)
    assert set(delivered) == {str(event.event_id) for event in events}
    counts = [
        runtime.registry.get_sample_value(
            "herald_message_outbox_published_total", {"event_type": "new_message"}
        )
        or 0.0
        for runtime in runtimes
    ]
    assert sum(counts) == len(events)
    assert all(count > 0 for count in counts), counts  # both relays really took part


async def test_unpublishable_rows_never_hold_back_the_rows_behind_them(
    pg_url: str, rabbit_url: str
) -> None:
    settings = settings_for(pg_url, rabbit_url, outbox_batch_size=3)
    runtime = service_of(create_app(settings))
    await run_migrations(
        runtime.engine, script_location="message_service:migrations", service_name="message-service"
    )
    good = message_created()
    async with runtime.sessions() as session:
        for _ in range(3):
            session.add(
                OutboxEvent(event_id=uuid.uuid4(), event_type="new_message", payload="{bad")
            )
        await session.commit()
        repository.add_outbox_event(session, event=good, event_type=good.type)
        await session.commit()
    await runtime.broker.start()
    await declare_topology(runtime.broker, retry_delays=settings.rabbitmq.retry_delays)
    try:
        first = await runtime.relay.publish_pending()
        second = await runtime.relay.publish_pending()
        assert (first.claimed, first.published) == (3, 0)
        assert (second.claimed, second.published) == (1, 1)
        held = await pending(runtime)
        assert [row.payload for row in held] == ["{bad"] * 3  # not published, not deleted
        assert all(row.retry_at is not None and row.retry_at > utc_now() for row in held)

        async with runtime.sessions() as session:  # their hold passes
            past = utc_now() - timedelta(seconds=1)
            await session.exec(update(OutboxEvent).values(retry_at=past))
            await session.commit()
        again = await runtime.relay.publish_pending()
        assert (again.claimed, again.published) == (3, 0)
        assert [row.attempts for row in await pending(runtime)] == [2, 2, 2]
    finally:
        await runtime.broker.stop()
        await runtime.engine.dispose()

    delivered = await drain(rabbit_url, MESSAGE_NOTIFICATIONS.name)
    assert [json.loads(m.body)["event_id"] for m in delivered] == [str(good.event_id)]


async def test_a_broker_outage_delays_notifications_but_never_fails_a_message(
    pg_url: str, rabbit_url: str
) -> None:
    target = URL(rabbit_url)
    proxy = TcpProxy(target.host or "127.0.0.1", target.port or 5672)
    await proxy.start()
    proxied = str(
        target.with_host("127.0.0.1").with_port(proxy.port).with_query(reconnect_interval="0.3")
    )
    app = create_app(settings_for(pg_url, proxied, outbox_max_backoff=0.3))
    runtime = service_of(app)
    async with app.router.lifespan_context(app), client_for(app) as client:
        alice = await register(client, "alice")
        bob = await register(client, "bob")
        room = await create_room(client, alice, [bob])
        await wait_until(lambda: nothing_pending(runtime), timeout=10)

        await proxy.cut()

        async def broker_down() -> bool:
            return (await client.get("/health/ready")).status_code == 503

        await wait_until(broker_down, timeout=10)
        started = time.monotonic()
        posted = await client.post(
            f"/rooms/{room}/messages", json={"content": "still works"}, headers=alice.headers
        )
        elapsed = time.monotonic() - started
        assert posted.status_code == 201
        assert elapsed < 1.0  # well under the 2 s publish timeout: the request never waited

        async def attempted_and_kept() -> list[OutboxEvent]:
            return [row for row in await pending(runtime) if row.attempts >= 2]

        (waiting,) = await wait_until(attempted_and_kept, timeout=15)
        assert waiting.event_type == "new_message"
        assert waiting.last_error is not None

        await proxy.restore()
        await wait_until(lambda: nothing_pending(runtime), timeout=30)

        async def ready_again() -> bool:
            # The relay's publisher can be back before the consumer's channel is.
            return (await client.get("/health/ready")).status_code == 200

        await wait_until(ready_again, timeout=10)
    await proxy.cut()

    delivered = await drain(rabbit_url, MESSAGE_NOTIFICATIONS.name)
    assert [json.loads(m.body).get("message_id") for m in delivered] == [
        None,  # Bob's invitation, published before the outage
        posted.json()["id"],
    ]


async def test_concurrent_retries_with_one_idempotency_key_store_one_message(app: FastAPI) -> None:
    runtime = service_of(app)
    async with client_for(app) as client:
        alice = await register(client, "alice")
        room = await create_room(client, alice, [])
        headers = {**alice.headers, "Idempotency-Key": "retry-storm"}

        responses = await asyncio.gather(
            *(
                client.post(f"/rooms/{room}/messages", json={"content": "once"}, headers=headers)
                for _ in range(8)
            )
        )
        listed = await client.get(f"/rooms/{room}/messages", headers=alice.headers)

    assert {r.status_code for r in responses} == {201}
    assert len({r.json()["id"] for r in responses}) == 1
    assert len(listed.json()["items"]) == 1
    async with runtime.sessions() as session:
        rows = (await session.exec(select(OutboxEvent))).all()
    assert [row.event_type for row in rows].count("new_message") == 1


async def test_concurrent_changes_to_a_user_get_distinct_versions(app: FastAPI) -> None:
    runtime = service_of(app)
    async with client_for(app) as client:
        alice = await register(client, "alice")
        responses = await asyncio.gather(
            *(
                client.patch(
                    "/users/me", json={"display_name": f"Alice {i}"}, headers=alice.headers
                )
                for i in range(10)
            ),
            *(
                client.post(
                    "/users/me/devices",
                    json={"platform": "fcm", "token": f"tok-{i}"},
                    headers=alice.headers,
                )
                for i in range(5)
            ),
        )
    assert all(r.status_code in {200, 201} for r in responses)

    async with runtime.sessions() as session:
        rows = (await session.exec(select(OutboxEvent).order_by(col(OutboxEvent.seq)))).all()
    versions = [
        json.loads(row.payload)["version"] for row in rows if row.event_type == "user_updated"
    ]
    assert sorted(versions) == list(range(1, 17))
    last = max((json.loads(row.payload) for row in rows), key=lambda p: p.get("version", 0))
    assert len(last["devices"]) == 5
