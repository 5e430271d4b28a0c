"""The retry and dead-letter mechanism on a real RabbitMQ (the in-memory broker has no TTL/DLX)."""

from __future__ import annotations

import itertools
import json
import time
import uuid
from typing import Any

import aio_pika
import pytest
from faststream.message import StreamMessage
from faststream.rabbit import RabbitBroker, RabbitMessage

from herald_shared import retry
from herald_shared.broker import RabbitSettings, make_broker
from herald_shared.events import DeviceInvalidated
from herald_shared.retry import DeferredError, PermanentError, RetryableError
from herald_shared.topology import (
    DEVICE_INVALIDATED,
    DEVICE_INVALIDATIONS,
    EXCHANGE,
    declare_topology,
)
from tests.support.infra import wait_until

DELAYS = (0.2, 0.4, 0.8)


@pytest.fixture
def broker(rabbit_url: str) -> RabbitBroker:
    settings = RabbitSettings(url=rabbit_url, retry_delays=DELAYS, max_retries=3)
    return make_broker(settings, service_name="retry-test")


async def _dead_letters(rabbit_url: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    connection = await aio_pika.connect(rabbit_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(DEVICE_INVALIDATIONS.dead_letter_queue.name)
        messages = []
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            messages.append(message)
        return messages


def _event() -> DeviceInvalidated:
    return DeviceInvalidated(user_id=uuid.uuid4(), device_id=uuid.uuid4(), reason="test")


async def test_transient_failure_is_retried_on_the_tiers_then_dead_lettered(
    broker: RabbitBroker, rabbit_url: str
) -> None:
    attempts: list[float] = []

    @broker.subscriber(DEVICE_INVALIDATIONS.queue, EXCHANGE)
    async def handler(event: DeviceInvalidated) -> None:
        attempts.append(time.monotonic())
        raise RetryableError("provider timed out")

    async with broker:
        await broker.start()
        await declare_topology(broker, retry_delays=DELAYS)
        event = _event()
        await broker.publish(event, exchange=EXCHANGE, routing_key=DEVICE_INVALIDATED, persist=True)

        async def dead_lettered() -> list[aio_pika.abc.AbstractIncomingMessage]:
            return await _dead_letters(rabbit_url)

        (dead,) = await wait_until(dead_lettered, timeout=15)

    assert len(attempts) == 1 + 3
    gaps = [later - earlier for earlier, later in itertools.pairwise(attempts)]
    for gap, delay in zip(gaps, DELAYS, strict=True):
        assert gap >= delay * 0.9
    headers = dead.headers
    assert headers[retry.REASON_HEADER] == "retries-exhausted"
    assert headers[retry.ATTEMPT_HEADER] == 4
    assert headers[retry.ORIGIN_HEADER] == DEVICE_INVALIDATIONS.name
    history = headers[retry.HISTORY_HEADER]
    assert isinstance(history, list)
    assert len(history) == 4
    assert "provider timed out" in str(headers[retry.ERROR_HEADER])
    assert json.loads(dead.body)["event_id"] == str(event.event_id)
    assert dead.delivery_mode == aio_pika.DeliveryMode.PERSISTENT


async def test_a_retry_that_cannot_be_scheduled_goes_back_to_its_queue_not_to_dead_letters(
    broker: RabbitBroker, rabbit_url: str
) -> None:
    """The wait queue refuses the retry (here: it is gone, so the publish is returned; in a
    memory alarm the publish times out): the delivery is nacked back to its own queue and
    handled again, instead of being rejected into the dead-letter queue."""
    attempts = 0

    @broker.subscriber(DEVICE_INVALIDATIONS.queue, EXCHANGE)
    async def handler(event: DeviceInvalidated) -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise RetryableError("provider timed out")

    async with broker:
        await declare_topology(broker, retry_delays=DELAYS)
        connection = await aio_pika.connect(rabbit_url)
        async with connection:
            channel = await connection.channel()
            await channel.queue_delete(DEVICE_INVALIDATIONS.wait_queue(DELAYS[0]).name)
        await broker.start()
        await broker.publish(_event(), exchange=EXCHANGE, routing_key=DEVICE_INVALIDATED)

        async def handled_again() -> bool:
            return attempts >= 2

        await wait_until(handled_again, timeout=10)

    assert attempts == 2
    assert await _dead_letters(rabbit_url) == []


async def test_permanent_failure_is_dead_lettered_at_once(
    broker: RabbitBroker, rabbit_url: str
) -> None:
    calls = 0

    @broker.subscriber(DEVICE_INVALIDATIONS.queue, EXCHANGE)
    async def handler(event: DeviceInvalidated) -> None:
        nonlocal calls
        calls += 1
        raise PermanentError("token format unknown")

    async with broker:
        await broker.start()
        await declare_topology(broker, retry_delays=DELAYS)
        await broker.publish(_event(), exchange=EXCHANGE, routing_key=DEVICE_INVALIDATED)
        (dead,) = await wait_until(lambda: _dead_letters(rabbit_url))

    assert calls == 1
    assert dead.headers[retry.REASON_HEADER] == "permanent"


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"{not json", None),
        (b"{not json", "application/json"),
        (b"\xff\xfe\xfd", None),
        (b"\xff\xfe\xfd", "application/json"),
        (json.dumps({"type": "device_invalidated", "user_id": "alice@example.com"}).encode(), None),
        (json.dumps({"type": "user_updated", "user_id": str(uuid.uuid4())}).encode(), None),
    ],
    ids=[
        "invalid-json",
        "invalid-json-as-json",
        "invalid-utf8",
        "invalid-utf8-as-json",
        "missing-fields",
        "wrong-type",
    ],
)
async def test_unparsable_input_is_dead_lettered_without_its_values_and_others_keep_flowing(
    broker: RabbitBroker,
    rabbit_url: str,
    body: bytes,
    content_type: str | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    handled: list[DeviceInvalidated] = []

    @broker.subscriber(DEVICE_INVALIDATIONS.queue, EXCHANGE)
    async def handler(event: DeviceInvalidated) -> None:
        handled.append(event)

    good = _event()
    async with broker:
        await broker.start()
        await declare_topology(broker, retry_delays=DELAYS)
        await broker.publish(
            body, exchange=EXCHANGE, routing_key=DEVICE_INVALIDATED, content_type=content_type
        )
        await broker.publish(good, exchange=EXCHANGE, routing_key=DEVICE_INVALIDATED)
        (dead,) = await wait_until(lambda: _dead_letters(rabbit_url))
        await wait_until(lambda: _async_value(handled))

    assert [event.event_id for event in handled] == [good.event_id]
    assert dead.headers[retry.REASON_HEADER] == "unparsable"
    assert dead.body == body
    assert "alice@example.com" not in caplog.text


async def _async_value(value: object) -> object:
    return value


async def test_an_unreachable_dependency_waits_without_spending_attempts(rabbit_url: str) -> None:
    """A database or broker that refuses connections says nothing about the message: it waits
    on the tiers as often as the outage lasts (here 6 times, twice the retry budget), then is
    handled normally, with its attempt count untouched."""
    settings = RabbitSettings(url=rabbit_url, retry_delays=DELAYS, max_retries=3)
    broker = make_broker(settings, service_name="retry-test")
    outage_left = 6
    seen_attempt_headers: list[object] = []
    handled: list[DeviceInvalidated] = []

    @broker.subscriber(DEVICE_INVALIDATIONS.queue, EXCHANGE)
    async def handler(event: DeviceInvalidated, message: RabbitMessage) -> None:
        nonlocal outage_left
        seen_attempt_headers.append(message.headers.get(retry.ATTEMPT_HEADER))
        if outage_left:
            outage_left -= 1
            try:
                raise ConnectionRefusedError(111, "Connect call failed")
            except ConnectionRefusedError as refused:
                # As SQLAlchemy raises it: the driver's error as the cause.
                raise RuntimeError("could not reach the database") from refused
        handled.append(event)

    async with broker:
        await broker.start()
        await declare_topology(broker, retry_delays=DELAYS)
        event = _event()
        await broker.publish(event, exchange=EXCHANGE, routing_key=DEVICE_INVALIDATED)
        await wait_until(lambda: _async_value(handled), timeout=20)

    assert [handled_event.event_id for handled_event in handled] == [event.event_id]
    assert seen_attempt_headers == [None] * 7
    assert await _dead_letters(rabbit_url) == []


async def test_a_message_deferred_too_often_is_dead_lettered_and_its_hook_runs(
    rabbit_url: str,
) -> None:
    settings = RabbitSettings(url=rabbit_url, retry_delays=DELAYS, max_retries=3, max_deferrals=2)
    hooks = retry.DeadLetterHooks()
    hooked: list[tuple[str, str]] = []

    async def hook(message: StreamMessage[Any], error: str) -> None:
        hooked.append((json.loads(message.body)["event_id"], error))

    hooks.register(DEVICE_INVALIDATIONS.name, hook)
    broker = make_broker(settings, service_name="retry-test", dead_letter_hooks=hooks)

    @broker.subscriber(DEVICE_INVALIDATIONS.queue, EXCHANGE)
    async def handler(event: DeviceInvalidated) -> None:
        raise DeferredError("held by another worker", retry_after=0.1)

    async with broker:
        await broker.start()
        await declare_topology(broker, retry_delays=DELAYS)
        event = _event()
        await broker.publish(event, exchange=EXCHANGE, routing_key=DEVICE_INVALIDATED)
        (dead,) = await wait_until(lambda: _dead_letters(rabbit_url), timeout=15)

    assert dead.headers[retry.REASON_HEADER] == "deferred-too-long"
    assert dead.headers[retry.DEFERRALS_HEADER] == 3
    assert retry.ATTEMPT_HEADER not in dead.headers
    assert hooked == [(str(event.event_id), "DeferredError: held by another worker")]


async def test_the_hook_runs_when_retries_run_out_and_a_failing_hook_loses_nothing(
    rabbit_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = RabbitSettings(url=rabbit_url, retry_delays=DELAYS, max_retries=1)
    hooks = retry.DeadLetterHooks()
    hook_calls: list[str] = []

    async def hook(message: StreamMessage[Any], error: str) -> None:
        hook_calls.append(error)
        raise ZeroDivisionError

    hooks.register(DEVICE_INVALIDATIONS.name, hook)
    broker = make_broker(settings, service_name="retry-test", dead_letter_hooks=hooks)

    @broker.subscriber(DEVICE_INVALIDATIONS.queue, EXCHANGE)
    async def handler(event: DeviceInvalidated) -> None:
        raise RetryableError("provider down")

    async with broker:
        await broker.start()
        await declare_topology(broker, retry_delays=DELAYS)
        await broker.publish(_event(), exchange=EXCHANGE, routing_key=DEVICE_INVALIDATED)
        (dead,) = await wait_until(lambda: _dead_letters(rabbit_url), timeout=15)

    assert dead.headers[retry.REASON_HEADER] == "retries-exhausted"
    assert hook_calls == ["RetryableError: provider down"]
    assert "herald.message.dead_letter_hook_failed" in caplog.text
