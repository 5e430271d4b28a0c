"""The outbox relay: in order, at least once, never blocking a request, never dying."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from typing import Any, cast

import pytest
from faststream.rabbit.publisher import RabbitPublisher
from prometheus_client import CollectorRegistry
from sqlmodel import col, select, update

from herald_shared.broker import RabbitSettings
from herald_shared.database import run_migrations
from herald_shared.events import (
    EVENT_ADAPTER,
    Event,
    Platform,
    UserUpdated,
    utc_now,
)
from message_service import repository
from message_service.app import MessageService, create_app, service_of
from message_service.models import OutboxEvent
from message_service.outbox import (
    UNPUBLISHABLE_HOLD,
    UNPUBLISHABLE_MAX_HOLD,
    OutboxMetrics,
    OutboxRelay,
    session_scope,
    unpublishable_hold,
)
from tests.support.infra import wait_until
from tests.unit.message_service.helpers import (
    CLOSED_RABBITMQ_URL,
    client_for,
    create_room,
    make_settings,
    message_created,
    outbox_rows,
    published,
    register,
    running_app,
)


class FakePublisher:
    """Records what it publishes; fails while `failing` is set."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.failing = False
        self.calls = 0

    async def publish(self, message: bytes, **kwargs: Any) -> None:
        self.calls += 1
        if self.failing:
            raise ConnectionError("broker unreachable")
        # The relay publishes the JSON it stored: parsed here, so that tests compare events.
        self.events.append({"event": EVENT_ADAPTER.validate_json(message), **kwargs})


@pytest.fixture
async def runtime(sqlite_url: str) -> AsyncIterator[MessageService]:
    """The database of a migrated app, without its lifespan: nothing else publishes."""
    runtime = service_of(create_app(make_settings(sqlite_url)))
    await run_migrations(
        runtime.engine, script_location="message_service:migrations", service_name="message-service"
    )
    yield runtime
    await runtime.engine.dispose()


@pytest.fixture
def publisher() -> FakePublisher:
    return FakePublisher()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def make_relay(
    runtime: MessageService,
    publisher: FakePublisher,
    registry: CollectorRegistry,
    **overrides: Any,
) -> OutboxRelay:
    fake = cast(RabbitPublisher, publisher)
    options: dict[str, Any] = {
        "publish_timeout": 1.0,
        "batch_size": 10,
        "interval": 0.05,
        "max_backoff": 0.2,
        **overrides,
    }
    return OutboxRelay(
        engine=runtime.engine,
        publishers={"new_message": fake, "user_updated": fake},
        metrics=OutboxMetrics(registry),
        **options,
    )


async def stage(runtime: MessageService, events: Sequence[Event], *, commit: bool = True) -> None:
    async with runtime.sessions() as session:
        for event in events:
            repository.add_outbox_event(
                session, event=event, event_type=str(event.model_dump()["type"])
            )
        if commit:
            await session.commit()
        else:
            await session.rollback()


async def pending(runtime: MessageService) -> list[OutboxEvent]:
    return [row for row in await outbox_rows(runtime) if row.published_at is None]


async def end_holds(runtime: MessageService) -> None:
    """As if the hold of every held row had passed."""
    async with runtime.sessions() as session:
        past = utc_now() - timedelta(seconds=1)
        await session.exec(
            update(OutboxEvent).where(col(OutboxEvent.retry_at).is_not(None)).values(retry_at=past)
        )
        await session.commit()


async def add_unpublishable(runtime: MessageService, count: int) -> None:
    async with runtime.sessions() as session:
        for _ in range(count):
            session.add(
                OutboxEvent(event_id=uuid.uuid4(), event_type="new_message", payload="{bad")
            )
        await session.commit()


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def test_pending_rows_are_published_in_order_and_marked(
    runtime: MessageService, publisher: FakePublisher, registry: CollectorRegistry
) -> None:
    events = [message_created(f"m{i}") for i in range(3)]
    await stage(runtime, events)
    relay = make_relay(runtime, publisher, registry)

    result = await relay.publish_pending()

    assert (result.claimed, result.published, result.failed) == (3, 3, False)
    assert [e["event"] for e in publisher.events] == events
    assert [e["message_id"] for e in publisher.events] == [str(e.event_id) for e in events]
    assert await pending(runtime) == []
    assert all(row.attempts == 1 for row in await outbox_rows(runtime))
    assert sample(registry, "herald_message_outbox_published_total", event_type="new_message") == 3
    assert (await relay.publish_pending()).claimed == 0


async def test_a_rolled_back_transaction_publishes_nothing(
    runtime: MessageService, publisher: FakePublisher, registry: CollectorRegistry
) -> None:
    kept, discarded = message_created("kept"), message_created("discarded")
    await stage(runtime, [discarded], commit=False)
    await stage(runtime, [kept])

    await make_relay(runtime, publisher, registry).publish_pending()

    assert [e["event"] for e in publisher.events] == [kept]


async def test_a_failed_publish_keeps_its_row_pending_and_backs_off(
    runtime: MessageService, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    events = [message_created(f"private text {i}") for i in range(3)]
    await stage(runtime, events)

    class FailsSecond(FakePublisher):
        async def publish(self, message: bytes, **kwargs: Any) -> None:
            self.failing = self.calls == 1
            await super().publish(message, **kwargs)

    flaky = FailsSecond()
    with caplog.at_level(logging.WARNING):
        result = await make_relay(runtime, flaky, registry).publish_pending()

    # Published at once, confirms in flight together: the others of the batch go out.
    assert (result.published, result.failed) == (2, True)
    rows = await outbox_rows(runtime)
    assert [row.published_at is not None for row in rows] == [True, False, True]
    assert [row.attempts for row in rows] == [1, 1, 1]
    assert rows[1].last_error is not None
    assert "ConnectionError" in rows[1].last_error
    assert rows[1].retry_at is None  # the broker's fault: retried in its turn, after the backoff
    assert (
        sample(registry, "herald_message_outbox_publish_failures_total", event_type="new_message")
        == 1
    )
    assert f"event_id={events[1].event_id}" in caplog.text
    assert "private text" not in caplog.text


async def test_an_unpublishable_row_does_not_block_the_others(
    runtime: MessageService, publisher: FakePublisher, registry: CollectorRegistry
) -> None:
    good = message_created()
    async with runtime.sessions() as session:
        session.add(OutboxEvent(event_id=uuid.uuid4(), event_type="new_message", payload="{bad"))
        session.add(
            OutboxEvent(event_id=uuid.uuid4(), event_type="mystery", payload=good.model_dump_json())
        )
        await session.commit()
    await stage(runtime, [good])

    result = await make_relay(runtime, publisher, registry).publish_pending()

    assert (result.published, result.failed) == (1, False)
    assert [e["event"] for e in publisher.events] == [good]
    broken = await pending(runtime)
    assert len(broken) == 2
    assert all(row.attempts == 1 and row.last_error for row in broken)
    assert all(row.retry_at is not None and row.retry_at > utc_now() for row in broken)


async def test_more_unpublishable_rows_than_a_batch_never_hold_back_the_rows_behind_them(
    runtime: MessageService, publisher: FakePublisher, registry: CollectorRegistry
) -> None:
    await add_unpublishable(runtime, 3)
    good = message_created()
    await stage(runtime, [good])
    relay = make_relay(runtime, publisher, registry, batch_size=2)

    started = utc_now()
    results = [await relay.publish_pending() for _ in range(3)]

    # The bad rows are held once tried: the good one goes out in the second cycle.
    assert [(r.claimed, r.published, r.failed) for r in results] == [
        (2, 0, False),
        (2, 1, False),
        (0, 0, False),
    ]
    assert [e["event"] for e in publisher.events] == [good]
    held = await pending(runtime)
    assert len(held) == 3  # not published...
    assert len(await outbox_rows(runtime)) == 4  # ...nor deleted
    for row in held:
        assert row.attempts == 1
        assert row.last_error
        assert row.retry_at is not None
        assert started + UNPUBLISHABLE_HOLD <= row.retry_at <= utc_now() + UNPUBLISHABLE_HOLD

    # Once their hold has passed they are claimed again (and held longer).
    await end_holds(runtime)
    again = await relay.publish_pending()
    assert (again.claimed, again.published, again.failed) == (2, 0, False)
    assert [row.attempts for row in await pending(runtime)] == [2, 2, 1]
    assert (await relay.publish_pending()).claimed == 1
    assert len(await pending(runtime)) == 3
    assert [e["event"] for e in publisher.events] == [good]


async def test_a_type_this_version_cannot_publish_is_held_for_one_that_can(
    runtime: MessageService, publisher: FakePublisher, registry: CollectorRegistry
) -> None:
    """A rolling upgrade: an older replica's relay claims a row of a type only the newer one
    publishes; the row stays pending and the newer relay publishes it."""
    event = message_created()
    await stage(runtime, [event])
    older = OutboxRelay(
        engine=runtime.engine,
        publishers={},
        metrics=OutboxMetrics(CollectorRegistry()),
        publish_timeout=1.0,
    )
    newer = make_relay(runtime, publisher, registry)

    assert (await older.publish_pending()).published == 0
    assert (await newer.publish_pending()).claimed == 0  # held, for either relay
    await end_holds(runtime)
    assert (await newer.publish_pending()).published == 1

    assert [e["event"] for e in publisher.events] == [event]
    assert await pending(runtime) == []


def test_the_hold_grows_with_the_attempts_up_to_a_maximum() -> None:
    holds = [unpublishable_hold(attempts) for attempts in range(12)]
    assert holds[0] == UNPUBLISHABLE_HOLD
    assert holds == sorted(holds)
    assert holds[-1] == UNPUBLISHABLE_MAX_HOLD
    assert unpublishable_hold(10**6) == UNPUBLISHABLE_MAX_HOLD


async def test_the_loop_survives_failures_backs_off_and_catches_up(
    runtime: MessageService, publisher: FakePublisher, registry: CollectorRegistry
) -> None:
    event = message_created()
    await stage(runtime, [event])
    publisher.failing = True
    relay = make_relay(runtime, publisher, registry)
    relay.start()
    try:

        async def failed_twice() -> bool:
            return publisher.calls >= 2

        await wait_until(failed_twice, timeout=5)
        assert (await pending(runtime))[0].attempts >= 2
        publisher.failing = False

        async def all_published() -> bool:
            return not await pending(runtime)

        await wait_until(all_published, timeout=5)
    finally:
        await relay.stop()
    assert not relay.running
    assert [e["event"] for e in publisher.events] == [event]


async def test_the_loop_survives_a_broken_database(
    runtime: MessageService,
    publisher: FakePublisher,
    registry: CollectorRegistry,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    claim = repository.claim_pending
    broken = True

    async def flaky_claim(*args: Any, **kwargs: Any) -> Any:
        if broken:
            raise OSError("database is down")
        return await claim(*args, **kwargs)

    monkeypatch.setattr(repository, "claim_pending", flaky_claim)
    await stage(runtime, [message_created()])
    relay = make_relay(runtime, publisher, registry)
    relay.start()
    try:

        async def logged() -> bool:
            return "message_service.outbox.cycle_failed" in caplog.text

        await wait_until(logged, timeout=5)
        broken = False

        async def delivered() -> bool:
            return bool(publisher.events)

        await wait_until(delivered, timeout=5)
        assert relay.running
    finally:
        await relay.stop()


async def test_a_nudge_wakes_the_relay_long_before_its_interval(
    runtime: MessageService, publisher: FakePublisher, registry: CollectorRegistry
) -> None:
    relay = make_relay(runtime, publisher, registry, interval=60.0)
    relay.start()
    try:
        await asyncio.sleep(0)  # let the first (empty) cycle start and go to sleep
        async with session_scope(runtime.sessions, relay.nudge) as session:
            repository.add_outbox_event(session, event=message_created(), event_type="new_message")
            await session.commit()

        async def delivered() -> bool:
            return bool(publisher.events)

        await wait_until(delivered, timeout=5)
    finally:
        await relay.stop(timeout=5)


async def test_session_scope_nudges_only_after_an_outbox_write(runtime: MessageService) -> None:
    nudges: list[bool] = []

    async with session_scope(runtime.sessions, lambda: nudges.append(True)) as session:
        await repository.pending_stats(await session.connection())
    assert nudges == []

    async def failing_use_case() -> None:
        async with session_scope(runtime.sessions, lambda: nudges.append(True)) as session:
            repository.add_outbox_event(session, event=message_created(), event_type="new_message")
            raise RuntimeError("use case failed")

    with pytest.raises(RuntimeError):
        await failing_use_case()
    assert nudges == []
    async with session_scope(runtime.sessions, lambda: nudges.append(True)) as session:
        repository.add_outbox_event(session, event=message_created(), event_type="new_message")
        await session.commit()
    assert nudges == [True]


async def test_gauges_count_pending_rows_and_purge_drops_only_old_published_ones(
    runtime: MessageService, publisher: FakePublisher, registry: CollectorRegistry
) -> None:
    relay = make_relay(runtime, publisher, registry, retention=3600.0)
    await stage(runtime, [message_created() for _ in range(3)])
    await relay.refresh_gauges()
    assert sample(registry, "herald_message_outbox_pending") == 3
    assert sample(registry, "herald_message_outbox_oldest_pending_age_seconds") >= 0

    await relay.publish_pending()
    await stage(runtime, [message_created()])
    async with runtime.sessions() as session:
        rows = (await session.exec(select(OutboxEvent).order_by(col(OutboxEvent.seq)))).all()
        rows[0].published_at = utc_now() - timedelta(hours=2)
        await session.commit()

    assert await relay.purge() == 1
    await relay.refresh_gauges()
    assert len(await outbox_rows(runtime)) == 3
    assert sample(registry, "herald_message_outbox_pending") == 1


async def test_the_app_relay_publishes_through_the_broker(sqlite_url: str) -> None:
    async with running_app(make_settings(sqlite_url)) as app, client_for(app) as client:
        runtime = service_of(app)
        alice = await register(client, "alice")
        bob = await register(client, "bob")
        room = await create_room(client, alice, [bob])
        await client.post(
            "/users/me/devices", json={"platform": "fcm", "token": "tok-b"}, headers=bob.headers
        )
        posted = await client.post(
            f"/rooms/{room}/messages", json={"content": "hi @bob"}, headers=alice.headers
        )
        message_mock = runtime.publishers["new_message"].mock
        user_mock = runtime.publishers["user_updated"].mock
        assert message_mock is not None
        assert user_mock is not None

        async def all_published() -> bool:
            return len(published(message_mock)) == 1 and len(published(user_mock)) == 3

        await wait_until(all_published, timeout=5)
        assert await pending(runtime) == []
        (message,) = published(message_mock)
        updates = [UserUpdated.model_validate(body) for body in published(user_mock)]

    assert message["message_id"] == posted.json()["id"]
    assert message["recipient_ids"] == [str(bob.id)]
    assert message["mentions"] == [str(bob.id)]
    assert sorted((u.username, u.version) for u in updates) == [
        ("alice", 1),
        ("bob", 1),
        ("bob", 2),
    ]
    bob_now = next(u for u in updates if (u.username, u.version) == ("bob", 2))
    assert [(d.platform, d.token) for d in bob_now.devices] == [(Platform.FCM, "tok-b")]


async def test_http_requests_never_wait_for_the_broker(sqlite_url: str) -> None:
    """The relay is stuck on a publish that never confirms: requests still succeed at once (on
    SQLite too, where an open transaction would hold the whole database)."""
    rabbitmq = RabbitSettings(url=CLOSED_RABBITMQ_URL, publish_timeout=30.0)
    settings = make_settings(sqlite_url, rabbitmq=rabbitmq)
    async with running_app(settings) as app, client_for(app) as client:
        runtime = service_of(app)
        blocked = asyncio.Event()

        async def hang(*args: Any, **kwargs: Any) -> None:
            blocked.set()
            await asyncio.Event().wait()

        for publisher in runtime.publishers.values():
            publisher.publish = hang  # type: ignore[method-assign]
        alice = await register(client, "alice")
        room = await create_room(client, alice, [])
        await asyncio.wait_for(blocked.wait(), timeout=5)

        responses = [
            await asyncio.wait_for(
                client.post(
                    f"/rooms/{room}/messages", json={"content": f"m{i}"}, headers=alice.headers
                ),
                timeout=2,
            )
            for i in range(3)
        ]

        assert [response.status_code for response in responses] == [201] * 3
        assert [row.event_type for row in await pending(runtime)][-3:] == ["new_message"] * 3
        # Shutting down does not wait for a publish that never ends.
        await asyncio.wait_for(runtime.relay.stop(timeout=0.1), timeout=2)
        assert not runtime.relay.running
