"""push-sender's one subscriber: `push_notifications` → a push and its outcome's events.

Failures only raise; `herald_shared.retry`'s middleware turns them into delayed retries or dead
letters. Logs carry ids only: never a token, an address or message text.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from faststream.message import StreamMessage
from faststream.rabbit import RabbitBroker
from faststream.rabbit.publisher import RabbitPublisher
from faststream.rabbit.subscriber import RabbitSubscriber

from herald_shared.events import (
    DeliveryOutcome,
    DeliveryReported,
    DeviceInvalidated,
    Event,
    PushRequested,
)
from herald_shared.publishing import event_publisher, publish_event
from herald_shared.topology import (
    DEVICE_INVALIDATED,
    EXCHANGE,
    PUSH_DELIVERED,
    PUSH_FAILED,
    PUSH_NOTIFICATIONS,
)
from push_sender.delivery import report_for
from push_sender.sender import PushSender

RETRIES_EXHAUSTED = "retries exhausted"


@dataclass(frozen=True)
class PushDeps:
    """What the handler needs, built once by `app.build_service` and handed down."""

    sender: PushSender
    delivered: RabbitPublisher
    failed: RabbitPublisher
    invalidated: RabbitPublisher
    publish_timeout: float

    def publisher_for(self, event: Event) -> RabbitPublisher:
        if isinstance(event, DeviceInvalidated):
            return self.invalidated
        if isinstance(event, DeliveryReported) and event.outcome is DeliveryOutcome.DELIVERED:
            return self.delivered
        return self.failed


def make_publishers(
    broker: RabbitBroker,
) -> tuple[RabbitPublisher, RabbitPublisher, RabbitPublisher]:
    """(delivered, failed, invalidated): one documented publisher per routing key."""
    return (
        event_publisher(
            broker,
            DeliveryReported,
            PUSH_DELIVERED,
            description="A push notification was accepted by the push provider.",
        ),
        event_publisher(
            broker,
            DeliveryReported,
            PUSH_FAILED,
            description="A push notification failed for good (dead device token, or refused).",
        ),
        event_publisher(
            broker,
            DeviceInvalidated,
            DEVICE_INVALIDATED,
            description="The push provider says a device's token is dead; remove the device.",
        ),
    )


async def send_push(
    job: PushRequested, deps: PushDeps, *, correlation_id: str | None = None
) -> None:
    """Deliver (or skip) one job, publish what its plan says, raise what it raises.

    The ledger is committed before the events are published and the events before the ack. If
    publishing fails, the next copy of the job publishes the same events (with the same ids) at
    once; after a crash in between, once the dead worker's lease has run out.

    A handler cancelled while the provider has the push (its connection lost, the service
    stopping) lets that call finish and record its outcome, then drops its lease: the redelivered
    copy then publishes the recorded outcome instead of sending the push a second time.
    """
    claimed_at = deps.sender.clock()
    delivery = asyncio.ensure_future(deps.sender.deliver(job, claimed_at=claimed_at))
    try:
        plan = await asyncio.shield(delivery)
        if plan.events:
            try:
                for event in plan.events:
                    await publish_event(
                        deps.publisher_for(event),
                        event,
                        timeout=deps.publish_timeout,
                        correlation_id=correlation_id,
                    )
            except Exception:
                await deps.sender.publishing_failed(job)
                raise
            await deps.sender.mark_reported(job)
    except asyncio.CancelledError:
        await asyncio.shield(_let_finish_then_abandon(deps.sender, job, delivery, claimed_at))
        raise
    if plan.error is not None:
        raise plan.error


async def _let_finish_then_abandon(
    sender: PushSender, job: PushRequested, delivery: asyncio.Future[Any], claimed_at: datetime
) -> None:
    # The provider call is bounded by its deadline; whatever it ends with is recorded (or the
    # claim released) by `deliver` itself.
    with contextlib.suppress(Exception):
        await delivery
    await sender.abandon(job, claimed_at=claimed_at)


async def report_given_up(deps: PushDeps, message: StreamMessage[Any], error: str) -> None:
    """The dead-letter hook of `push_notifications`: a job out of retries is reported failed, so
    the router's ledger does not keep it pending. Its own ledger row stays `retrying`, so a job
    replayed from the dead-letter queue is sent (and then reported delivered) as usual."""
    job = PushRequested.model_validate_json(message.body)
    report = report_for(job, DeliveryOutcome.FAILED, RETRIES_EXHAUSTED)
    await publish_event(
        deps.failed, report, timeout=deps.publish_timeout, correlation_id=message.correlation_id
    )


def register_handlers(broker: RabbitBroker, deps: PushDeps) -> RabbitSubscriber:
    subscriber = broker.subscriber(
        PUSH_NOTIFICATIONS.queue,
        EXCHANGE,
        title=f"{PUSH_NOTIFICATIONS.name}:consume",
        description="Send one push notification to one device, then report the outcome.",
    )

    @subscriber
    async def push_requested(job: PushRequested) -> None:
        await send_push(job, deps)

    return subscriber
