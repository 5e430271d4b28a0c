"""The subscriber wired as in production, on the in-memory broker and an SQLite ledger."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from email.message import EmailMessage
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

from email_sender.app import create_app
from email_sender.backends import EmailRejected
from email_sender.delivery import EmailDeliveries
from email_sender.handlers import DELIVERIES_KEY
from email_sender.tables import Failure, email_deliveries, metadata
from herald_shared.database import make_engine
from herald_shared.events import (
    DeliveryBatchReported,
    DeliveryOutcome,
    DeliveryReported,
    EmailBatchRequested,
    EmailRequested,
    utc_now,
)
from herald_shared.ledger import DeliveryLedger, DeliveryStatus, LedgerEntry
from herald_shared.publishing import publish_event
from herald_shared.retry import ATTEMPT_HEADER
from herald_shared.topology import EMAIL_DELIVERED, EMAIL_FAILED, EMAIL_SEND, EXCHANGE
from tests.unit.email_sender.support import (
    RecordingBackend,
    email_batch,
    email_job,
    other_recipient,
    transient,
    unit_settings,
)


@dataclass
class Harness:
    app: AsgiFastStream
    broker: RabbitBroker
    backend: RecordingBackend
    engine: AsyncEngine
    max_retries: int
    reports: list[tuple[str, DeliveryBatchReported, str | None]] = field(default_factory=list)

    @property
    def deliveries(self) -> DeliveryLedger:
        return DeliveryLedger(self.engine, email_deliveries)

    async def publish(
        self,
        job: EmailRequested | EmailBatchRequested,
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
    settings = unit_settings(tmp_path, sqlite_url)
    app = create_app(settings, backend=backend)
    broker = app.broker
    assert isinstance(broker, RabbitBroker)
    engine = make_engine(sqlite_url)
    harness = Harness(
        app=app,
        broker=broker,
        backend=backend,
        engine=engine,
        max_retries=settings.rabbitmq.max_retries,
    )

    async def collect(report: DeliveryBatchReported, message: RabbitMessage) -> None:
        routing_key = message.raw_message.routing_key or ""
        harness.reports.append((routing_key, report, message.correlation_id))

    # One queue per report key: `notification.email.*` would take the jobs as well.
    for routing_key in (EMAIL_DELIVERED, EMAIL_FAILED):
        queue = RabbitQueue(f"test.{routing_key}", routing_key=routing_key)
        broker.subscriber(queue, EXCHANGE)(collect)

    async with TestRabbitBroker(broker), TestApp(app):
        yield harness
    await engine.dispose()


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
    queue) is handled as a batch of one."""
    job = email_job()

    await harness.publish(job, correlation_id="corr-42")

    ((notification_id, message),) = harness.backend.sent
    assert notification_id == job.notification_id
    assert message["Message-ID"] == f"<{job.notification_id}@herald.localhost>"
    ((routing_key, batch, correlation_id),) = harness.reports
    assert routing_key == EMAIL_DELIVERED
    assert correlation_id == "corr-42"
    assert (batch.message_id, batch.channel, batch.outcome) == (
        job.message_id,
        "email",
        "delivered",
    )
    (report,) = batch.reports
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


async def test_a_batch_sends_each_email_once_and_reports_them_in_one_event(
    harness: Harness,
) -> None:
    jobs = [other_recipient(number) for number in range(5)]

    await harness.publish(email_batch(*jobs), correlation_id="corr-7")

    assert sorted(harness.backend.sent_ids) == sorted(job.notification_id for job in jobs)
    ((routing_key, batch, correlation_id),) = harness.reports
    assert (routing_key, correlation_id) == (EMAIL_DELIVERED, "corr-7")
    assert batch.outcome is DeliveryOutcome.DELIVERED
    assert [report.notification_id for report in batch.reports] == [
        job.notification_id for job in jobs
    ]
    for job in jobs:
        entry = await harness.ledger(job)
        assert (entry.status, entry.attempts, entry.reported) == (DeliveryStatus.DELIVERED, 1, True)
    metrics = await harness.metrics()
    assert 'herald_emails_total{backend="recording",outcome="delivered"} 5.0' in metrics
    assert 'herald_email_send_duration_seconds_count{backend="recording"} 5.0' in metrics


async def test_a_delivered_batch_costs_three_ledger_statements(harness: Harness) -> None:
    """Claim, record, mark reported: one statement each for the whole batch."""
    deliveries: EmailDeliveries = harness.broker.context.get(DELIVERIES_KEY)
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement.split(None, 1)[0].upper())

    event.listen(deliveries.engine.sync_engine, "before_cursor_execute", record)
    try:
        await harness.publish(email_batch(*(other_recipient(number) for number in range(10))))
    finally:
        event.remove(deliveries.engine.sync_engine, "before_cursor_execute", record)

    assert len(harness.backend.sent) == 10
    assert statements == ["INSERT", "UPDATE", "UPDATE"]


async def test_a_redelivered_batch_is_acknowledged_without_sending_again(
    harness: Harness,
) -> None:
    batch = email_batch(email_job(), other_recipient(1))

    await harness.publish(batch)
    await harness.publish(batch)
    await harness.publish(batch)

    assert len(harness.backend.sent) == 2
    assert len(harness.reports) == 1
    metrics = await harness.metrics()
    assert 'herald_emails_total{backend="recording",outcome="delivered"} 2.0' in metrics
    assert 'herald_emails_total{backend="recording",outcome="duplicate"} 4.0' in metrics
    assert 'herald_email_send_duration_seconds_count{backend="recording"} 2.0' in metrics


@pytest.mark.parametrize("backend", [(EmailRejected("smtp 550 5.1.1"),)], indirect=True)
async def test_a_bounce_is_recorded_reported_failed_and_dead_lettered(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    job = email_job()

    await harness.publish(email_batch(job))
    await harness.publish(email_batch(job))  # a replay changes nothing

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
    assert "bob@example.test" not in caplog.text


async def test_an_unbuildable_email_is_a_permanent_failure(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    job = email_job(to_address="bob@example.test\r\nBcc: eve@evil.test")

    await harness.publish(email_batch(job))

    assert harness.backend.sent == []
    ((routing_key, batch, _),) = harness.reports
    assert routing_key == EMAIL_FAILED
    (report,) = batch.reports
    assert report.reason == "invalid recipient address"
    entry = await harness.ledger(job)
    assert (entry.status, entry.failure) == (DeliveryStatus.FAILED, Failure.INVALID)
    assert "reason=permanent" in caplog.text
    assert "evil.test" not in caplog.text


@pytest.mark.parametrize("backend", [(transient(),)], indirect=True)
async def test_a_transient_failure_releases_the_claim_for_the_retry(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    job = email_job()

    await harness.publish(email_batch(job))

    assert harness.backend.sent == []
    assert harness.reports == []
    entry = await harness.ledger(job)
    assert (entry.status, entry.reason, entry.attempts) == (
        DeliveryStatus.RETRYING,
        "smtp 451 4.3.0",
        1,
    )
    assert "herald.message.retry_scheduled" in caplog.text

    await harness.publish(email_batch(job))  # what the retry delivers

    assert len(harness.backend.sent) == 1
    ((_, batch, _),) = harness.reports
    assert batch.outcome is DeliveryOutcome.DELIVERED
    assert (await harness.ledger(job)).attempts == 2


async def test_mixed_outcomes_are_reported_per_outcome_and_the_retry_sends_only_the_transient_one(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    delivered, bounced, deferred = other_recipient(1), other_recipient(2), other_recipient(3)
    harness.backend.fail(bounced.notification_id, EmailRejected("smtp 550 5.1.1"))
    harness.backend.fail(deferred.notification_id, transient())
    batch = email_batch(delivered, bounced, deferred)

    await harness.publish(batch)

    assert harness.backend.sent_ids == [delivered.notification_id]
    assert [
        (key, report.notification_id) for key, b, _ in harness.reports for report in b.reports
    ] == [
        (EMAIL_DELIVERED, delivered.notification_id),
        (EMAIL_FAILED, bounced.notification_id),
    ]
    assert harness.reported(EMAIL_FAILED)[0].reason == "smtp 550 5.1.1"
    # The transient one decides: the whole batch is retried, not dead-lettered.
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
    others are recorded and reported at once, and the batch's retry sends it again."""
    sent, broken = other_recipient(1), other_recipient(2)
    harness.backend.fail(broken.notification_id, KeyError("bob@example.test"))

    await harness.publish(email_batch(sent, broken))

    assert [report.notification_id for report in harness.reported(EMAIL_DELIVERED)] == [
        sent.notification_id
    ]
    assert (await harness.ledger(sent)).reported
    entry = await harness.ledger(broken)
    assert (entry.status, entry.reason) == (DeliveryStatus.RETRYING, "KeyError")
    assert "email.backend_error" in caplog.text
    assert "herald.message.retry_scheduled" in caplog.text
    assert "bob@example.test" not in caplog.text

    await harness.publish(email_batch(sent, broken))

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

    await harness.publish(email_batch(busy, free))

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

    await harness.publish(email_batch(job))

    assert harness.backend.sent == []
    assert harness.reports == []  # that worker reports it, not this copy as well
    assert "delivery in progress elsewhere" in caplog.text
    assert not (await harness.ledger(job)).reported


async def test_reports_that_could_not_be_published_go_out_with_the_retry(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    delivered, bounced = email_job(), other_recipient(1)
    harness.backend.fail(bounced.notification_id, EmailRejected("smtp 550 5.1.1"))
    batch = email_batch(delivered, bounced)

    async def unreachable(*args: Any, **kwargs: Any) -> None:
        raise TimeoutError  # publish_event's timeout, a nack, an unroutable key

    monkeypatch.setattr("email_sender.handlers.publish_event", unreachable)
    await harness.publish(batch)
    for job in (delivered, bounced):
        assert not (await harness.ledger(job)).reported
    monkeypatch.setattr("email_sender.handlers.publish_event", publish_event)

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

    await harness.publish(email_batch(job))

    assert len(harness.backend.sent) == 1
    assert (await harness.ledger(job)).attempts == 2


async def test_an_outcome_recorded_but_not_reported_is_reported_without_sending(
    harness: Harness,
) -> None:
    recorded, new = email_job(), other_recipient(1)
    # As if the worker died after recording the outcome, an hour ago, before reporting it.
    then = utc_now() - timedelta(hours=1)
    await harness.deliveries.claim(recorded, provider="recording", now=then, lease=timedelta(1))
    await harness.deliveries.finish(
        recorded.notification_id, status=DeliveryStatus.DELIVERED, reason=None, now=then
    )

    await harness.publish(email_batch(recorded, new))

    assert harness.backend.sent_ids == [new.notification_id]
    ((routing_key, batch, _),) = harness.reports
    assert routing_key == EMAIL_DELIVERED
    assert [report.notification_id for report in batch.reports] == [
        recorded.notification_id,
        new.notification_id,
    ]
    assert (await harness.ledger(recorded)).reported


async def test_a_report_has_the_same_event_ids_however_often_it_is_published(
    harness: Harness,
) -> None:
    batch = email_batch(email_job(), other_recipient(1))
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


async def test_a_batch_out_of_retries_is_reported_failed_in_one_event(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    jobs = [email_job(), other_recipient(1), other_recipient(2)]
    for job in jobs:
        harness.backend.fail(job.notification_id, transient())

    # The last attempt the policy allows, as the retry middleware delivers it.
    await harness.publish(email_batch(*jobs), headers={ATTEMPT_HEADER: harness.max_retries})

    assert "reason=retries-exhausted" in caplog.text
    ((routing_key, batch, _),) = harness.reports
    assert (routing_key, batch.outcome) == (EMAIL_FAILED, DeliveryOutcome.FAILED)
    assert [(report.notification_id, report.reason) for report in batch.reports] == [
        (job.notification_id, "retries exhausted") for job in jobs
    ]


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

    async def send(self, message: EmailMessage, *, notification_id: uuid.UUID) -> None:
        if notification_id == self.held:
            self.holding.set()
            await self.release.wait()
        await super().send(message, notification_id=notification_id)


@pytest.mark.parametrize("fails", [False, True], ids=["accepted", "transient"])
async def test_a_handler_cancelled_mid_send_lets_the_send_finish_records_it_and_drops_its_leases(
    tmp_path: Path, sqlite_url: str, fails: bool
) -> None:
    """As when the broker connection is lost while the mail server has an e-mail: its answer is
    still recorded, and the copy that RabbitMQ redelivers reports the batch at once (not `Busy`
    until the leases run out) without sending any accepted e-mail a second time."""
    quick, slow = email_job(), other_recipient(1)
    backend = GatedBackend(slow.notification_id)
    if fails:
        backend.fail(slow.notification_id, transient())
    async with running(tmp_path, sqlite_url, backend) as harness:
        handler = asyncio.create_task(harness.publish(email_batch(quick, slow)))
        await asyncio.wait_for(backend.holding.wait(), timeout=5)
        handler.cancel()
        backend.release.set()
        with pytest.raises(asyncio.CancelledError):
            await handler

        assert harness.reports == []
        entry = await harness.ledger(quick)
        assert (entry.status, entry.reported) == (DeliveryStatus.DELIVERED, False)
        entry = await harness.ledger(slow)
        expected = DeliveryStatus.RETRYING if fails else DeliveryStatus.DELIVERED
        assert (entry.status, entry.reported) == (expected, False)
        backend.attempted.clear()

        await harness.publish(email_batch(quick, slow))  # the redelivered copy

        assert backend.attempted == ([slow.notification_id] if fails else [])
        assert sorted(report.notification_id for report in harness.reported(EMAIL_DELIVERED)) == (
            sorted([quick.notification_id, slow.notification_id])
        )


async def test_cancelling_drops_only_its_own_leases(harness: Harness) -> None:
    """A worker whose leases ran out and were taken over must not free the new owner's."""
    job = email_job()
    deliveries: EmailDeliveries = harness.broker.context.get(DELIVERIES_KEY)
    first = utc_now() - deliveries.lease - timedelta(seconds=1)
    await harness.deliveries.claim(job, provider="recording", now=first, lease=deliveries.lease)
    await harness.deliveries.claim(job, provider="recording", now=utc_now(), lease=deliveries.lease)

    await deliveries.abandon([job], claimed_at=first)
    await harness.publish(email_batch(job))

    assert harness.backend.sent == []  # still `Busy`: the second claim's lease holds


async def test_an_unparsable_job_is_dead_lettered_without_its_content(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    body = {"type": "email_requested", "notification_id": str(uuid.uuid4())}
    body["to_address"] = "carol@example.test"

    await harness.broker.publish(body, exchange=EXCHANGE, routing_key=EMAIL_SEND)

    assert harness.backend.sent == []
    assert "reason=unparsable" in caplog.text
    assert "carol@example.test" not in caplog.text


async def test_a_batch_mixing_messages_is_dead_lettered_as_unparsable(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    job, stranger = email_job(), other_recipient(1).model_copy(update={"message_id": uuid.uuid4()})
    body = {
        "type": "email_batch_requested",
        "message_id": str(job.message_id),
        "jobs": [job.model_dump(mode="json"), stranger.model_dump(mode="json")],
    }

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
