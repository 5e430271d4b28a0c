"""The subscriber wired as in production, on the in-memory broker and an SQLite ledger."""

from __future__ import annotations

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
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from email_sender.app import create_app
from email_sender.backends import EmailRejected
from email_sender.tables import Failure, email_deliveries, metadata
from herald_shared.database import make_engine
from herald_shared.events import DeliveryOutcome, DeliveryReported, EmailRequested, utc_now
from herald_shared.ledger import DeliveryLedger, DeliveryStatus, LedgerEntry
from herald_shared.publishing import publish_event
from herald_shared.topology import EMAIL_DELIVERED, EMAIL_FAILED, EMAIL_SEND, EXCHANGE
from tests.unit.email_sender.support import RecordingBackend, email_job, transient, unit_settings


@dataclass
class Harness:
    app: AsgiFastStream
    broker: RabbitBroker
    backend: RecordingBackend
    engine: AsyncEngine
    reports: list[tuple[str, DeliveryReported, str | None]] = field(default_factory=list)

    @property
    def deliveries(self) -> DeliveryLedger:
        return DeliveryLedger(self.engine, email_deliveries)

    async def publish(self, job: EmailRequested, *, correlation_id: str | None = None) -> None:
        await self.broker.publish(
            job, exchange=EXCHANGE, routing_key=EMAIL_SEND, correlation_id=correlation_id
        )

    async def ledger(self, job: EmailRequested) -> LedgerEntry:
        entry = await self.deliveries.get(job.notification_id)
        assert entry is not None
        return entry

    async def metrics(self) -> str:
        transport = httpx.ASGITransport(app=self.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return (await client.get("/metrics")).text


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> RecordingBackend:
    """Succeeds, or first raises the exceptions given by indirect parametrisation."""
    failures: tuple[Exception, ...] = getattr(request, "param", ())
    return RecordingBackend(*failures)


@pytest.fixture
async def harness(
    tmp_path: Path, sqlite_url: str, backend: RecordingBackend
) -> AsyncIterator[Harness]:
    app = create_app(unit_settings(tmp_path, sqlite_url), backend=backend)
    broker = app.broker
    assert isinstance(broker, RabbitBroker)
    engine = make_engine(sqlite_url)
    harness = Harness(app=app, broker=broker, backend=backend, engine=engine)

    reports = RabbitQueue("test.email-reports", routing_key="notification.email.*")

    @broker.subscriber(reports, EXCHANGE)
    async def collect(report: DeliveryReported, message: RabbitMessage) -> None:
        routing_key = message.raw_message.routing_key or ""
        harness.reports.append((routing_key, report, message.correlation_id))

    async with TestRabbitBroker(broker), TestApp(app):
        yield harness
    await engine.dispose()


async def test_a_job_is_sent_once_recorded_and_reported_delivered(harness: Harness) -> None:
    job = email_job()

    await harness.publish(job, correlation_id="corr-42")

    ((notification_id, message),) = harness.backend.sent
    assert notification_id == job.notification_id
    assert message["Message-ID"] == f"<{job.notification_id}@herald.localhost>"
    ((routing_key, report, correlation_id),) = harness.reports
    assert routing_key == EMAIL_DELIVERED
    assert correlation_id == "corr-42"
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


async def test_a_redelivered_job_is_acknowledged_without_sending_again(harness: Harness) -> None:
    job = email_job()

    await harness.publish(job)
    await harness.publish(job)
    await harness.publish(job)

    assert len(harness.backend.sent) == 1
    assert len(harness.reports) == 1
    metrics = await harness.metrics()
    assert 'herald_emails_total{backend="recording",outcome="delivered"} 1.0' in metrics
    assert 'herald_emails_total{backend="recording",outcome="duplicate"} 2.0' in metrics
    assert 'herald_email_send_duration_seconds_count{backend="recording"} 1.0' in metrics


@pytest.mark.parametrize("backend", [(EmailRejected("smtp 550 5.1.1"),)], indirect=True)
async def test_a_bounce_is_recorded_reported_failed_and_dead_lettered(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    job = email_job()

    await harness.publish(job)
    await harness.publish(job)  # a replay changes nothing

    assert harness.backend.sent == []
    ((routing_key, report, _),) = harness.reports
    assert routing_key == EMAIL_FAILED
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

    await harness.publish(job)

    assert harness.backend.sent == []
    ((routing_key, report, _),) = harness.reports
    assert routing_key == EMAIL_FAILED
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

    await harness.publish(job)

    assert harness.backend.sent == []
    assert harness.reports == []
    entry = await harness.ledger(job)
    assert (entry.status, entry.reason, entry.attempts) == (
        DeliveryStatus.RETRYING,
        "smtp 451 4.3.0",
        1,
    )
    assert "herald.message.retry_scheduled" in caplog.text

    await harness.publish(job)  # what the retry delivers

    assert len(harness.backend.sent) == 1
    ((_, report, _),) = harness.reports
    assert report.outcome is DeliveryOutcome.DELIVERED
    assert (await harness.ledger(job)).attempts == 2


async def test_a_job_being_sent_elsewhere_is_retried_later_not_sent(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    job = email_job()
    await harness.deliveries.claim(
        job, provider="recording", now=utc_now(), lease=timedelta(seconds=45)
    )

    await harness.publish(job)

    assert harness.backend.sent == []
    assert harness.reports == []
    assert "delivery in progress elsewhere" in caplog.text


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

    await harness.publish(job)

    assert harness.backend.sent == []
    assert harness.reports == []  # that worker reports it, not this copy as well
    assert "delivery in progress elsewhere" in caplog.text
    assert not (await harness.ledger(job)).reported


async def test_a_report_that_could_not_be_published_goes_out_with_the_retry(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = email_job()

    async def unreachable(*args: Any, **kwargs: Any) -> None:
        raise TimeoutError  # publish_event's timeout, a nack, an unroutable key

    monkeypatch.setattr("email_sender.handlers.publish_event", unreachable)
    await harness.publish(job)
    entry = await harness.ledger(job)
    assert (entry.status, entry.reported) == (DeliveryStatus.DELIVERED, False)
    monkeypatch.setattr("email_sender.handlers.publish_event", publish_event)

    await harness.publish(job)  # the retry: at once, not after the lease

    assert len(harness.backend.sent) == 1
    ((routing_key, report, _),) = harness.reports
    assert (routing_key, report.outcome) == (EMAIL_DELIVERED, DeliveryOutcome.DELIVERED)
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

    await harness.publish(job)

    assert len(harness.backend.sent) == 1
    assert (await harness.ledger(job)).attempts == 2


async def test_an_outcome_recorded_but_not_reported_is_reported_without_sending(
    harness: Harness,
) -> None:
    job = email_job()
    # As if the worker died after recording the outcome, an hour ago, before reporting it.
    then = utc_now() - timedelta(hours=1)
    await harness.deliveries.claim(job, provider="recording", now=then, lease=timedelta(1))
    await harness.deliveries.finish(
        job.notification_id, status=DeliveryStatus.DELIVERED, reason=None, now=then
    )

    await harness.publish(job)

    assert harness.backend.sent == []
    ((routing_key, report, _),) = harness.reports
    assert (routing_key, report.outcome) == (EMAIL_DELIVERED, DeliveryOutcome.DELIVERED)
    assert (await harness.ledger(job)).reported


async def test_a_report_has_the_same_event_id_however_often_it_is_published(
    harness: Harness,
) -> None:
    job = email_job()
    await harness.publish(job)
    async with harness.engine.begin() as connection:
        await connection.exec_driver_sql("UPDATE email_deliveries SET reported_at = NULL")

    await harness.publish(job)

    first, second = (report for _, report, _ in harness.reports)
    assert first.event_id == second.event_id
    assert len(harness.backend.sent) == 1


async def test_an_unparsable_job_is_dead_lettered_without_its_content(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    body = {"type": "email_requested", "notification_id": str(uuid.uuid4())}
    body["to_address"] = "carol@example.test"

    await harness.broker.publish(body, exchange=EXCHANGE, routing_key=EMAIL_SEND)

    assert harness.backend.sent == []
    assert "reason=unparsable" in caplog.text
    assert "carol@example.test" not in caplog.text


async def test_migrations_match_the_tables(harness: Harness) -> None:
    def differences(connection: Connection) -> list[Any]:
        context = MigrationContext.configure(
            connection, opts={"version_table": "alembic_version_email_sender"}
        )
        return list(compare_metadata(context, metadata))

    async with harness.engine.connect() as connection:
        assert await connection.run_sync(differences) == []
