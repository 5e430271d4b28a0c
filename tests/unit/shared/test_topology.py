from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from faststream.rabbit import ExchangeType

from herald_shared import topology
from herald_shared.events import (
    Channel,
    DeliveriesReported,
    DeliveryBatchReported,
    DeliveryOutcome,
    DeliveryReported,
    DeviceInvalidated,
    EmailBatchRequested,
    EmailBounced,
    EmailJobsRequested,
    EmailRequested,
    EmailVerificationRequested,
    Event,
    Platform,
    PushJobsRequested,
    PushRequested,
)

MESSAGE_ID = uuid.uuid4()


def test_every_routing_key_is_bound_by_exactly_one_queue() -> None:
    keys = [key for queue in topology.CONSUMER_QUEUES for key in queue.bindings]
    assert len(keys) == len(set(keys))


def test_specification_names_are_kept() -> None:
    assert topology.EXCHANGE.name == "notifications"
    assert topology.MESSAGE_NOTIFICATIONS.name == "message_notifications"
    assert topology.PUSH_NOTIFICATIONS.name == "push_notifications"
    assert topology.EMAIL_NOTIFICATIONS.name == "email_notifications"
    assert topology.MESSAGE_NOTIFICATIONS.bindings == (
        "notification.message.new",
        "room.invitation.created",  # added: invitations are decided with the messages
        "notification.message.retry",
    )
    assert topology.PUSH_NOTIFICATIONS.routing_keys == ("notification.push.send",)
    assert topology.EMAIL_NOTIFICATIONS.routing_keys == ("notification.email.send",)


@pytest.mark.parametrize("consumer_queue", topology.CONSUMER_QUEUES, ids=lambda q: q.name)
def test_work_queues_are_durable_quorum_queues_with_dead_lettering(
    consumer_queue: topology.ConsumerQueue,
) -> None:
    queue = consumer_queue.queue
    assert queue.durable
    assert queue.arguments is not None
    assert queue.arguments["x-queue-type"] == "quorum"
    assert queue.arguments["x-dead-letter-exchange"] == topology.DEAD_LETTER_EXCHANGE.name
    assert queue.arguments["x-dead-letter-routing-key"] == consumer_queue.name
    assert queue.arguments["x-delivery-limit"] == topology.DELIVERY_LIMIT


def test_retries_and_dead_letters_go_through_a_topic_exchange_by_queue_name() -> None:
    # Topic, so RabbitMQ's topic permissions confine each service to its own queues there; a
    # new name, since re-declaring the former direct `notifications.retry` as topic would fail.
    assert topology.RETRY_EXCHANGE.name == "notifications.delay"
    assert topology.RETRY_EXCHANGE.type == ExchangeType.TOPIC
    # RabbitMQ's own dead-lettering keeps the exchange the work queues' arguments name.
    assert topology.DEAD_LETTER_EXCHANGE.name == "notifications.dlx"
    assert topology.DEAD_LETTER_EXCHANGE.type == ExchangeType.DIRECT
    for consumer_queue in topology.CONSUMER_QUEUES:
        names = [consumer_queue.dead_letter_queue.name, consumer_queue.wait_queue(1.0).name]
        # Bound by their own name: no topic wildcard may make a binding match other keys.
        assert not any(wildcard in name for name in names for wildcard in "*#")


def test_wait_queues_return_to_their_own_queue_only() -> None:
    wait = topology.PUSH_NOTIFICATIONS.wait_queue(1.5)
    assert wait.name == "push_notifications.wait.1500ms"
    assert wait.arguments is not None
    assert wait.arguments["x-message-ttl"] == 1500
    assert wait.arguments["x-dead-letter-exchange"] == topology.EXCHANGE.name
    assert wait.arguments["x-dead-letter-routing-key"] == topology.PUSH_RETRY
    assert topology.queue_for_routing_key(topology.PUSH_RETRY) is topology.PUSH_NOTIFICATIONS


@pytest.mark.parametrize(
    ("event", "key"),
    [
        (
            DeliveryReported(
                notification_id=uuid.uuid4(),
                message_id=uuid.uuid4(),
                recipient_id=uuid.uuid4(),
                channel=Channel.PUSH,
                outcome=DeliveryOutcome.DELIVERED,
            ),
            "notification.push.delivered",
        ),
        (
            DeliveryReported(
                notification_id=uuid.uuid4(),
                message_id=uuid.uuid4(),
                recipient_id=uuid.uuid4(),
                channel=Channel.EMAIL,
                outcome=DeliveryOutcome.FAILED,
            ),
            "notification.email.failed",
        ),
        (
            DeviceInvalidated(user_id=uuid.uuid4(), device_id=uuid.uuid4(), reason="gone"),
            "device.invalidated",
        ),
        (
            EmailVerificationRequested(
                verification_id=uuid.uuid4(),
                user_id=uuid.uuid4(),
                to_address="ann@example.test",
                to_name="Ann",
                token=f"{uuid.uuid4().hex}.1796349645.{'A' * 43}",
                expires_at=datetime(2026, 12, 4, tzinfo=UTC),
            ),
            "notification.email.verify",
        ),
        (
            EmailBounced(
                user_id=uuid.uuid4(),
                notification_id=uuid.uuid4(),
                address_digest="0" * 64,
                reason="smtp 550 5.1.1",
            ),
            "email.bounced",
        ),
        (
            EmailBatchRequested(
                message_id=MESSAGE_ID,
                jobs=[
                    EmailRequested(
                        notification_id=uuid.uuid4(),
                        message_id=MESSAGE_ID,
                        room_id=uuid.uuid4(),
                        room_name="general",
                        recipient_id=uuid.uuid4(),
                        to_address="bob@example.test",
                        to_name="Bob",
                        sender_display_name="Alice",
                        message_content="Hi",
                        sent_at=datetime(2026, 1, 1, tzinfo=UTC),
                    )
                ],
            ),
            "notification.email.send",
        ),
        (
            DeliveryBatchReported(
                message_id=MESSAGE_ID,
                channel=Channel.PUSH,
                outcome=DeliveryOutcome.FAILED,
                reports=[
                    DeliveryReported(
                        notification_id=uuid.uuid4(),
                        message_id=MESSAGE_ID,
                        recipient_id=uuid.uuid4(),
                        channel=Channel.PUSH,
                        outcome=DeliveryOutcome.FAILED,
                    )
                ],
            ),
            "notification.push.failed",
        ),
        (
            PushJobsRequested(
                platform=Platform.APNS,
                jobs=[
                    PushRequested(
                        notification_id=uuid.uuid4(),
                        message_id=uuid.uuid4(),
                        room_id=uuid.uuid4(),
                        recipient_id=uuid.uuid4(),
                        device_id=uuid.uuid4(),
                        platform=Platform.APNS,
                        token="ab" * 32,
                        title="Alice",
                        body="Hi",
                    )
                ],
            ),
            "notification.push.send",
        ),
        (
            EmailJobsRequested(
                jobs=[
                    EmailRequested(
                        notification_id=uuid.uuid4(),
                        message_id=uuid.uuid4(),
                        room_id=uuid.uuid4(),
                        room_name="general",
                        recipient_id=uuid.uuid4(),
                        to_address="bob@example.test",
                        to_name="Bob",
                        sender_display_name="Alice",
                        message_content="Hi",
                        sent_at=datetime(2026, 1, 1, tzinfo=UTC),
                    )
                ],
            ),
            "notification.email.send",
        ),
        (
            DeliveriesReported(
                channel=Channel.EMAIL,
                outcome=DeliveryOutcome.DELIVERED,
                reports=[
                    DeliveryReported(
                        notification_id=uuid.uuid4(),
                        message_id=uuid.uuid4(),
                        recipient_id=uuid.uuid4(),
                        channel=Channel.EMAIL,
                        outcome=DeliveryOutcome.DELIVERED,
                    )
                ],
            ),
            "notification.email.delivered",
        ),
    ],
)
def test_routing_key_for_events(event: Event, key: str) -> None:
    assert topology.routing_key_for(event) == key
    assert topology.queue_for_routing_key(key) is not None
