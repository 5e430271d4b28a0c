"""`publish_event` publishes again when its connection is lost under it, and only then."""

from __future__ import annotations

import uuid
from typing import Any, cast

import aiormq.exceptions
import pytest
from faststream.rabbit.publisher import RabbitPublisher

from herald_shared.events import DeviceInvalidated
from herald_shared.publishing import publish_event


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
