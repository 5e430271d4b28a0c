"""The subscriber and the shared sender workflow wired as in production, on the in-memory broker
and an SQLite ledger."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from faststream import TestApp
from faststream.asgi import AsgiFastStream
from faststream.rabbit import RabbitBroker, RabbitMessage, RabbitQueue, TestRabbitBroker
from sqlalchemy import Connection, event
from sqlalchemy.ext.asyncio import AsyncEngine

from email_sender.app import EmailService, build_service, specification
from email_sender.backends import EmailRejected
from email_sender.rendering import RenderedEmail
from email_sender.settings import Settings
from email_sender.tables import Failure, email_deliveries, metadata
from herald_shared.events import (
    DeliveriesReported,
    DeliveryOutcome,
    DeliveryReported,
    EmailBatchRequested,
    EmailBounced,
    EmailJobsRequested,
    EmailRequested,
    address_digest,
    utc_now,
)
from herald_shared.ledger import Claimed, DeliveryLedger, DeliveryStatus, LedgerEntry
from herald_shared.retry import ATTEMPT_HEADER, DeferredError
from herald_shared.topology import (
    EMAIL_BOUNCED,
    EMAIL_DELIVERED,
    EMAIL_FAILED,
    EMAIL_SEND,
    EXCHANGE,
)
from tests.support.infra import wait_until
from tests.unit.email_sender.support import (
    RecordingBackend,
    email_batch,
    email_job,
    email_jobs,
    other_recipient,
    transient,
    unit_settings,
)


@dataclass
class Harness:
    service: EmailService
    backend: RecordingBackend
    reports: list[tuple[str, DeliveriesReported, str | None]] = field(default_factory=list)
    bounces: list[EmailBounced] = field(default_factory=list)

    @property
    def app(self) -> AsgiFastStream:
        return self.service.app

    @property
    def broker(self) -> RabbitBroker:
        return self.service.broker

    @property
    def engine(self) -> AsyncEngine:
        return self.service.engine

    @property
    def max_retries(self) -> int:
        return self.service.settings.rabbitmq.max_retries

    @property
    def deliveries(self) -> DeliveryLedger:
        return DeliveryLedger(self.engine, email_deliveries)

    async def publish(
        self,
        job: EmailRequested | EmailBatchRequested | EmailJobsRequested,
        *,
        correlation_id: str | None = None,
        headers: dict[str, Any] | None = None,
    ) -> None:
        await self.broker.publish(
            job,
            exchange=EXCHANGE,
            routing_key=EMAIL_SEND,
            correlation_id=correlation_id,
            headers=headers,
        )

    async def ledger(self, job: EmailRequested) -> LedgerEntry:
        entry = await self.deliveries.get(job.notification_id)
        assert entry is not None
        return entry

    def reported(self, routing_key: str) -> list[DeliveryReported]:
        """Every single report that went out on `routing_key`, in order."""
        return [
            report
            for key, batch, _ in self.reports
            if key == routing_key
            for report in batch.reports
        ]

    async def metrics(self) -> str:
        transport = httpx.ASGITransport(app=self.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return (await client.get("/metrics")).text


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> RecordingBackend:
    """Succeeds, or first raises the exceptions given by indirect parametrisation."""
    failures: tuple[Exception, ...] = getattr(request, "param", ())
    return RecordingBackend(*failures)


@contextlib.asynccontextmanager
async def running(
    tmp_path: Path, sqlite_url: str, backend: RecordingBackend
) -> AsyncIterator[Harness]:
    """The app started on the in-memory broker, its reports collected."""
    service = build_service(unit_settings(tmp_path, sqlite_url), backend=backend)
    broker = service.broker
    harness = Harness(service=service, backend=backend)

    async def collect(report: DeliveriesReported, message: RabbitMessage) -> None:
        routing_key = message.raw_message.routing_key or ""
        harness.reports.append((routing_key, report, message.correlation_id))

    # One queue per report key: `notification.email.*` would take the jobs as well.
    for routing_key in (EMAIL_DELIVERED, EMAIL_FAILED):
        queue = RabbitQueue(f"test.{routing_key}", routing_key=routing_key)
        broker.subscriber(queue, EXCHANGE)(collect)

    async def collect_bounce(bounce: EmailBounced) -> None:
        harness.bounces.append(bounce)

    broker.subscriber(RabbitQueue("test.bounces", routing_key=EMAIL_BOUNCED), EXCHANGE)(
        collect_bounce
    )

    async with TestRabbitBroker(broker), TestApp(service.app):
        yield harness


@pytest.fixture
async def harness(
    tmp_path: Path, sqlite_url: str, backend: RecordingBackend
) -> AsyncIterator[Harness]:
    async with running(tmp_path, sqlite_url, backend) as started:
        yield started


async def test_a_single_job_is_still_accepted_sent_once_recorded_and_reported_delivered(
    harness: Harness,
) -> None:
    """`EmailRequested` (from a router of an earlier version, or replayed from the dead-letter
    queue) is handled as a delivery of one job."""
    job = email_job()

    await harness.publish(job, correlation_id="corr-42")

    ((notification_id, rendered),) = harness.backend.sent
    assert notification_id == job.notification_id
    assert rendered.message_id == f"<{job.notification_id}@herald.localhost>"
    assert f"Message-ID: {rendered.message_id}\n".encode() in rendered.data
    ((routing_key, event, correlation_id),) = harness.reports
    assert routing_key == EMAIL_DELIVERED
    assert correlation_id == "corr-42"
    assert (event.channel, event.outcome) == ("email", "delivered")
    (report,) = event.reports
    assert (report.notification_id, report.message_id, report.recipient_id) == (
        job.notification_id,
        job.message_id,
        job.recipient_id,
    )
    assert (report.channel, report.outcome, report.reason) == ("email", "delivered", None)
    entry = await harness.ledger(job)
    assert (entry.status, entry.failure, entry.attempts, entry.reported, entry.provider) == (
        DeliveryStatus.DELIVERED,
        None,
        1,
        True,
        "recording",
    )


@pytest.mark.parametrize("kind", ["jobs", "batch"])
async def test_a_delivery_sends_each_email_once_and_reports_them_in_one_event(
    harness: Harness, kind: str
) -> None:
    """`EmailJobsRequested` (of any messages: here two) as the router publishes it, and
    `EmailBatchRequested` (one message's) as a router of the previous version did."""
    jobs = [other_recipient(number) for number in range(5)]
    if kind == "jobs":
        jobs[3:] = [job.model_copy(update={"message_id": uuid.uuid4()}) for job in jobs[3:]]
    delivery = email_jobs(*jobs) if kind == "jobs" else email_batch(*jobs)

    await harness.publish(delivery, correlation_id="corr-7")

    assert sorted(harness.backend.sent_ids) == sorted(job.notification_id for job in jobs)
    ((routing_key, event, correlation_id),) = harness.reports
    assert (routing_key, correlation_id) == (EMAIL_DELIVERED, "corr-7")
    assert event.outcome is DeliveryOutcome.DELIVERED
    assert sorted((report.notification_id, report.message_id) for report in event.reports) == (
        sorted((job.notification_id, job.message_id) for job in jobs)
    )
    for job in jobs:
        entry = await harness.ledger(job)
        assert (entry.status, entry.attempts, entry.reported) == (DeliveryStatus.DELIVERED, 1, True)
    metrics = await harness.metrics()
    assert 'herald_emails_total{backend="recording",outcome="delivered"} 5.0' in metrics
    assert 'herald_email_send_duration_seconds_count{backend="recording"} 5.0' in metrics


async def test_a_delivered_batch_costs_three_ledger_statements(harness: Harness) -> None:
    """Claim, record, mark reported: one statement each for the whole delivery."""
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement.split(None, 1)[0].upper())

    engine = harness.engine.sync_engine
    event.listen(engine, "before_cursor_execute", record)
    try:
        await harness.publish(email_jobs(*(other_recipient(number) for number in range(10))))
    finally:
        event.remove(engine, "before_cursor_execute", record)

    assert len(harness.backend.sent) == 10
    assert statements == ["INSERT", "UPDATE", "UPDATE"]


async def test_deliveries_handled_together_share_their_statements_and_their_report(
    harness: Harness,
) -> None:
    """Deliveries the consumer holds at once go through the ledger and out as one batch, each
    still ending on its own."""
    first = [other_recipient(1), other_recipient(2)]
    second = [email_job(), other_recipient(3).model_copy(update={"message_id": uuid.uuid4()})]
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement.split(None, 1)[0].upper())

    engine = harness.engine.sync_engine
    event.listen(engine, "before_cursor_execute", record)
    try:
        outcomes = await asyncio.gather(
            harness.service.sender.deliver(first), harness.service.sender.deliver(second)
        )
    finally:
        event.remove(engine, "before_cursor_execute", record)

    assert list(outcomes) == [None, None]
    jobs = [*first, *second]
    assert sorted(harness.backend.sent_ids) == sorted(job.notification_id for job in jobs)
    assert statements == ["INSERT", "UPDATE", "UPDATE"]
    ((routing_key, event_, _),) = harness.reports
    assert routing_key == EMAIL_DELIVERED
    assert sorted(report.notification_id for report in event_.reports) == sorted(
        job.notification_id for job in jobs
    )


async def test_a_redelivered_batch_is_acknowledged_without_sending_again(
    harness: Harness,
) -> None:
    jobs = (email_job(), other_recipient(1))

    await harness.publish(email_jobs(*jobs))
    await harness.publish(email_jobs(*jobs))
    await harness.publish(email_batch(*jobs))  # the same jobs, as an older router sent them

    assert len(harness.backend.sent) == 2
    assert len(harness.reports) == 1
    metrics = await harness.metrics()
    assert 'herald_emails_total{backend="recording",outcome="delivered"} 2.0' in metrics
    assert 'herald_emails_total{backend="recording",outcome="duplicate"} 4.0' in metrics
    assert 'herald_email_send_duration_seconds_count{backend="recording"} 2.0' in metrics


@pytest.mark.parametrize(
    "backend", [(EmailRejected("smtp 550 5.1.1", bounce=True),)], indirect=True
)
async def test_a_bounce_is_recorded_reported_failed_and_dead_lettered(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    job = email_job()

    await harness.publish(email_jobs(job))
    await harness.publish(email_jobs(job))  # a replay changes nothing

    assert harness.backend.sent == []
    ((routing_key, batch, _),) = harness.reports
    assert (routing_key, batch.outcome) == (EMAIL_FAILED, DeliveryOutcome.FAILED)
    (report,) = batch.reports
    assert (report.outcome, report.reason) == (DeliveryOutcome.FAILED, "smtp 550 5.1.1")
    entry = await harness.ledger(job)
    assert (entry.status, entry.failure, entry.reason, entry.reported) == (
        DeliveryStatus.FAILED,
        Failure.BOUNCED,
        "smtp 550 5.1.1",
        True,
    )
    assert "reason=permanent" in caplog.text
    assert f"email.bounced notification_id={job.notification_id}" in caplog.text
    assert "bob@example.test" not in caplog.text
    metrics = await harness.metrics()
    assert 'herald_emails_total{backend="recording",outcome="bounced"} 1.0' in metrics
    # message-service hears of it too, once, naming the address by its digest only.
    (bounce,) = harness.bounces
    assert (bounce.user_id, bounce.notification_id, bounce.reason) == (
        job.recipient_id,
        job.notification_id,
        "smtp 550 5.1.1",
    )
    assert bounce.address_digest == address_digest("bob@example.test")


async def test_an_unbuildable_email_is_a_permanent_failure(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    job = email_job(to_address="bob@example.test\r\nBcc: eve@evil.test")

    await harness.publish(email_jobs(job))

    assert harness.backend.sent == []
    ((routing_key, batch, _),) = harness.reports
    assert routing_key == EMAIL_FAILED
    (report,) = batch.reports
    assert report.reason == "invalid recipient address"
    entry = await harness.ledger(job)
    assert (entry.status, entry.failure) == (DeliveryStatus.FAILED, Failure.INVALID)
    assert "reason=permanent" in caplog.text
    assert "evil.test" not in caplog.text
    metrics = await harness.metrics()
    assert 'herald_emails_total{backend="recording",outcome="invalid"} 1.0' in metrics


@pytest.mark.parametrize("backend", [(transient(),)], indirect=True)
async def test_a_transient_failure_releases_the_claim_for_the_retry(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    job = email_job()

    await harness.publish(email_jobs(job))

    assert harness.backend.sent == []
    assert harness.reports == []
    entry = await harness.ledger(job)
    assert (entry.status, entry.reason, entry.attempts) == (
        DeliveryStatus.RETRYING,
        "smtp 451 4.3.0",
        1,
    )
    assert "herald.message.retry_scheduled" in caplog.text

    await harness.publish(email_jobs(job))  # what the retry delivers

    assert len(harness.backend.sent) == 1
    ((_, batch, _),) = harness.reports
    assert batch.outcome is DeliveryOutcome.DELIVERED
    assert (await harness.ledger(job)).attempts == 2


async def test_mixed_outcomes_are_reported_per_outcome_and_the_retry_sends_only_the_transient_one(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    delivered, bounced, deferred = other_recipient(1), other_recipient(2), other_recipient(3)
    harness.backend.fail(bounced.notification_id, EmailRejected("smtp 550 5.1.1", bounce=True))
    harness.backend.fail(deferred.notification_id, transient())
    batch = email_jobs(delivered, bounced, deferred)

    await harness.publish(batch)

    assert harness.backend.sent_ids == [delivered.notification_id]
    assert sorted(
        (key, report.notification_id) for key, b, _ in harness.reports for report in b.reports
    ) == sorted(
        [
            (EMAIL_DELIVERED, delivered.notification_id),
            (EMAIL_FAILED, bounced.notification_id),
        ]
    )
    assert harness.reported(EMAIL_FAILED)[0].reason == "smtp 550 5.1.1"
    # The transient one decides: the whole delivery is retried, not dead-lettered.
    assert "herald.message.retry_scheduled" in caplog.text
    assert "herald.message.dead_lettered" not in caplog.text
    assert (await harness.ledger(delivered)).status is DeliveryStatus.DELIVERED
    assert (await harness.ledger(bounced)).status is DeliveryStatus.FAILED
    entry = await harness.ledger(deferred)
    assert (entry.status, entry.reason) == (DeliveryStatus.RETRYING, "smtp 451 4.3.0")
    harness.backend.attempted.clear()
    harness.reports.clear()

    await harness.publish(batch)  # what the retry delivers

    assert harness.backend.attempted == [deferred.notification_id]
    ((routing_key, retried, _),) = harness.reports
    assert routing_key == EMAIL_DELIVERED
    assert [report.notification_id for report in retried.reports] == [deferred.notification_id]
    for job in (delivered, bounced, deferred):
        assert (await harness.ledger(job)).reported
    assert (await harness.ledger(deferred)).attempts == 2


async def test_a_failing_send_does_not_take_the_batchs_other_outcomes_with_it(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception the backend should not raise (a bug) is that job's transient failure: the
    others are recorded and reported at once, and the delivery's retry sends it again."""
    sent, broken = other_recipient(1), other_recipient(2)
    harness.backend.fail(broken.notification_id, KeyError("bob@example.test"))

    await harness.publish(email_jobs(sent, broken))

    assert [report.notification_id for report in harness.reported(EMAIL_DELIVERED)] == [
        sent.notification_id
    ]
    assert (await harness.ledger(sent)).reported
    entry = await harness.ledger(broken)
    assert (entry.status, entry.reason) == (DeliveryStatus.RETRYING, "recording error (KeyError)")
    assert f"email.provider_error notification_id={broken.notification_id}" in caplog.text
    assert "herald.message.retry_scheduled" in caplog.text
    assert "bob@example.test" not in caplog.text

    await harness.publish(email_jobs(sent, broken))

    assert sorted(harness.backend.sent_ids) == sorted(
        [sent.notification_id, broken.notification_id]
    )


async def test_a_job_being_sent_elsewhere_is_deferred_while_the_others_are_sent(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    busy, free = email_job(), other_recipient(1)
    await harness.deliveries.claim(
        busy, provider="recording", now=utc_now(), lease=timedelta(seconds=45)
    )

    await harness.publish(email_jobs(busy, free))

    assert harness.backend.sent_ids == [free.notification_id]
    assert [report.notification_id for report in harness.reported(EMAIL_DELIVERED)] == [
        free.notification_id
    ]
    assert "herald.message.deferred" in caplog.text
    assert "delivery in progress elsewhere" in caplog.text
    metrics = await harness.metrics()
    assert 'herald_emails_total{backend="recording",outcome="in_progress"} 1.0' in metrics


async def test_a_job_whose_report_is_being_published_elsewhere_is_retried_later(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    job = email_job()
    now = utc_now()
    # Another worker sent it and recorded the outcome; it is publishing the report right now.
    await harness.deliveries.claim(job, provider="recording", now=now, lease=timedelta(seconds=45))
    await harness.deliveries.finish(
        job.notification_id, status=DeliveryStatus.DELIVERED, reason=None, now=now
    )

    await harness.publish(email_jobs(job))

    assert harness.backend.sent == []
    assert harness.reports == []  # that worker reports it, not this copy as well
    assert "delivery in progress elsewhere" in caplog.text
    assert not (await harness.ledger(job)).reported


class UnreachableBroker:
    """A publisher whose broker is gone (publish_event's timeout, a nack, an unroutable key)."""

    async def publish(self, *args: Any, **kwargs: Any) -> None:
        raise TimeoutError


async def test_reports_that_could_not_be_published_go_out_with_the_retry(
    harness: Harness,
) -> None:
    delivered, bounced = email_job(), other_recipient(1)
    harness.backend.fail(bounced.notification_id, EmailRejected("smtp 550 5.1.1", bounce=True))
    batch = email_jobs(delivered, bounced)
    sender = harness.service.sender
    publishers = sender.publishers

    sender.publishers = dict.fromkeys(publishers, UnreachableBroker())  # type: ignore[arg-type]
    await harness.publish(batch)
    for job in (delivered, bounced):
        assert not (await harness.ledger(job)).reported
    sender.publishers = publishers

    await harness.publish(batch)  # the retry: at once, not after the leases

    assert harness.backend.attempted == [delivered.notification_id, bounced.notification_id]
    assert [report.notification_id for report in harness.reported(EMAIL_DELIVERED)] == [
        delivered.notification_id
    ]
    assert [report.notification_id for report in harness.reported(EMAIL_FAILED)] == [
        bounced.notification_id
    ]
    for job in (delivered, bounced):
        entry = await harness.ledger(job)
        assert (entry.attempts, entry.reported) == (1, True)


async def test_a_claim_whose_lease_ran_out_is_taken_over(harness: Harness) -> None:
    job = email_job()
    await harness.deliveries.claim(
        job,
        provider="recording",
        now=utc_now() - timedelta(hours=1),
        lease=timedelta(seconds=45),
    )

    await harness.publish(email_jobs(job))

    assert len(harness.backend.sent) == 1
    assert (await harness.ledger(job)).attempts == 2


async def test_an_outcome_recorded_but_not_reported_is_reported_without_sending(
    harness: Harness,
) -> None:
    recorded, new = email_job(), other_recipient(1)
    # As if the worker died after recording the outcome, an hour ago, before reporting it.
    then = utc_now() - timedelta(hours=1)
    dead_worker = harness.deliveries
    await dead_worker.claim(recorded, provider="recording", now=then, lease=timedelta(1))
    await dead_worker.finish(
        recorded.notification_id, status=DeliveryStatus.DELIVERED, reason=None, now=then
    )

    await harness.publish(email_jobs(recorded, new))

    assert harness.backend.sent_ids == [new.notification_id]
    ((routing_key, batch, _),) = harness.reports
    assert routing_key == EMAIL_DELIVERED
    assert sorted(report.notification_id for report in batch.reports) == sorted(
        [recorded.notification_id, new.notification_id]
    )
    assert (await harness.ledger(recorded)).reported


async def test_a_report_has_the_same_event_ids_however_often_it_is_published(
    harness: Harness,
) -> None:
    batch = email_jobs(email_job(), other_recipient(1))
    await harness.publish(batch)
    async with harness.engine.begin() as connection:
        await connection.exec_driver_sql("UPDATE email_deliveries SET reported_at = NULL")

    await harness.publish(batch)

    first, second = (report for _, report, _ in harness.reports)
    assert first.event_id == second.event_id
    assert [report.event_id for report in first.reports] == [
        report.event_id for report in second.reports
    ]
    assert len(harness.backend.sent) == 2


@pytest.mark.parametrize("kind", ["jobs", "batch"])
async def test_a_delivery_out_of_retries_is_reported_failed_in_one_event(
    harness: Harness, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    jobs = [email_job(), other_recipient(1), other_recipient(2)]
    for job in jobs:
        harness.backend.fail(job.notification_id, transient())
    delivery = email_jobs(*jobs) if kind == "jobs" else email_batch(*jobs)

    # The last attempt the policy allows, as the retry middleware delivers it.
    await harness.publish(
        delivery, headers={ATTEMPT_HEADER: harness.max_retries}, correlation_id="corr-9"
    )

    assert "reason=retries-exhausted" in caplog.text
    ((routing_key, batch, correlation_id),) = harness.reports
    assert (routing_key, batch.outcome, correlation_id) == (
        EMAIL_FAILED,
        DeliveryOutcome.FAILED,
        "corr-9",
    )
    assert sorted((report.notification_id, report.reason) for report in batch.reports) == sorted(
        (job.notification_id, "retries exhausted") for job in jobs
    )


async def test_a_single_job_out_of_retries_is_reported_failed(harness: Harness) -> None:
    job = email_job()
    harness.backend.fail(job.notification_id, transient())

    await harness.publish(job, headers={ATTEMPT_HEADER: harness.max_retries})

    ((routing_key, batch, _),) = harness.reports
    assert routing_key == EMAIL_FAILED
    assert [report.notification_id for report in batch.reports] == [job.notification_id]


class GatedBackend(RecordingBackend):
    """Holds the send of `held` until `release` is set; the others go through at once."""

    def __init__(self, held: uuid.UUID) -> None:
        super().__init__()
        self.held = held
        self.holding = asyncio.Event()
        self.release = asyncio.Event()

    async def send(self, message: RenderedEmail, *, notification_id: uuid.UUID) -> None:
        if notification_id == self.held:
            self.holding.set()
            await self.release.wait()
        await super().send(message, notification_id=notification_id)


@pytest.mark.parametrize("fails", [False, True], ids=["accepted", "transient"])
async def test_a_handler_cancelled_mid_send_lets_the_send_finish_and_its_outcome_go_out(
    tmp_path: Path, sqlite_url: str, fails: bool
) -> None:
    """As when the broker connection is lost while the mail server has an e-mail: its answer is
    still recorded and reported, and the copy that RabbitMQ redelivers finds it done (or, after a
    transient failure, free to send at once) without sending any accepted e-mail a second
    time."""
    quick, slow = email_job(), other_recipient(1)
    backend = GatedBackend(slow.notification_id)
    if fails:
        backend.fail(slow.notification_id, transient())
    async with running(tmp_path, sqlite_url, backend) as harness:
        handler = asyncio.create_task(harness.publish(email_jobs(quick, slow)))
        await asyncio.wait_for(backend.holding.wait(), timeout=5)
        handler.cancel()
        with pytest.raises(asyncio.CancelledError):
            await handler
        backend.release.set()

        async def settled() -> bool:
            quick_entry, slow_entry = [await harness.ledger(job) for job in (quick, slow)]
            if fails:
                return quick_entry.reported and slow_entry.status is DeliveryStatus.RETRYING
            return quick_entry.reported and slow_entry.reported

        await wait_until(settled)
        delivered = [quick] if fails else [quick, slow]
        assert sorted(report.notification_id for report in harness.reported(EMAIL_DELIVERED)) == (
            sorted(job.notification_id for job in delivered)
        )
        backend.attempted.clear()

        await harness.publish(email_jobs(quick, slow))  # the redelivered copy

        assert backend.attempted == ([slow.notification_id] if fails else [])
        assert sorted(report.notification_id for report in harness.reported(EMAIL_DELIVERED)) == (
            sorted([quick.notification_id, slow.notification_id])
        )


async def test_closing_drops_only_the_leases_it_still_holds(
    tmp_path: Path, sqlite_url: str
) -> None:
    """A worker whose leases ran out and were taken over must not free the new owner's when it
    shuts down."""
    job = email_job()
    backend = GatedBackend(job.notification_id)
    async with running(tmp_path, sqlite_url, backend) as harness:
        sender = harness.service.sender
        handler = asyncio.create_task(sender.deliver([job]))
        await asyncio.wait_for(backend.holding.wait(), timeout=5)
        # The lease runs out (as if this worker had hung), and another worker takes it over.
        async with harness.engine.begin() as connection:
            await connection.exec_driver_sql(
                "UPDATE email_deliveries SET claimed_at = ?",
                (utc_now() - timedelta(hours=1),),
            )
        taken_over = await harness.deliveries.claim(
            job, provider="recording", now=utc_now(), lease=sender.tuning.lease
        )
        assert isinstance(taken_over, Claimed)

        await sender.aclose(timeout=0.05)  # shutting down: the send still hangs

        entry = await harness.ledger(job)
        assert (entry.status, entry.attempts) == (DeliveryStatus.SENDING, 2)
        with pytest.raises(DeferredError, match="in progress"):  # the new owner's lease holds
            await sender.deliver([job])
        backend.release.set()
        # The send ends after all: its outcome is not recorded over the new owner's row, nor
        # reported (the new owner does it); the delivery comes back later and finds it final.
        with pytest.raises(DeferredError, match="taken over"):
            await handler
        entry = await harness.ledger(job)
        assert (entry.status, entry.attempts) == (DeliveryStatus.SENDING, 2)
        assert harness.reports == []


async def test_an_unparsable_job_is_dead_lettered_without_its_content(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    body = {"type": "email_requested", "notification_id": str(uuid.uuid4())}
    body["to_address"] = "carol@example.test"

    await harness.broker.publish(body, exchange=EXCHANGE, routing_key=EMAIL_SEND)

    assert harness.backend.sent == []
    assert "reason=unparsable" in caplog.text
    assert "carol@example.test" not in caplog.text


@pytest.mark.parametrize("kind", ["email_batch_requested", "email_jobs_requested"])
async def test_a_delivery_carrying_a_notification_twice_or_mixing_messages_is_unparsable(
    harness: Harness, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    """One message's batch carries that message's jobs only; neither kind carries a
    notification twice."""
    job = email_job()
    if kind == "email_batch_requested":
        other = other_recipient(1).model_copy(update={"message_id": uuid.uuid4()})
        body = {
            "type": kind,
            "message_id": str(job.message_id),
            "jobs": [job.model_dump(mode="json"), other.model_dump(mode="json")],
        }
    else:
        body = {"type": kind, "jobs": [job.model_dump(mode="json")] * 2}

    await harness.broker.publish(body, exchange=EXCHANGE, routing_key=EMAIL_SEND)

    assert harness.backend.sent == []
    assert "reason=unparsable" in caplog.text
    assert "bob@example.test" not in caplog.text


async def test_migrations_match_the_tables(harness: Harness) -> None:
    def differences(connection: Connection) -> list[Any]:
        context = MigrationContext.configure(
            connection, opts={"version_table": "alembic_version_email_sender"}
        )
        return list(compare_metadata(context, metadata))

    async with harness.engine.connect() as connection:
        assert await connection.run_sync(differences) == []


def test_the_specification_documents_what_is_accepted_and_what_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    document = specification(Settings()).to_specification().to_jsonable()

    schemas = document["components"]["schemas"]
    payloads = {
        name: message["payload"]["$ref"].rsplit("/", 1)[1]
        for name, message in document["components"]["messages"].items()
    }
    assert payloads["notification.email.delivered:publish:Message"] == "DeliveriesReported"
    assert payloads["notification.email.failed:publish:Message"] == "DeliveriesReported"
    received = [
        payload for name, payload in payloads.items() if name.startswith("email_notifications")
    ]
    assert len(received) == 2  # the two lanes
    for payload in received:
        assert {ref["$ref"].rsplit("/", 1)[1] for ref in schemas[payload]["oneOf"]} == {
            "EmailRequested",
            "EmailBatchRequested",
            "EmailJobsRequested",
        }
