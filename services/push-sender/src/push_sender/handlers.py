"""push-sender's subscribers: `push_notifications` and its urgent lane
`push_notifications_urgent` → `Sender.deliver` (the shared sender workflow,
`herald_shared.sending.subscribe`), and their dead-letter hooks.

Failures only raise; `herald_shared.retry`'s middleware turns them into delayed retries or dead
letters of the whole delivery (the jobs it had finished are no-ops when it comes back).
"""

from __future__ import annotations

from faststream.rabbit import RabbitBroker
from faststream.rabbit.publisher import RabbitPublisher
from faststream.rabbit.subscriber import RabbitSubscriber

from herald_shared.events import (
    AnyPushJob,
    DeliveriesReported,
    DeviceInvalidated,
    PushRequested,
    push_jobs,
)
from herald_shared.publishing import event_publisher
from herald_shared.retry import DeadLetterHooks
from herald_shared.sending import Sender, subscribe
from herald_shared.topology import (
    DEVICE_INVALIDATED,
    PUSH_DELIVERED,
    PUSH_FAILED,
    PUSH_NOTIFICATIONS,
    PUSH_NOTIFICATIONS_URGENT,
)


def make_publishers(broker: RabbitBroker) -> dict[str, RabbitPublisher]:
    """One documented publisher per routing key push-sender publishes on."""
    return {
        PUSH_DELIVERED: event_publisher(
            broker,
            DeliveriesReported,
            PUSH_DELIVERED,
            description="Push notifications the push provider accepted.",
        ),
        PUSH_FAILED: event_publisher(
            broker,
            DeliveriesReported,
            PUSH_FAILED,
            description=(
                "Push notifications that failed for good (dead device tokens, refused, or out of "
                "retries)."
            ),
        ),
        DEVICE_INVALIDATED: event_publisher(
            broker,
            DeviceInvalidated,
            DEVICE_INVALIDATED,
            description="The push provider says a device's token is dead; remove the device.",
        ),
    }


def register_handlers(
    broker: RabbitBroker, sender: Sender[PushRequested], hooks: DeadLetterHooks
) -> tuple[RabbitSubscriber, ...]:
    return (
        subscribe(
            broker,
            sender,
            queue=PUSH_NOTIFICATIONS,
            event_type=AnyPushJob,
            jobs_of=push_jobs,
            hooks=hooks,
            description=(
                "Send push notifications (to one platform's devices, of one or more messages), "
                "then report the outcomes."
            ),
        ),
        subscribe(
            broker,
            sender,
            queue=PUSH_NOTIFICATIONS_URGENT,
            event_type=AnyPushJob,
            jobs_of=push_jobs,
            hooks=hooks,
            description=(
                "Send the urgent lane's push notifications (direct messages and personal "
                "mentions), ahead of the others, then report the outcomes."
            ),
        ),
    )
