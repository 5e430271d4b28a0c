"""The verification e-mail: how it is rendered, and the `email_verifications` subscriber wired as
in production, on the in-memory broker and an SQLite ledger."""

from __future__ import annotations

import contextlib
import email
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email import policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from faststream import TestApp
from faststream.rabbit import RabbitQueue, TestRabbitBroker

from email_sender.app import EmailService, build_service
from email_sender.backends import EmailRejected
from email_sender.rendering import UnrenderableEmail
from email_sender.tables import Failure, email_deliveries
from email_sender.verification import SUBJECT, VerificationRenderer
from herald_shared.events import DeliveriesReported, EmailVerificationRequested, utc_now
from herald_shared.ledger import DeliveryLedger, DeliveryStatus, LedgerEntry
from herald_shared.topology import EMAIL_DELIVERED, EMAIL_FAILED, EMAIL_VERIFY, EXCHANGE
from tests.unit.email_sender.support import RecordingBackend, transient, unit_settings

TOKEN = "0123456789abcdef0123456789abcdef.1796349645." + "A" * 43


def request(**overrides: Any) -> EmailVerificationRequested:
    fields: dict[str, Any] = {
        "verification_id": uuid.uuid4(),
        "user_id": uuid.UUID("3c4d5e6f-7a8b-4c3d-8e4f-5a6b7c8d9eaf"),
        "to_address": "bob@example.test",
        "to_name": "Bob",
        "token": TOKEN,
        "expires_at": utc_now() + timedelta(hours=24),
    }
    fields.update(overrides)
    return EmailVerificationRequested(**fields)


def renderer() -> VerificationRenderer:
    return VerificationRenderer(
        sender="Herald <notifications@herald.localhost>",
        message_id_domain="herald.localhost",
        url="https://herald.example.com/verify-email",
    )


def parsed(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=policy.default)
    assert isinstance(message, EmailMessage)
    return message


def test_the_email_carries_the_link_and_no_unsubscribe_header() -> None:
    event = request(expires_at=datetime(2026, 12, 4, 12, 30, tzinfo=UTC))

    rendered = renderer().render(event, now=datetime(2026, 12, 3, 12, 30, tzinfo=UTC))

    message = parsed(rendered.data)
    assert message["Subject"] == SUBJECT
    assert message["To"] == "Bob <bob@example.test>"
    assert message["Message-ID"] == f"<{event.verification_id}@herald.localhost>"
    assert message["List-Unsubscribe"] is None
    assert rendered.recipient == "bob@example.test"
    link = f"https://herald.example.com/verify-email?token={TOKEN}"
    text = message.get_body(("plain",))
    html = message.get_body(("html",))
    assert text is not None
    assert html is not None
    assert link in text.get_content()
    assert "2026-12-04 12:30 UTC" in text.get_content()
    assert f'href="{link}"' in html.get_content()


def test_a_name_that_tries_to_add_headers_is_flattened_and_a_bad_address_refused() -> None:
    rendered = renderer().render(request(to_name="Bob\r\nBcc: eve@example.test"))
    message = parsed(rendered.data)
    assert message["Bcc"] is None
    assert "<html" in rendered.data.decode("ascii", "replace").lower()
    with pytest.raises(UnrenderableEmail, match="invalid recipient address"):
        renderer().render(request(to_address="bob@example.test, eve@example.test"))


@contextlib.asynccontextmanager
async def running(
    tmp_path: Path, sqlite_url: str, backend: RecordingBackend
) -> AsyncIterator[tuple[EmailService, list[DeliveriesReported]]]:
    service = build_service(unit_settings(tmp_path, sqlite_url), backend=backend)
    reports: list[DeliveriesReported] = []

    async def collect(report: DeliveriesReported) -> None:
        reports.append(report)

    for routing_key in (EMAIL_DELIVERED, EMAIL_FAILED):
        queue = RabbitQueue(f"test.{routing_key}", routing_key=routing_key)
        service.broker.subscriber(queue, EXCHANGE)(collect)
    async with TestRabbitBroker(service.broker), TestApp(service.app):
        yield service, reports


async def entry(service: EmailService, event: EmailVerificationRequested) -> LedgerEntry:
    found = await DeliveryLedger(service.engine, email_deliveries).get(event.verification_id)
    assert found is not None
    return found


async def test_a_request_is_sent_once_and_reported_to_nobody(
    tmp_path: Path, sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="email_sender.verification")
    backend = RecordingBackend()
    event = request()
    async with running(tmp_path, sqlite_url, backend) as (service, reports):
        await service.broker.publish(event, exchange=EXCHANGE, routing_key=EMAIL_VERIFY)
        await service.broker.publish(event, exchange=EXCHANGE, routing_key=EMAIL_VERIFY)

        assert backend.sent_ids == [event.verification_id]
        [(_, rendered)] = backend.sent
        text = parsed(rendered.data).get_body(("plain",))
        assert text is not None
        assert f"/verify-email?token={TOKEN}" in text.get_content()
        assert reports == []  # the router's ledger knows nothing of it
        stored = await entry(service, event)
        assert (stored.status, stored.reported) == (DeliveryStatus.DELIVERED, True)
    assert f"verification_id={event.verification_id}" in caplog.text
    assert "bob@example.test" not in caplog.text
    assert TOKEN not in caplog.text


@pytest.mark.parametrize(
    ("refusal", "failure"),
    [
        (EmailRejected("smtp 550 5.1.1", bounce=True), Failure.BOUNCED),
        (EmailRejected("smtp 550 5.1.1", bounce=False), Failure.REJECTED),  # at DATA
    ],
    ids=["recipient", "content"],
)
async def test_a_refused_request_is_recorded_and_not_retried(
    tmp_path: Path, sqlite_url: str, refusal: EmailRejected, failure: Failure
) -> None:
    backend = RecordingBackend(refusal)
    event = request()
    async with running(tmp_path, sqlite_url, backend) as (service, _):
        await service.broker.publish(event, exchange=EXCHANGE, routing_key=EMAIL_VERIFY)

        assert backend.attempted == [event.verification_id]
        assert backend.sent == []
        stored = await entry(service, event)
        assert (stored.status, stored.failure, stored.reason) == (
            DeliveryStatus.FAILED,
            failure,
            "smtp 550 5.1.1",
        )


async def test_a_transient_failure_gives_the_claim_back_for_the_retry(
    tmp_path: Path, sqlite_url: str
) -> None:
    backend = RecordingBackend(transient())
    event = request()
    async with running(tmp_path, sqlite_url, backend) as (service, _):
        # The in-memory broker has no wait queues: the failure reaches the publisher, and
        # the next delivery (what the retry would be) finds the claim free again.
        with contextlib.suppress(Exception):
            await service.broker.publish(event, exchange=EXCHANGE, routing_key=EMAIL_VERIFY)
        assert backend.sent == []
        await service.broker.publish(event, exchange=EXCHANGE, routing_key=EMAIL_VERIFY)

        assert backend.attempted == [event.verification_id, event.verification_id]
        assert backend.sent_ids == [event.verification_id]
        assert (await entry(service, event)).status is DeliveryStatus.DELIVERED


async def test_a_request_whose_link_expired_meanwhile_is_not_sent(
    tmp_path: Path, sqlite_url: str
) -> None:
    backend = RecordingBackend()
    event = request(expires_at=utc_now() - timedelta(seconds=1))
    async with running(tmp_path, sqlite_url, backend) as (service, _):
        await service.broker.publish(event, exchange=EXCHANGE, routing_key=EMAIL_VERIFY)

        assert backend.attempted == []
        stored = await entry(service, event)
        assert (stored.status, stored.failure, stored.reason) == (
            DeliveryStatus.FAILED,
            Failure.INVALID,
            "expired",
        )
