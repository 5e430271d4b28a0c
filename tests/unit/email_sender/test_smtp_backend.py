"""The SMTP backend against a real SMTP conversation (FakeSmtp), and the error classification."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

import aiosmtplib
import pytest
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from email_sender.backends import EmailRejected, SmtpBackend, SmtpConfigurationError
from email_sender.backends.smtp import classify_smtp_error
from email_sender.delivery import EmailDeliveries
from email_sender.metrics import EmailMetrics
from email_sender.rendering import EmailRenderer
from email_sender.settings import Settings, SmtpConfig, SmtpTls
from email_sender.tables import Failure
from herald_shared.database import make_engine, run_migrations
from herald_shared.events import DeliveryOutcome
from herald_shared.ledger import DeliveryStatus
from herald_shared.retry import PermanentError, RetryableError
from tests.fakes.smtp import FakeSmtp, Stage
from tests.support.processes import free_port
from tests.unit.email_sender.support import DOMAIN, SENDER, email_job

BOB = "bob@example.test"


@pytest.fixture
def renderer() -> EmailRenderer:
    return EmailRenderer(sender=SENDER, message_id_domain=DOMAIN)


def backend_for(
    smtp: FakeSmtp, *, username: str | None = None, password: str | None = None
) -> SmtpBackend:
    return SmtpBackend(
        SmtpConfig(
            host=smtp.host,
            port=smtp.port,
            timeout=5,
            username=username,
            password=SecretStr(password) if password is not None else None,
        )
    )


async def test_delivered(smtp: FakeSmtp, renderer: EmailRenderer) -> None:
    job = email_job()

    await backend_for(smtp).send(renderer.render(job), notification_id=job.notification_id)

    (received,) = smtp.received
    assert smtp.envelopes == [("notifications@herald.localhost", [BOB])]
    assert received["To"] == "Bob <bob@example.test>"
    assert received["Message-ID"] == f"<{job.notification_id}@{DOMAIN}>"
    assert received["Subject"] == "New message from Alice in general"
    body = received.get_body(preferencelist=("plain",))
    assert body is not None
    assert "Hello everyone!" in body.get_content()


async def test_451_is_retryable_and_the_next_attempt_is_accepted(
    smtp: FakeSmtp, renderer: EmailRenderer
) -> None:
    smtp.reply(BOB, 451, "4.3.0 try again later", times=1)
    job = email_job()
    backend = backend_for(smtp)

    with pytest.raises(RetryableError) as raised:
        await backend.send(renderer.render(job), notification_id=job.notification_id)
    assert raised.value.reason == "smtp 451 4.3.0"
    assert smtp.received == []

    await backend.send(renderer.render(job), notification_id=job.notification_id)
    assert len(smtp.received) == 1


@pytest.mark.parametrize("stage", ["rcpt", "data"])
async def test_550_is_permanent_without_the_servers_text(
    smtp: FakeSmtp, renderer: EmailRenderer, stage: Stage
) -> None:
    smtp.reply(BOB, 550, f"5.1.1 <{BOB}>: Recipient address rejected", stage=stage)
    job = email_job()

    with pytest.raises(EmailRejected) as raised:
        await backend_for(smtp).send(renderer.render(job), notification_id=job.notification_id)

    assert isinstance(raised.value, PermanentError)
    assert raised.value.reason == "smtp 550 5.1.1"
    assert raised.value.__suppress_context__


async def test_550_records_a_bounce_and_reports_it_failed(
    smtp: FakeSmtp, renderer: EmailRenderer, sqlite_url: str
) -> None:
    smtp.reply(BOB, 550, "5.1.1 no such user")
    engine = make_engine(sqlite_url)
    await run_migrations(engine, script_location="email_sender:migrations", service_name="es")
    deliveries = EmailDeliveries(
        engine=engine,
        backend=backend_for(smtp),
        renderer=renderer,
        metrics=EmailMetrics(CollectorRegistry()),
        lease=timedelta(seconds=30),
    )
    job = email_job()
    try:
        outcome = await deliveries.deliver(job, claimed_at=deliveries.clock())
        entry = await deliveries.ledger.get(job.notification_id)
    finally:
        await engine.dispose()

    assert outcome.report is not None
    assert outcome.report.outcome is DeliveryOutcome.FAILED
    assert outcome.report.reason == "smtp 550 5.1.1"
    assert outcome.report.notification_id == job.notification_id
    assert isinstance(outcome.error, PermanentError)
    assert entry is not None
    assert (entry.status, entry.failure, entry.reason, entry.attempts) == (
        DeliveryStatus.FAILED,
        Failure.BOUNCED,
        "smtp 550 5.1.1",
        1,
    )


async def test_connection_refused_is_retryable(renderer: EmailRenderer) -> None:
    job = email_job()
    backend = SmtpBackend(SmtpConfig(host="127.0.0.1", port=free_port(), timeout=5))

    with pytest.raises(RetryableError) as raised:
        await backend.send(renderer.render(job), notification_id=job.notification_id)

    assert raised.value.reason == "smtp connection failed (ConnectionRefusedError)"


async def test_connection_dropped_during_data_is_retryable(
    smtp: FakeSmtp, renderer: EmailRenderer
) -> None:
    smtp.drop(BOB, times=1)
    job = email_job()

    with pytest.raises(RetryableError) as raised:
        await backend_for(smtp).send(renderer.render(job), notification_id=job.notification_id)

    assert raised.value.reason == "smtp connection lost"
    assert smtp.received == []


async def test_a_server_that_never_answers_times_out_as_retryable(
    renderer: EmailRenderer,
) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(10)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    job = email_job()
    try:
        with pytest.raises(RetryableError) as raised:
            await SmtpBackend(SmtpConfig(host="127.0.0.1", port=port, timeout=0.3)).send(
                renderer.render(job), notification_id=job.notification_id
            )
    finally:
        server.close()
    assert raised.value.reason == "smtp timeout"


async def test_wrong_credentials_are_a_retryable_configuration_error_logged_without_secrets(
    renderer: EmailRenderer, caplog: pytest.LogCaptureFixture
) -> None:
    job = email_job()
    with FakeSmtp(username="herald", password="right-password") as smtp:
        backend = backend_for(smtp, username="herald", password="wrong-password")
        with pytest.raises(RetryableError) as raised:
            await backend.send(renderer.render(job), notification_id=job.notification_id)

        accepted = backend_for(smtp, username="herald", password="right-password")
        await accepted.send(renderer.render(job), notification_id=job.notification_id)

    assert isinstance(raised.value, SmtpConfigurationError)
    assert raised.value.reason.startswith("smtp 535")
    errors = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert len(errors) == 1
    assert str(job.notification_id) in errors[0].getMessage()
    assert "wrong-password" not in caplog.text
    assert "right-password" not in caplog.text
    assert BOB not in caplog.text
    assert len(smtp.received) == 1


def _refused(code: int, text: str = "") -> aiosmtplib.SMTPRecipientsRefused:
    return aiosmtplib.SMTPRecipientsRefused([aiosmtplib.SMTPRecipientRefused(code, text, BOB)])


@pytest.mark.parametrize(
    ("error", "kind", "reason"),
    [
        (_refused(450, "4.2.1 mailbox busy"), RetryableError, "smtp 450 4.2.1"),
        (_refused(451), RetryableError, "smtp 451"),
        (_refused(452, "4.5.3 too many recipients"), RetryableError, "smtp 452 4.5.3"),
        (aiosmtplib.SMTPConnectResponseError(421, "too busy"), RetryableError, "smtp 421"),
        (aiosmtplib.SMTPDataError(421, "4.4.2 bye"), RetryableError, "smtp 421 4.4.2"),
        (_refused(550, "5.1.1 <bob@example.test> unknown"), EmailRejected, "smtp 550 5.1.1"),
        (_refused(553, "5.1.3 bad address"), EmailRejected, "smtp 553 5.1.3"),
        (aiosmtplib.SMTPDataError(554, "5.7.1 spam"), EmailRejected, "smtp 554 5.7.1"),
        (aiosmtplib.SMTPSenderRefused(550, "no", "x@y"), EmailRejected, "smtp 550"),
        (
            aiosmtplib.SMTPAuthenticationError(535, "5.7.8 bad credentials"),
            SmtpConfigurationError,
            "smtp 535 5.7.8 (authentication)",
        ),
        (
            aiosmtplib.SMTPSenderRefused(530, "5.7.0 authentication required", "x@y"),
            SmtpConfigurationError,
            "smtp 530 5.7.0 (authentication)",
        ),
        (
            aiosmtplib.SMTPNotSupported("no AUTH"),
            SmtpConfigurationError,
            "smtp extension not supported by the server",
        ),
        (aiosmtplib.SMTPServerDisconnected("gone"), RetryableError, "smtp connection lost"),
        (aiosmtplib.SMTPReadTimeoutError("slow"), RetryableError, "smtp timeout"),
        (aiosmtplib.SMTPConnectTimeoutError("slow"), RetryableError, "smtp timeout"),
        (TimeoutError(), RetryableError, "smtp timeout"),
        (
            ConnectionResetError(),
            RetryableError,
            "smtp connection failed (ConnectionResetError)",
        ),
        (
            aiosmtplib.SMTPConnectError("refused"),
            RetryableError,
            "smtp connection failed (SMTPConnectError)",
        ),
        (aiosmtplib.SMTPException("odd"), RetryableError, "smtp error (SMTPException)"),
    ],
)
def test_classification(error: BaseException, kind: type[Exception], reason: str) -> None:
    classified = classify_smtp_error(error)
    assert type(classified) is kind
    assert classified.reason == reason


def test_default_port_follows_the_tls_mode() -> None:
    assert Settings(smtp_tls=SmtpTls.NONE).smtp.port == 25
    assert Settings(smtp_tls=SmtpTls.STARTTLS).smtp.port == 587
    assert Settings(smtp_tls=SmtpTls.TLS).smtp.port == 465
    assert Settings(smtp_tls=SmtpTls.TLS, smtp_port=2465).smtp.port == 2465
