from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import pydantic
import pytest

from herald_shared.events import (
    EVENT_ADAPTER,
    Channel,
    DeliveryBatchReported,
    DeliveryOutcome,
    DeliveryReported,
    EmailBatchRequested,
    MessageCreated,
    Platform,
    PushBatchRequested,
    PushRequested,
    SenderInfo,
    notification_id_for,
)
from herald_shared.retry import describe_error


def _message(**overrides: object) -> MessageCreated:
    sender = uuid.uuid4()
    fields: dict[str, object] = {
        "message_id": uuid.uuid4(),
        "room_id": uuid.uuid4(),
        "sender_id": sender,
        "recipient_ids": [uuid.uuid4()],
        "message_content": "Hello everyone! 👋",
        "sender_info": SenderInfo(user_id=sender, username="john_doe", display_name="John Doe"),
        "timestamp": datetime(2025, 1, 27, 12, tzinfo=UTC),
    }
    fields.update(overrides)
    return MessageCreated.model_validate(fields)


def test_the_specification_example_parses_into_message_created() -> None:
    example = {
        "type": "new_message",
        "message_id": "550e8400-e29b-41d4-a716-446655440000",
        "room_id": "660e8400-e29b-41d4-a716-446655440000",
        "sender_id": "770e8400-e29b-41d4-a716-446655440000",
        "recipient_ids": ["880e8400-e29b-41d4-a716-446655440000"],
        "message_content": "Hello everyone! 👋",
        "sender_info": {
            "user_id": "770e8400-e29b-41d4-a716-446655440000",
            "username": "john_doe",
            "display_name": "John Doe",
            "profile_picture_url": "https://example.com/avatar.jpg",
        },
        "timestamp": "2025-01-27T12:00:00Z",
        "retry_count": 0,  # the specification's field: ignored, retries travel in a header
    }
    event = EVENT_ADAPTER.validate_python(example)
    assert isinstance(event, MessageCreated)
    assert event.sender_info.username == "john_doe"
    assert not hasattr(event, "retry_count")


def test_events_round_trip_through_json() -> None:
    event = _message()
    assert EVENT_ADAPTER.validate_json(event.model_dump_json()) == event


def test_events_are_frozen() -> None:
    event = _message()
    with pytest.raises(pydantic.ValidationError):
        event.message_content = "changed"  # type: ignore[misc]


def test_unknown_type_is_refused() -> None:
    with pytest.raises(pydantic.ValidationError):
        EVENT_ADAPTER.validate_python({"type": "new_mesage"})


def test_naive_timestamps_are_refused() -> None:
    with pytest.raises(pydantic.ValidationError):
        _message(timestamp=datetime(2025, 1, 27, 12))  # noqa: DTZ001


def test_validation_errors_never_carry_the_input() -> None:
    with pytest.raises(pydantic.ValidationError) as caught:
        _message(message_content="x" * 5000, recipient_ids="alice@example.com")
    assert "alice@example.com" not in str(caught.value)
    assert "xxxxx" not in str(caught.value)
    assert "alice@example.com" not in describe_error(caught.value)


@pytest.mark.parametrize(
    ("first", "second", "same"),
    [
        ((1, 2, Channel.PUSH, "d1"), (1, 2, Channel.PUSH, "d1"), True),
        ((1, 2, Channel.PUSH, "d1"), (1, 2, Channel.PUSH, "d2"), False),
        ((1, 2, Channel.PUSH, ""), (1, 2, Channel.EMAIL, ""), False),
        ((1, 2, Channel.EMAIL, ""), (1, 3, Channel.EMAIL, ""), False),
        ((1, 2, Channel.EMAIL, ""), (4, 2, Channel.EMAIL, ""), False),
    ],
)
def test_notification_ids_are_deterministic_and_distinct(
    first: tuple[int, int, Channel, str], second: tuple[int, int, Channel, str], same: bool
) -> None:
    def compute(message: int, recipient: int, channel: Channel, target: str) -> uuid.UUID:
        return notification_id_for(
            message_id=uuid.UUID(int=message),
            recipient_id=uuid.UUID(int=recipient),
            channel=channel,
            target=target,
        )

    assert (compute(*first) == compute(*second)) is same


def test_delivery_report_values() -> None:
    report = DeliveryReported(
        notification_id=uuid.uuid4(),
        message_id=uuid.uuid4(),
        recipient_id=uuid.uuid4(),
        channel=Channel.EMAIL,
        outcome=DeliveryOutcome.FAILED,
        reason="smtp 550",
    )
    assert EVENT_ADAPTER.validate_json(report.model_dump_json()) == report


def _push(message_id: uuid.UUID, platform: Platform = Platform.FCM) -> PushRequested:
    someone = uuid.uuid4()
    return PushRequested(
        notification_id=uuid.uuid4(),
        message_id=message_id,
        room_id=someone,
        recipient_id=someone,
        device_id=uuid.uuid4(),
        platform=platform,
        token="token",
        title="Alice",
        body="Hi",
    )


def _report(message_id: uuid.UUID, outcome: DeliveryOutcome) -> DeliveryReported:
    return DeliveryReported(
        notification_id=uuid.uuid4(),
        message_id=message_id,
        recipient_id=uuid.uuid4(),
        channel=Channel.PUSH,
        outcome=outcome,
    )


def test_a_batch_round_trips_through_the_event_family() -> None:
    message_id = uuid.uuid4()
    batch = PushBatchRequested(
        message_id=message_id, platform=Platform.FCM, jobs=[_push(message_id), _push(message_id)]
    )

    assert EVENT_ADAPTER.validate_json(batch.model_dump_json()) == batch


@pytest.mark.parametrize(
    ("build", "error"),
    [
        (
            lambda m: PushBatchRequested(message_id=m, platform="fcm", jobs=[_push(uuid.uuid4())]),
            "belongs to the batch's message",
        ),
        (
            lambda m: PushBatchRequested(
                message_id=m, platform="fcm", jobs=[_push(m, Platform.APNS)]
            ),
            "for the batch's platform",
        ),
        (
            lambda m: PushBatchRequested(message_id=m, platform="fcm", jobs=[_push(m)] * 2),
            "appears twice",
        ),
        (lambda m: PushBatchRequested(message_id=m, platform="fcm", jobs=[]), "at least 1"),
        (
            lambda m: PushBatchRequested(
                message_id=m, platform="fcm", jobs=[_push(m) for _ in range(101)]
            ),
            "at most 100",
        ),
        (lambda m: EmailBatchRequested(message_id=m, jobs=[]), "at least 1"),
        (
            lambda m: DeliveryBatchReported(
                message_id=m,
                channel="push",
                outcome="delivered",
                reports=[_report(m, DeliveryOutcome.FAILED)],
            ),
            "the batch's channel and outcome",
        ),
    ],
)
def test_a_batch_refuses_items_that_do_not_belong_to_it(
    build: Callable[[uuid.UUID], object], error: str
) -> None:
    with pytest.raises(pydantic.ValidationError, match=error):
        build(uuid.uuid4())
