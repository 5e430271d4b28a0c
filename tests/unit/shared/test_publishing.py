"""`publish_event` publishes again when its connection is lost under it, and when it is nacked
after renewing its channel (once for a batch's nacks); nothing else goes out again. A channel
with confirms does not hold its lock while a publish's frames drain."""

from __future__ import annotations

import asyncio
import inspect
import uuid
from types import SimpleNamespace
from typing import Any, cast

import aiormq
import aiormq.exceptions
import pytest
from faststream.rabbit.publisher import RabbitPublisher

from herald_shared.events import DeviceInvalidated, Event
from herald_shared.publishing import (
    MIN_RENEWAL_INTERVAL_S,
    _without_drain_wait,
    is_nack,
    publish_event,
    publish_events,
    publish_without_drain_wait,
)
from herald_shared.topology import routing_key_for


class FlakyPublisher:
    """Raises the given errors, one per call, then succeeds."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls: list[dict[str, Any]] = []

    async def publish(self, event: object, **options: Any) -> None:
        self.calls.append(options)
        if self.errors:
            raise self.errors.pop(0)


def an_event() -> DeviceInvalidated:
    return DeviceInvalidated(user_id=uuid.uuid4(), device_id=uuid.uuid4(), reason="test")


async def test_a_publish_whose_connection_was_lost_goes_out_again_with_the_same_id() -> None:
    publisher = FlakyPublisher(
        aiormq.exceptions.AMQPConnectionError("Server connection unexpectedly closed"),
        aiormq.exceptions.ChannelInvalidStateError("channel closed"),
        aiormq.exceptions.ConnectionClosed(320, "CONNECTION_FORCED"),
    )
    event = an_event()

    await publish_event(cast(RabbitPublisher, publisher), event, timeout=5)

    assert len(publisher.calls) == 4
    assert {call["message_id"] for call in publisher.calls} == {str(event.event_id)}


async def test_other_failures_are_not_published_again() -> None:
    publisher = FlakyPublisher(aiormq.exceptions.ChannelNotFoundEntity("no exchange"))

    with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
        await publish_event(cast(RabbitPublisher, publisher), an_event(), timeout=5)
    assert len(publisher.calls) == 1


async def test_a_connection_that_never_comes_back_ends_in_the_timeout() -> None:
    lost = [aiormq.exceptions.AMQPConnectionError("gone") for _ in range(100)]
    publisher = FlakyPublisher(*lost)

    with pytest.raises(TimeoutError):
        await publish_event(cast(RabbitPublisher, publisher), an_event(), timeout=0.3)
    assert 1 < len(publisher.calls) < 100


def a_nack() -> aiormq.exceptions.DeliveryError:
    return aiormq.exceptions.DeliveryError(None, aiormq.spec.Basic.Nack(delivery_tag=1))


class FakeUnderlay:
    """An AMQP channel: closed once, by the renewal."""

    def __init__(self) -> None:
        self.closed_with: BaseException | None = None

    async def close(self, exc: BaseException | None = None) -> None:
        self.closed_with = exc


class FakeChannel:
    """aio-pika's robust channel: a closed underlying channel is replaced by a new one."""

    def __init__(self) -> None:
        self.underlays = [FakeUnderlay()]
        self.number = 1

    @property
    def is_closed(self) -> bool:
        return False

    async def ready(self) -> None:
        pass

    async def get_underlay_channel(self) -> FakeUnderlay:
        if self.underlays[-1].closed_with is not None:
            self.underlays.append(FakeUnderlay())
        return self.underlays[-1]

    @property
    def renewals(self) -> int:
        return sum(underlay.closed_with is not None for underlay in self.underlays)


class StaleChannelPublisher:
    """A publisher on `channel` whose first `stale` AMQP channels have every publish nacked (a
    queue leader that died before their first publish there), and whose others confirm."""

    def __init__(self, channel: FakeChannel, stale: int = 1) -> None:
        self.channel = channel
        self.stale = stale
        self.calls: list[dict[str, Any]] = []
        self.confirmed: list[str] = []
        # What FastStream's publisher holds: its broker's channel manager.
        self._outer_config = SimpleNamespace(channel_manager=self)

    async def get_channel(self) -> FakeChannel:
        return self.channel

    async def publish(self, event: object, **options: Any) -> None:
        self.calls.append(options)
        underlay = await self.channel.get_underlay_channel()
        await asyncio.sleep(0)  # the confirm comes back later
        if self.channel.underlays.index(underlay) < self.stale:
            raise a_nack()
        self.confirmed.append(options["message_id"])


def test_a_nack_is_a_basic_nack_and_not_a_return() -> None:
    assert is_nack(a_nack())
    returned = aiormq.exceptions.PublishError.__new__(aiormq.exceptions.PublishError)
    returned.frame = aiormq.spec.Basic.Return()
    assert not is_nack(returned)
    assert not is_nack(aiormq.exceptions.ChannelInvalidStateError("closed"))


async def test_a_nacked_publish_goes_out_again_on_a_renewed_channel() -> None:
    channel = FakeChannel()
    publisher = StaleChannelPublisher(channel)
    event = an_event()

    await publish_event(cast(RabbitPublisher, publisher), event, timeout=5)

    assert channel.renewals == 1
    # Closed with an error that makes publishes in flight on it go out again.
    assert isinstance(channel.underlays[0].closed_with, aiormq.exceptions.ChannelInvalidStateError)
    assert len(publisher.calls) == 2
    assert publisher.confirmed == [str(event.event_id)]


async def test_the_nacks_of_a_batch_renew_the_channel_once() -> None:
    channel = FakeChannel()
    publisher = StaleChannelPublisher(channel)
    events: list[Event] = [an_event() for _ in range(20)]
    publishers = {routing_key_for(events[0]): cast(RabbitPublisher, publisher)}

    await publish_events(events, publishers, timeout=5)

    assert channel.renewals == 1
    assert sorted(publisher.confirmed) == sorted(str(event.event_id) for event in events)


async def test_a_channel_nacked_again_soon_after_its_renewal_waits_before_the_next() -> None:
    """A new channel opened before the queue's record names its new leader is nacked too: it
    is renewed again, but not more than once a `MIN_RENEWAL_INTERVAL_S`."""
    channel = FakeChannel()
    publisher = StaleChannelPublisher(channel, stale=2)
    loop = asyncio.get_running_loop()
    started = loop.time()

    await publish_event(cast(RabbitPublisher, publisher), an_event(), timeout=5)

    assert channel.renewals == 2
    assert loop.time() - started >= MIN_RENEWAL_INTERVAL_S
    assert len(publisher.confirmed) == 1


async def test_a_nack_that_lasts_raises_as_the_nack_when_the_time_is_up() -> None:
    channel = FakeChannel()
    publisher = StaleChannelPublisher(channel, stale=1000)

    with pytest.raises(aiormq.exceptions.DeliveryError) as raised:
        await publish_event(cast(RabbitPublisher, publisher), an_event(), timeout=2.2)

    assert is_nack(raised.value)
    assert isinstance(raised.value.__cause__, TimeoutError)
    # At once, then again at most every `MIN_RENEWAL_INTERVAL_S`: not at every retry.
    assert 2 <= channel.renewals <= 1 + 2.2 / MIN_RENEWAL_INTERVAL_S
    assert len(publisher.calls) > channel.renewals
    assert not publisher.confirmed


async def test_a_returned_publish_neither_renews_the_channel_nor_goes_out_again() -> None:
    returned = aiormq.exceptions.PublishError.__new__(aiormq.exceptions.PublishError)
    returned.frame = aiormq.spec.Basic.Return()
    publisher = FlakyPublisher(returned)

    with pytest.raises(aiormq.exceptions.PublishError):
        await publish_event(cast(RabbitPublisher, publisher), an_event(), timeout=5)
    assert len(publisher.calls) == 1


async def test_a_channel_with_confirms_does_not_wait_for_the_drain() -> None:
    calls: list[dict[str, Any]] = []

    async def basic_publish(channel: object, body: bytes, **kwargs: Any) -> None:
        calls.append(kwargs)

    publish = _without_drain_wait(basic_publish)
    await publish(SimpleNamespace(publisher_confirms=True), b"{}", routing_key="a")
    await publish(SimpleNamespace(publisher_confirms=False), b"{}", routing_key="b")
    await publish(SimpleNamespace(publisher_confirms=True), b"{}", routing_key="c", wait=True)

    assert calls == [
        {"routing_key": "a", "wait": False},
        {"routing_key": "b"},  # no confirm to wait for: the drain is its only backpressure
        {"routing_key": "c", "wait": True},
    ]


def test_aiormq_still_publishes_the_way_the_wrapper_expects() -> None:
    """The wrapper passes `wait` and reads `publisher_confirms`: an aiormq that changes either
    must fail here, not quietly in production."""
    publish_without_drain_wait()
    publish_without_drain_wait()  # installed once, whoever asks again
    installed = aiormq.Channel.basic_publish
    assert getattr(installed, "herald_without_drain_wait", False)
    original = installed.__wrapped__  # type: ignore[attr-defined]
    assert not getattr(original, "herald_without_drain_wait", False)
    wait = inspect.signature(original).parameters["wait"]
    assert wait.kind is inspect.Parameter.KEYWORD_ONLY
    assert wait.default is True
    assert "publisher_confirms" in inspect.signature(aiormq.Channel.__init__).parameters
