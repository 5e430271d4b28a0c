"""email-sender on the machine's RabbitMQ and PostgreSQL, delivering to a local SMTP server."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aio_pika
import httpx
import pytest
from faststream import TestApp
from faststream.asgi import AsgiFastStream
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.ext.asyncio import AsyncEngine

from email_sender.app import create_app
from email_sender.settings import EmailBackendKind, Settings
from email_sender.tables import email_deliveries
from herald_shared import retry
from herald_shared.broker import RabbitSettings
from herald_shared.database import make_engine
from herald_shared.events import (
    DeliveriesReported,
    DeliveryOutcome,
    DeliveryReported,
    EmailBatchRequested,
    EmailJobsRequested,
    EmailRequested,
)
from herald_shared.ledger import DeliveryLedger, DeliveryStatus, LedgerEntry
from herald_shared.topology import (
    EMAIL_DELIVERED,
    EMAIL_FAILED,
    EMAIL_NOTIFICATIONS,
    EMAIL_SEND,
    EXCHANGE,
)
from tests.fakes.smtp import FakeSmtp
from tests.support.infra import wait_until

DELAYS = (0.2, 0.4, 0.8)
POOL_SIZE = 3
BOB = "bob@example.test"


def email_job(**overrides: Any) -> EmailRequested:
    fields: dict[str, Any] = {
        "notification_id": uuid.uuid4(),
        "message_id": uuid.uuid4(),
        "room_id": uuid.uuid4(),
        "room_name": "general",
        "recipient_id": uuid.uuid4(),
        "to_address": BOB,
        "to_name": "Bob",
        "sender_display_name": "Alice",
        "message_content": "Hello everyone! 👋",
        "sent_at": datetime.now(UTC),
    }
    fields.update(overrides)
    return EmailRequested(**fields)


def email_batch(*addresses: str) -> EmailJobsRequested:
    """One message's jobs, one per address, as the router publishes them."""
    message_id = uuid.uuid4()
    return EmailJobsRequested(
        jobs=[email_job(message_id=message_id, to_address=address) for address in addresses],
    )


def old_email_batch(*addresses: str) -> EmailBatchRequested:
    """One message's jobs as a router of the previous version batched them: still accepted."""
    message_id = uuid.uuid4()
    return EmailBatchRequested(
        message_id=message_id,
        jobs=[email_job(message_id=message_id, to_address=address) for address in addresses],
    )


@dataclass
class Service:
    app: AsgiFastStream
    engine: AsyncEngine
    channel: aio_pika.abc.AbstractChannel
    reports_queue: aio_pika.abc.AbstractQueue
    reports: list[tuple[str, DeliveriesReported]] = field(default_factory=list)

    async def publish(self, job: EmailRequested | EmailBatchRequested | EmailJobsRequested) -> None:
        """As notification-router does: persistent, on the exchange, with the job's routing key."""
        exchange = await self.channel.get_exchange(EXCHANGE.name)
        await exchange.publish(
            aio_pika.Message(
                job.model_dump_json().encode(),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=str(job.event_id),
            ),
            routing_key=EMAIL_SEND,
        )

    async def collect_reports(self) -> list[tuple[str, DeliveriesReported]]:
        while (message := await self.reports_queue.get(no_ack=True, fail=False)) is not None:
            report = DeliveriesReported.model_validate_json(message.body)
            self.reports.append((message.routing_key or "", report))
        return self.reports

    async def reported(self) -> list[tuple[str, DeliveryReported]]:
        """Every single report so far, with the routing key of the event that carried it."""
        return [
            (routing_key, report)
            for routing_key, batch in await self.collect_reports()
            for report in batch.reports
        ]

    async def dead_letters(self) -> list[aio_pika.abc.AbstractIncomingMessage]:
        queue = await self.channel.get_queue(EMAIL_NOTIFICATIONS.dead_letter_queue.name)
        messages = []
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            messages.append(message)
        return messages

    async def ledger(self, job: EmailRequested) -> LedgerEntry | None:
        return await DeliveryLedger(self.engine, email_deliveries).get(job.notification_id)

    async def emails_counted(self, outcome: str) -> float:
        transport = httpx.ASGITransport(app=self.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://service") as client:
            text = (await client.get("/metrics")).text
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            if family.name == "herald_emails"
            for sample in family.samples
            if sample.name == "herald_emails_total" and sample.labels["outcome"] == outcome
        )


@pytest.fixture
async def service(rabbit_url: str, pg_url: str, smtp: FakeSmtp) -> AsyncIterator[Service]:
    settings = Settings(
        database_url=pg_url,
        rabbitmq=RabbitSettings(url=rabbit_url, retry_delays=DELAYS, max_retries=3),
        email_backend=EmailBackendKind.SMTP,
        smtp_host=smtp.host,
        smtp_port=smtp.port,
        smtp_timeout=5,
        smtp_pool_size=POOL_SIZE,
        unsubscribe_secret="integration-unsubscribe-secret-0123456789",
    )
    app = create_app(settings)
    engine = make_engine(pg_url)
    connection = await aio_pika.connect(rabbit_url)
    try:
        async with TestApp(app):  # migrations, broker start, topology: as in production
            channel = await connection.channel()
            reports_queue = await channel.declare_queue("test.email-reports", exclusive=True)
            for routing_key in (EMAIL_DELIVERED, EMAIL_FAILED):
                await reports_queue.bind(EXCHANGE.name, routing_key=routing_key)
            yield Service(app, engine, channel, reports_queue)
    finally:
        await connection.close()
        await engine.dispose()


async def test_a_single_job_is_still_accepted_sent_once_and_reported_delivered(
    service: Service, smtp: FakeSmtp
) -> None:
    job = email_job()

    await service.publish(job)

    ((routing_key, report),) = await wait_until(service.reported)
    assert routing_key == EMAIL_DELIVERED
    assert (report.notification_id, report.outcome) == (
        job.notification_id,
        DeliveryOutcome.DELIVERED,
    )
    (mail,) = smtp.received
    assert mail["To"] == "Bob <bob@example.test>"
    assert mail["Message-ID"] == f"<{job.notification_id}@herald.localhost>"
    assert mail["Subject"] == "New message from Alice in general"
    entry = await service.ledger(job)
    assert entry is not None
    assert (entry.status, entry.attempts, entry.reported) == (DeliveryStatus.DELIVERED, 1, True)


@pytest.mark.parametrize("kind", ["jobs", "batch"])
async def test_a_delivery_arrives_once_per_email_and_each_is_reported_once(
    service: Service, smtp: FakeSmtp, kind: str
) -> None:
    """`EmailJobsRequested` as the router publishes it, and the previous version's
    `EmailBatchRequested`."""
    build = email_batch if kind == "jobs" else old_email_batch
    batch = build(*(f"user{number}@example.test" for number in range(5)))

    await service.publish(batch)

    async def all_reported() -> bool:
        entries = [await service.ledger(job) for job in batch.jobs]
        return all(entry is not None and entry.reported for entry in entries)

    await wait_until(all_reported)
    # Each job reported delivered once; reports go out as sends complete, many jobs per event
    # (and many deliveries' jobs, when the consumer holds several at once).
    reported = await service.reported()
    assert {routing_key for routing_key, _ in reported} == {EMAIL_DELIVERED}
    assert {report.outcome for _, report in reported} == {DeliveryOutcome.DELIVERED}
    assert sorted(report.notification_id for _, report in reported) == sorted(
        job.notification_id for job in batch.jobs
    )
    assert sorted(mail["Message-ID"] for mail in smtp.received) == sorted(
        f"<{job.notification_id}@herald.localhost>" for job in batch.jobs
    )
    for job in batch.jobs:
        entry = await service.ledger(job)
        assert entry is not None
        assert (entry.status, entry.attempts) == (DeliveryStatus.DELIVERED, 1)


async def test_the_same_batch_published_twice_gives_exactly_one_email_each(
    service: Service, smtp: FakeSmtp
) -> None:
    batch = email_batch(BOB, "carol@example.test")

    await service.publish(batch)
    await service.publish(batch)

    async def both_handled() -> bool:
        delivered = await service.emails_counted("delivered")
        return delivered == 2 and await service.emails_counted("duplicate") == 2

    await wait_until(both_handled)
    assert len(smtp.received) == 2
    assert sorted(report.notification_id for _, report in await service.reported()) == sorted(
        job.notification_id for job in batch.jobs
    )


async def test_a_451_is_retried_and_then_delivered(service: Service, smtp: FakeSmtp) -> None:
    smtp.reply(BOB, 451, "4.3.0 try again later", times=1)
    batch = email_batch(BOB)

    await service.publish(batch)

    ((routing_key, report),) = await wait_until(service.reported)
    assert (routing_key, report.outcome) == (EMAIL_DELIVERED, DeliveryOutcome.DELIVERED)
    assert len(smtp.received) == 1
    entry = await service.ledger(batch.jobs[0])
    assert entry is not None
    assert (entry.status, entry.attempts) == (DeliveryStatus.DELIVERED, 2)
    assert await service.emails_counted("retry") == 1
    assert await service.dead_letters() == []


async def test_a_550_is_reported_failed_and_dead_lettered_without_retry(
    service: Service, smtp: FakeSmtp
) -> None:
    smtp.reply(BOB, 550, "5.1.1 <bob@example.test>: Recipient address rejected")
    batch = email_batch(BOB)

    await service.publish(batch)

    (dead,) = await wait_until(service.dead_letters)
    assert dead.headers[retry.REASON_HEADER] == "permanent"
    assert dead.headers[retry.ATTEMPT_HEADER] == 1
    assert BOB not in str(dead.headers)
    ((routing_key, report),) = await service.reported()
    assert (routing_key, report.outcome, report.reason) == (
        EMAIL_FAILED,
        DeliveryOutcome.FAILED,
        "smtp 550 5.1.1",
    )
    assert smtp.received == []
    entry = await service.ledger(batch.jobs[0])
    assert entry is not None
    assert (entry.status, entry.attempts) == (DeliveryStatus.FAILED, 1)


async def test_mixed_outcomes_are_reported_per_outcome_and_only_the_transient_one_is_retried(
    service: Service, smtp: FakeSmtp
) -> None:
    carol, eve, dan = "carol@example.test", "eve@example.test", "dan@example.test"
    smtp.reply(eve, 550, "5.1.1 no such user")
    smtp.reply(dan, 451, "4.3.0 try again later", times=1)
    batch = email_batch(carol, eve, dan)
    delivered, bounced, retried = batch.jobs

    await service.publish(batch)

    async def all_reported() -> bool:
        entries = [await service.ledger(job) for job in batch.jobs]
        return len(await service.reported()) == 3 and all(
            entry is not None and entry.reported for entry in entries
        )

    await wait_until(all_reported)
    reported = [(key, report.notification_id) for key, report in await service.reported()]
    # The first attempt's reports (in either order), then the retry's.
    assert sorted(reported[:2]) == sorted(
        [(EMAIL_DELIVERED, delivered.notification_id), (EMAIL_FAILED, bounced.notification_id)]
    )
    assert reported[2:] == [(EMAIL_DELIVERED, retried.notification_id)]
    [bounce] = [report for key, report in await service.reported() if key == EMAIL_FAILED]
    assert bounce.reason == "smtp 550 5.1.1"
    # The retry sent only the transient one; the bounced one never reached the server.
    assert sorted(str(mail["To"]) for mail in smtp.received) == [f"Bob <{carol}>", f"Bob <{dan}>"]
    for job, status, attempts in [
        (delivered, DeliveryStatus.DELIVERED, 1),
        (bounced, DeliveryStatus.FAILED, 1),
        (retried, DeliveryStatus.DELIVERED, 2),
    ]:
        entry = await service.ledger(job)
        assert entry is not None
        assert (entry.status, entry.attempts) == (status, attempts)
    assert await service.dead_letters() == []  # the retry left nothing to come back
    assert await service.emails_counted("duplicate") == 2  # the retry's no-ops


async def test_many_jobs_share_a_few_smtp_connections(service: Service, smtp: FakeSmtp) -> None:
    batches = [
        email_batch(*(f"user{batch}.{number}@example.test" for number in range(10)))
        for batch in range(4)
    ]

    for batch in batches:
        await service.publish(batch)

    async def all_delivered() -> bool:
        return await service.emails_counted("delivered") == 40

    await wait_until(all_delivered, timeout=30)
    assert len(smtp.received) == 40
    assert 1 <= smtp.connections <= POOL_SIZE  # reused, not one connection per e-mail
    for mail in smtp.received:
        assert mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        assert mail["List-Unsubscribe"].startswith("<http://127.0.0.1:8000/unsubscribe?token=")


async def test_an_authentication_refusal_waits_without_spending_attempts(
    service: Service, smtp: FakeSmtp
) -> None:
    """More refusals (4) than retries allowed (3): a recipient-side failure would be
    dead-lettered; a configuration error only makes the batch wait, and it is delivered once the
    server accepts us again."""
    smtp.reply(BOB, 530, "5.7.0 Authentication required", times=4)
    batch = email_batch(BOB)

    await service.publish(batch)

    ((routing_key, report),) = await wait_until(service.reported, timeout=30)
    assert (routing_key, report.outcome) == (EMAIL_DELIVERED, DeliveryOutcome.DELIVERED)
    assert len(smtp.received) == 1
    assert await service.dead_letters() == []


async def test_a_delivery_out_of_retries_is_dead_lettered_and_reported_failed_in_one_event(
    service: Service, smtp: FakeSmtp
) -> None:
    dan = "dan@example.test"
    smtp.reply(dan, 451, "4.3.0 try again later")  # for ever
    batch = email_batch(BOB, dan)

    await service.publish(batch)

    (dead,) = await wait_until(service.dead_letters, timeout=30)
    assert dead.headers[retry.REASON_HEADER] == "retries-exhausted"

    async def given_up() -> list[tuple[str, DeliveriesReported]]:
        return [(key, b) for key, b in await service.collect_reports() if key == EMAIL_FAILED]

    ((_, failed),) = await wait_until(given_up)
    assert sorted((item.notification_id, item.reason) for item in failed.reports) == sorted(
        (job.notification_id, "retries exhausted") for job in batch.jobs
    )
    # Bob's e-mail went out with the first attempt and was reported then; the router keeps a
    # delivery over a later failure.
    (delivered,) = [b for key, b in service.reports if key == EMAIL_DELIVERED]
    assert [item.notification_id for item in delivered.reports] == [batch.jobs[0].notification_id]
    assert len(smtp.received) == 1
