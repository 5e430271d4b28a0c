"""push-sender's one subscriber: `push_notifications` → a batch of pushes and their outcomes'
events.

Failures only raise; `herald_shared.retry`'s middleware turns them into delayed retries or dead
letters, of the whole batch (the jobs it had finished are no-ops when it comes back). Logs carry
ids only: never a token, an address or message text.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from faststream.message import StreamMessage
from faststream.rabbit import RabbitBroker
from faststream.rabbit.publisher import RabbitPublisher
from faststream.rabbit.subscriber import RabbitSubscriber
from pydantic import TypeAdapter

from herald_shared.events import (
    AnyPushJob,
    DeliveryBatchReported,
    DeliveryOutcome,
    DeviceInvalidated,
    PushBatchRequested,
    PushRequested,
    batch_report,
    batch_reports,
)
from herald_shared.publishing import event_publisher, publish_event
from herald_shared.retry import batch_error
from herald_shared.topology import (
    DEVICE_INVALIDATED,
    EXCHANGE,
    PUSH_DELIVERED,
    PUSH_FAILED,
    PUSH_NOTIFICATIONS,
)
from push_sender.delivery import Plan, report_for
from push_sender.sender import PushSender

RETRIES_EXHAUSTED = "retries exhausted"

PUSH_JOB: TypeAdapter[AnyPushJob] = TypeAdapter(AnyPushJob)


@dataclass(frozen=True)
class PushDeps:
    """What the handler needs, built once by `app.build_service` and handed down."""

    sender: PushSender
    delivered: RabbitPublisher
    failed: RabbitPublisher
    invalidated: RabbitPublisher
    publish_timeout: float

    def reports_for(self, outcome: DeliveryOutcome) -> RabbitPublisher:
        return self.delivered if outcome is DeliveryOutcome.DELIVERED else self.failed


def make_publishers(
    broker: RabbitBroker,
) -> tuple[RabbitPublisher, RabbitPublisher, RabbitPublisher]:
    """(delivered, failed, invalidated): one documented publisher per routing key."""
    return (
        event_publisher(
            broker,
            DeliveryBatchReported,
            PUSH_DELIVERED,
            description="Push notifications of one message were accepted by the push provider.",
        ),
        event_publisher(
            broker,
            DeliveryBatchReported,
            PUSH_FAILED,
            description=(
                "Push notifications of one message failed for good (dead device tokens, refused, "
                "or out of retries)."
            ),
        ),
        event_publisher(
            broker,
            DeviceInvalidated,
            DEVICE_INVALIDATED,
            description="The push provider says a device's token is dead; remove the device.",
        ),
    )


def as_batch(job: PushRequested | PushBatchRequested) -> PushBatchRequested:
    """A single job (from a router of an earlier version, or replayed from the dead-letter queue)
    is the batch of one it would be today."""
    if isinstance(job, PushBatchRequested):
        return job
    return PushBatchRequested(
        event_id=job.event_id, message_id=job.message_id, platform=job.platform, jobs=[job]
    )


async def send_batch(batch: PushBatchRequested, deps: PushDeps) -> None:
    """Deliver (or skip) every job of `batch`, publish what their plans say, raise how the batch
    ends (`batch_error`: a retry if any job needs one, else a deferral, else a dead letter).

    The ledger is committed before the events are published and the events before the ack. If
    publishing fails, the next copy of the batch publishes the same events (with the same ids) at
    once; after a crash in between, once the dead worker's leases have run out.

    A handler cancelled while the providers have the pushes (its connection lost, the service
    stopping) lets those calls finish and record their outcomes, then drops its leases: the
    redelivered copy then publishes the recorded outcomes instead of sending the pushes a second
    time.
    """
    sender = deps.sender
    claimed_at = sender.clock()
    delivery = asyncio.ensure_future(
        sender.deliver_batch(batch.platform, batch.jobs, claimed_at=claimed_at)
    )
    try:
        plans = await asyncio.shield(delivery)
        await _publish_outcomes(batch.jobs, plans, deps)
    except asyncio.CancelledError:
        await asyncio.shield(_let_finish_then_abandon(sender, batch, delivery, claimed_at))
        raise
    error = batch_error(plan.error for plan in plans)
    if error is not None:
        raise error


async def _publish_outcomes(
    jobs: Sequence[PushRequested], plans: Sequence[Plan], deps: PushDeps
) -> None:
    """Publish the plans' events (the invalidations one by one, the reports in one event per
    outcome), then record that they went out, or let the retry publish them at once."""
    reported = [job for job, plan in zip(jobs, plans, strict=True) if plan.events]
    if not reported:
        return
    try:
        for plan in plans:
            if plan.invalidation is not None:
                await publish_event(
                    deps.invalidated, plan.invalidation, timeout=deps.publish_timeout
                )
        for report in batch_reports(plan.report for plan in plans if plan.report is not None):
            await publish_event(
                deps.reports_for(report.outcome), report, timeout=deps.publish_timeout
            )
    except Exception:
        await deps.sender.publishing_failed(reported)
        raise
    await deps.sender.mark_reported(reported)


async def _let_finish_then_abandon(
    sender: PushSender,
    batch: PushBatchRequested,
    delivery: asyncio.Future[Any],
    claimed_at: datetime,
) -> None:
    # The provider calls are bounded by their deadline; whatever they end with is recorded (or
    # the claims released) by `deliver_batch` itself.
    with contextlib.suppress(Exception):
        await delivery
    await sender.abandon(batch.platform, batch.jobs, claimed_at=claimed_at)


async def report_given_up(deps: PushDeps, message: StreamMessage[Any], error: str) -> None:
    """The dead-letter hook of `push_notifications`: the jobs of a batch out of retries are
    reported failed, so the router's ledger does not keep them pending. Those the batch had
    delivered stay delivered there (a failure never overwrites a delivery), so they need not be
    told apart. Their own ledger rows stay as they are, so a batch replayed from the dead-letter
    queue sends those still `retrying` (and then reports them delivered) as usual."""
    batch = as_batch(PUSH_JOB.validate_json(message.body))
    report = batch_report(
        [report_for(job, DeliveryOutcome.FAILED, RETRIES_EXHAUSTED) for job in batch.jobs]
    )
    await publish_event(
        deps.failed, report, timeout=deps.publish_timeout, correlation_id=message.correlation_id
    )


def register_handlers(broker: RabbitBroker, deps: PushDeps) -> RabbitSubscriber:
    subscriber = broker.subscriber(
        PUSH_NOTIFICATIONS.queue,
        EXCHANGE,
        title=f"{PUSH_NOTIFICATIONS.name}:consume",
        description=(
            "Send the push notifications of one message to one platform's devices, then report "
            "the outcomes."
        ),
    )

    @subscriber
    async def push_requested(job: AnyPushJob) -> None:
        await send_batch(as_batch(job), deps)

    return subscriber
