from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import pydantic
import pytest

from herald_shared.events import (
    EVENT_ADAPTER,
    MAX_ITEMS_PER_EVENT,
    Channel,
    DeliveriesReported,
    DeliveryBatchReported,
    DeliveryOutcome,
    DeliveryReported,
    EmailBatchRequested,
    EmailJobsRequested,
    EmailRequested,
    MessageCreated,
    Platform,
    PushBatchRequested,
    PushJobsRequested,
    PushRequested,
    SenderInfo,
    Trigger,
    chunks,
    delivery_reports,
    email_jobs,
    notification_id_for,
    push_jobs,
    reports_events,
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


def _report(
    message_id: uuid.UUID,
    outcome: DeliveryOutcome,
    channel: Channel = Channel.PUSH,
    reason: str | None = None,
) -> DeliveryReported:
    return DeliveryReported(
        notification_id=uuid.uuid4(),
        message_id=message_id,
        recipient_id=uuid.uuid4(),
        channel=channel,
        outcome=outcome,
        reason=reason,
    )


def _email(message_id: uuid.UUID) -> EmailRequested:
    return EmailRequested(
        notification_id=uuid.uuid4(),
        message_id=message_id,
        room_id=uuid.uuid4(),
        room_name="general",
        recipient_id=uuid.uuid4(),
        to_address="bob@example.test",
        to_name="Bob",
        sender_display_name="Alice",
        message_content="Hi",
        sent_at=datetime(2026, 1, 1, tzinfo=UTC),
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


def test_the_kinds_that_span_messages_round_trip_through_the_event_family() -> None:
    first, second = uuid.uuid4(), uuid.uuid4()
    events = [
        PushJobsRequested(platform=Platform.FCM, jobs=[_push(first), _push(second)]),
        EmailJobsRequested(jobs=[_email(first), _email(second)]),
        DeliveriesReported(
            channel=Channel.PUSH,
            outcome=DeliveryOutcome.DELIVERED,
            reports=[
                _report(first, DeliveryOutcome.DELIVERED),
                _report(second, DeliveryOutcome.DELIVERED),
            ],
        ),
    ]

    for event in events:
        assert EVENT_ADAPTER.validate_json(event.model_dump_json()) == event


@pytest.mark.parametrize(
    ("build", "error"),
    [
        (
            lambda: PushJobsRequested(platform="fcm", jobs=[_push(uuid.uuid4(), Platform.APNS)]),
            "for the event's platform",
        ),
        (
            lambda: PushJobsRequested(platform="fcm", jobs=[_push(uuid.uuid4())] * 2),
            "appears twice",
        ),
        (lambda: PushJobsRequested(platform="fcm", jobs=[]), "at least 1"),
        (
            lambda: PushJobsRequested(
                platform="fcm",
                jobs=[_push(uuid.uuid4()) for _ in range(MAX_ITEMS_PER_EVENT + 1)],
            ),
            f"at most {MAX_ITEMS_PER_EVENT}",
        ),
        (
            lambda: PushJobsRequested(platform="fcm", urgent=True, jobs=[_push(uuid.uuid4())]),
            "the event's lane",  # a plain message's job in the urgent lane
        ),
        (lambda: EmailJobsRequested(jobs=[]), "at least 1"),
        (lambda: EmailJobsRequested(jobs=[_email(uuid.uuid4())] * 2), "appears twice"),
        (
            lambda: EmailJobsRequested(
                jobs=[_email(uuid.uuid4()).model_copy(update={"trigger": Trigger.DIRECT})]
            ),
            "the event's lane",  # a DM's job in the normal lane
        ),
        (
            lambda: DeliveriesReported(
                channel="push",
                outcome="delivered",
                reports=[_report(uuid.uuid4(), DeliveryOutcome.FAILED)],
            ),
            "the event's channel and outcome",
        ),
        (
            lambda: DeliveriesReported(
                channel="push",
                outcome="failed",
                reports=[_report(uuid.uuid4(), DeliveryOutcome.FAILED, Channel.EMAIL)],
            ),
            "the event's channel and outcome",
        ),
    ],
)
def test_an_event_refuses_items_that_do_not_belong_to_it(
    build: Callable[[], object], error: str
) -> None:
    with pytest.raises(pydantic.ValidationError, match=error):
        build()


def test_the_jobs_and_reports_of_every_kind_unpack_alike() -> None:
    message_id = uuid.uuid4()
    push, email = _push(message_id), _email(message_id)
    report = _report(message_id, DeliveryOutcome.FAILED)

    for kind in (
        push,
        PushBatchRequested(message_id=message_id, platform=Platform.FCM, jobs=[push]),
        PushJobsRequested(platform=Platform.FCM, jobs=[push]),
    ):
        assert push_jobs(kind) == [push]
    for email_kind in (
        email,
        EmailBatchRequested(message_id=message_id, jobs=[email]),
        EmailJobsRequested(jobs=[email]),
    ):
        assert email_jobs(email_kind) == [email]
    for report_kind in (
        report,
        DeliveryBatchReported(
            message_id=message_id, channel="push", outcome="failed", reports=[report]
        ),
        DeliveriesReported(channel="push", outcome="failed", reports=[report]),
    ):
        assert delivery_reports(report_kind) == [report]


def test_reports_go_out_in_one_event_per_channel_and_outcome_with_ids_from_their_contents() -> None:
    first, second = uuid.uuid4(), uuid.uuid4()
    delivered = _report(first, DeliveryOutcome.DELIVERED)
    failed = _report(first, DeliveryOutcome.FAILED, reason="fcm 404 UNREGISTERED")
    also_delivered = _report(second, DeliveryOutcome.DELIVERED)  # another message
    email_failed = _report(second, DeliveryOutcome.FAILED, Channel.EMAIL, "smtp 550 5.1.1")
    reports = [failed, delivered, email_failed, also_delivered]

    events = reports_events(reports)

    assert [(event.channel, event.outcome) for event in events] == [
        (Channel.PUSH, DeliveryOutcome.DELIVERED),
        (Channel.PUSH, DeliveryOutcome.FAILED),
        (Channel.EMAIL, DeliveryOutcome.FAILED),
    ]
    assert [[r.notification_id for r in event.reports] for event in events] == [
        sorted([delivered.notification_id, also_delivered.notification_id]),
        [failed.notification_id],
        [email_failed.notification_id],
    ]
    # Published again, in any order or twice over: the same events, so consumers deduplicate.
    again = reports_events(reversed(reports))
    assert [(e.event_id, e.reports) for e in again] == [(e.event_id, e.reports) for e in events]
    assert [e.event_id for e in reports_events([*reports, *reports])] == [
        e.event_id for e in events
    ]
    # Other reports, or the same notifications with another outcome: other ids.
    fewer = reports_events(reports[1:2])
    as_failed = reports_events(
        report.model_copy(update={"outcome": DeliveryOutcome.FAILED})
        for report in (delivered, also_delivered)
    )
    ids = {event.event_id for event in (*events, *fewer, *as_failed)}
    assert len(ids) == 5


def test_reports_beyond_an_events_size_are_cut_in_order() -> None:
    reports = [_report(uuid.uuid4(), DeliveryOutcome.DELIVERED) for _ in range(2 * 500 + 1)]

    events = reports_events(reports)

    assert [len(event.reports) for event in events] == [500, 500, 1]
    ids = [report.notification_id for event in events for report in event.reports]
    assert ids == sorted(report.notification_id for report in reports)
    assert len({event.event_id for event in events}) == 3


def test_no_reports_make_no_event() -> None:
    assert reports_events([]) == []


def test_chunks_cut_in_order_at_the_size() -> None:
    assert chunks(list(range(5)), 2) == [[0, 1], [2, 3], [4]]
    assert chunks([], 2) == []
    assert chunks(list(range(MAX_ITEMS_PER_EVENT))) == [list(range(MAX_ITEMS_PER_EVENT))]
