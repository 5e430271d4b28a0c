"""The SMTP backend against a real SMTP conversation (FakeSmtp), and the error classification."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, cast

import aiosmtplib
import pytest
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from email_sender.backends import EmailRejected, SmtpBackend, SmtpConfigurationError
from email_sender.backends.smtp import classify_smtp_error
from email_sender.channel import EmailChannel, EmailSending
from email_sender.metrics import EmailMetrics
from email_sender.rendering import EmailRenderer
from email_sender.settings import Settings, SmtpConfig, SmtpTls
from email_sender.tables import Failure, email_deliveries
from herald_shared.database import make_engine, run_migrations
from herald_shared.events import (
    MAX_DIGEST_ENTRIES,
    DeliveriesReported,
    DeliveryOutcome,
    EmailBounced,
    EmailRequested,
)
from herald_shared.ledger import DeliveryLedger, DeliveryStatus
from herald_shared.retry import DeferredError, PermanentError, RetryableError
from herald_shared.sending import Sender
from herald_shared.topology import EMAIL_BOUNCED, EMAIL_DELIVERED, EMAIL_FAILED
from tests.fakes.smtp import FakeSmtp, Stage
from tests.support.processes import free_port
from tests.unit.email_sender import support
from tests.unit.email_sender.support import (
    DIRECT,
    DOMAIN,
    GENERAL,
    RANDOM,
    digest_entry,
    digest_job,
    email_job,
    text_and_html,
)

BOB = "bob@example.test"
SENDER = "notifications@herald.localhost"  # EMAIL_FROM's address, the envelope's MAIL FROM


@pytest.fixture
def renderer() -> EmailRenderer:
    return support.renderer()


def backend_for(
    smtp: FakeSmtp,
    *,
    username: str | None = None,
    password: str | None = None,
    clock: Callable[[], float] = time.monotonic,
    **pool: Any,
) -> SmtpBackend:
    return SmtpBackend(
        SmtpConfig(
            host=smtp.host,
            port=smtp.port,
            timeout=5,
            username=username,
            password=SecretStr(password) if password is not None else None,
            **pool,
        ),
        clock=clock,
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


async def test_a_digest_arrives_whole(smtp: FakeSmtp, renderer: EmailRenderer) -> None:
    rooms = [GENERAL, DIRECT, RANDOM]
    entries = [
        digest_entry(rooms[number % 3], number, f"Message {number}:\nline 2 ✓ <b>&")
        for number in range(MAX_DIGEST_ENTRIES)
    ]
    job = digest_job(*entries, omitted=7)

    await backend_for(smtp).send(renderer.render(job), notification_id=job.notification_id)

    (received,) = smtp.received
    assert received.defects == []
    assert received["Subject"] == f"{MAX_DIGEST_ENTRIES + 7} new messages in 3 conversations"
    assert received["Message-ID"] == f"<{job.notification_id}@{DOMAIN}>"
    assert "References" not in received
    # SMTP carries the lines with CRLF ends.
    text, html = (part.replace("\r\n", "\n") for part in text_and_html(received))
    for number in range(MAX_DIGEST_ENTRIES):
        assert f"    Message {number}:\n    line 2 ✓ <b>&\n" in text
        assert f">Message {number}:\nline 2 ✓ &lt;b&gt;&amp;</blockquote>" in html
    assert "and 7 more messages." in text


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


class RecordingPublisher:
    def __init__(self) -> None:
        self.events: list[DeliveriesReported | EmailBounced] = []

    async def publish(self, event: DeliveriesReported | EmailBounced, **_: Any) -> None:
        self.events.append(event)


@asynccontextmanager
async def smtp_sender(
    smtp: FakeSmtp, renderer: EmailRenderer, sqlite_url: str, publisher: RecordingPublisher
) -> AsyncIterator[Sender[EmailRequested]]:
    """The e-mail sender workflow on a migrated ledger, sending to `smtp` and publishing what
    follows to `publisher`."""
    engine = make_engine(sqlite_url)
    await run_migrations(engine, script_location="email_sender:migrations", service_name="es")
    sender = Sender(
        spec=EmailChannel(EmailSending(backend_for(smtp), renderer, timeout=5), max_in_flight=2),
        ledger=DeliveryLedger(engine, email_deliveries),
        publishers=dict.fromkeys(
            (EMAIL_DELIVERED, EMAIL_FAILED, EMAIL_BOUNCED), cast(Any, publisher)
        ),
        publish_timeout=5,
        metrics=EmailMetrics(CollectorRegistry()),
    )
    try:
        yield sender
    finally:
        await sender.aclose()
        await engine.dispose()


async def test_550_records_a_bounce_and_reports_it_failed_next_to_a_delivered_email(
    smtp: FakeSmtp, renderer: EmailRenderer, sqlite_url: str
) -> None:
    smtp.reply(BOB, 550, "5.1.1 no such user")
    publisher = RecordingPublisher()
    bounced = email_job()
    accepted = email_job(notification_id=uuid.uuid4(), to_address="carol@example.test")
    async with smtp_sender(smtp, renderer, sqlite_url, publisher) as sender:
        with pytest.raises(PermanentError, match=r"smtp 550 5\.1\.1"):
            await sender.deliver([bounced, accepted])
        entry = await sender.ledger.get(bounced.notification_id)
        other = await sender.ledger.get(accepted.notification_id)

    reports = {
        event.outcome: event.reports
        for event in publisher.events
        if isinstance(event, DeliveriesReported)
    }
    [bounce] = [event for event in publisher.events if isinstance(event, EmailBounced)]
    assert bounce.notification_id == bounced.notification_id
    [failed] = reports[DeliveryOutcome.FAILED]
    assert (failed.notification_id, failed.reason) == (bounced.notification_id, "smtp 550 5.1.1")
    assert entry is not None
    assert (entry.status, entry.failure, entry.reason, entry.attempts) == (
        DeliveryStatus.FAILED,
        Failure.BOUNCED,
        "smtp 550 5.1.1",
        1,
    )
    [delivered] = reports[DeliveryOutcome.DELIVERED]
    assert delivered.notification_id == accepted.notification_id
    assert other is not None
    assert other.status is DeliveryStatus.DELIVERED
    assert [mail["To"] for mail in smtp.received] == ["Bob <carol@example.test>"]


# How a server refuses one e-mail, at each stage of the conversation, and what follows. Only a
# refused recipient (RCPT TO) is that address's bounce (`email.bounced`, counted against it by
# message-service); a refused greeting or MAIL FROM is about our host or our sender (EMAIL_FROM)
# and would refuse every e-mail alike: misconfigured, waiting for the fix; a refused DATA (the
# content) fails this e-mail alone.
REFUSALS = {
    "greeting": (554, "5.7.1 client host blocked"),
    "mail": (553, "5.7.1 Sender address rejected: not owned by user"),
    "rcpt": (550, "5.1.1 no such user"),
    "data": (554, "5.7.1 message looks like spam"),
}


@pytest.mark.parametrize("stage", list(REFUSALS))
async def test_only_a_refused_recipient_publishes_a_bounce(
    smtp: FakeSmtp,
    renderer: EmailRenderer,
    sqlite_url: str,
    stage: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    code, text = REFUSALS[stage]
    if stage == "greeting":
        smtp.refuse_greeting(code, text)
    elif stage == "mail":
        smtp.reply(SENDER, code, text, stage="mail")
    else:
        smtp.reply(BOB, code, text, stage=cast(Stage, stage))
    publisher = RecordingPublisher()
    job = email_job()
    async with smtp_sender(smtp, renderer, sqlite_url, publisher) as sender:
        with pytest.raises((DeferredError, PermanentError)) as raised:
            await sender.deliver([job])
        entry = await sender.ledger.get(job.notification_id)

    assert smtp.received == []
    assert entry is not None
    bounces = [event for event in publisher.events if isinstance(event, EmailBounced)]
    failed = [
        report
        for event in publisher.events
        if isinstance(event, DeliveriesReported) and event.outcome is DeliveryOutcome.FAILED
        for report in event.reports
    ]
    enhanced = text.split()[0]
    if stage in ("greeting", "mail"):
        # Our configuration: nothing final, nothing published, the job waits for the fix
        # without spending an attempt; the operator is told at ERROR.
        reason = f"smtp {code} {enhanced} ({'greeting' if stage == 'greeting' else 'sender'})"
        assert isinstance(raised.value, DeferredError)
        assert raised.value.reason == f"{reason} (provider configuration)"
        assert entry.status is not DeliveryStatus.FAILED
        assert (bounces, failed) == ([], [])
        assert f"email.misconfigured notification_id={job.notification_id}" in caplog.text
    else:
        reason = f"smtp {code} {enhanced}"
        assert isinstance(raised.value, PermanentError)
        assert entry.status is DeliveryStatus.FAILED
        assert entry.reason == reason
        assert [report.reason for report in failed] == [reason]
        if stage == "rcpt":
            assert entry.failure == Failure.BOUNCED
            [bounce] = bounces
            assert (bounce.notification_id, bounce.reason) == (job.notification_id, reason)
        else:  # the content refused: failed for good, the address not counted against
            assert entry.failure == Failure.REJECTED
            assert bounces == []
    assert BOB not in caplog.text


async def test_a_refused_greeting_is_our_configuration_and_the_next_session_goes_through(
    smtp: FakeSmtp, renderer: EmailRenderer, caplog: pytest.LogCaptureFixture
) -> None:
    smtp.refuse_greeting(554, "5.7.1 Client host [127.0.0.1] blocked using a blocklist", times=1)
    job = email_job()
    backend = backend_for(smtp)

    with pytest.raises(SmtpConfigurationError) as raised:
        await backend.send(renderer.render(job), notification_id=job.notification_id)

    assert raised.value.reason == "smtp 554 5.7.1 (greeting)"
    assert raised.value.retry_after == 60.0
    [error] = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert "check SMTP_HOST" in error.getMessage()
    assert "blocklist" not in caplog.text
    await backend.send(renderer.render(job), notification_id=job.notification_id)
    assert len(smtp.received) == 1


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

    assert raised.value.reason == "smtp 451 connection lost during DATA"
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


async def test_wrong_credentials_are_deferred_as_a_configuration_error_logged_without_secrets(
    renderer: EmailRenderer, caplog: pytest.LogCaptureFixture
) -> None:
    job = email_job()
    with FakeSmtp(username="herald", password="right-password") as smtp:
        backend = backend_for(smtp, username="herald", password="wrong-password")
        with pytest.raises(DeferredError) as raised:
            await backend.send(renderer.render(job), notification_id=job.notification_id)

        accepted = backend_for(smtp, username="herald", password="right-password")
        await accepted.send(renderer.render(job), notification_id=job.notification_id)

    # Deferred, not retryable: the job waits for a fixed configuration without spending an
    # attempt (it is not the recipient's fault), at least a minute at a time.
    assert isinstance(raised.value, SmtpConfigurationError)
    assert not isinstance(raised.value, RetryableError | PermanentError)
    assert raised.value.retry_after == 60.0
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
        (aiosmtplib.SMTPSenderRefused(451, "4.3.0 later", "x@y"), RetryableError, "smtp 451 4.3.0"),
        (aiosmtplib.SMTPHeloError(421, "4.3.2 busy"), RetryableError, "smtp 421 4.3.2"),
        (_refused(550, "5.1.1 <bob@example.test> unknown"), EmailRejected, "smtp 550 5.1.1"),
        (_refused(553, "5.1.3 bad address"), EmailRejected, "smtp 553 5.1.3"),
        (aiosmtplib.SMTPDataError(554, "5.7.1 spam"), EmailRejected, "smtp 554 5.7.1"),
        # A 5xx about our host, our session or our sender, not the recipient: configuration.
        (
            aiosmtplib.SMTPConnectResponseError(554, "5.7.1 client host blocked"),
            SmtpConfigurationError,
            "smtp 554 5.7.1 (greeting)",
        ),
        (
            aiosmtplib.SMTPHeloError(550, "5.7.1 bad HELO"),
            SmtpConfigurationError,
            "smtp 550 5.7.1 (helo)",
        ),
        (
            aiosmtplib.SMTPSenderRefused(553, "5.7.1 Sender address rejected", "x@y"),
            SmtpConfigurationError,
            "smtp 553 5.7.1 (sender)",
        ),
        (
            aiosmtplib.SMTPSenderRefused(550, "no", "x@y"),
            SmtpConfigurationError,
            "smtp 550 (sender)",
        ),
        (
            aiosmtplib.SMTPResponseException(554, "5.7.3 TLS not available"),
            SmtpConfigurationError,
            "smtp 554 5.7.3 (session)",
        ),
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


@pytest.mark.parametrize(
    ("error", "bounce"),
    [
        (_refused(550, "5.1.1 unknown"), True),
        (aiosmtplib.SMTPRecipientRefused(554, "5.7.1 relay denied", BOB), True),
        (aiosmtplib.SMTPDataError(554, "5.7.1 spam"), False),
        (aiosmtplib.SMTPDataError(552, "5.3.4 too big"), False),
    ],
)
def test_only_a_refused_recipient_is_a_bounce(error: BaseException, bounce: bool) -> None:
    classified = classify_smtp_error(error)
    assert isinstance(classified, EmailRejected)
    assert classified.bounce is bounce


def test_default_port_follows_the_tls_mode() -> None:
    assert Settings(smtp_tls=SmtpTls.NONE).smtp.port == 25
    assert Settings(smtp_tls=SmtpTls.STARTTLS).smtp.port == 587
    assert Settings(smtp_tls=SmtpTls.TLS).smtp.port == 465
    assert Settings(smtp_tls=SmtpTls.TLS, smtp_port=2465).smtp.port == 2465


# Every scripted reply of the provider table, through a real SMTP conversation: what the backend
# raises and the reason it records (codes only, never the server's text).
REPLIES = [
    # (stage, code, server text, outcome, reason)
    ("rcpt", 421, "4.7.0 too busy, closing", RetryableError, "smtp 421 4.7.0"),
    ("rcpt", 450, "4.2.1 mailbox busy", RetryableError, "smtp 450 4.2.1"),
    ("rcpt", 451, "4.3.0 local error", RetryableError, "smtp 451 4.3.0"),
    ("rcpt", 452, "4.5.3 too many recipients", RetryableError, "smtp 452 4.5.3"),
    ("data", 421, "4.4.2 timeout", RetryableError, "smtp 421 4.4.2"),
    ("data", 450, "4.7.1 greylisted", RetryableError, "smtp 450 4.7.1"),
    ("data", 451, "4.3.0 try later", RetryableError, "smtp 451 4.3.0"),
    ("data", 452, "4.3.1 insufficient storage", RetryableError, "smtp 452 4.3.1"),
    ("rcpt", 550, "5.1.1 no such user", EmailRejected, "smtp 550 5.1.1"),
    ("rcpt", 553, "5.1.3 bad address syntax", EmailRejected, "smtp 553 5.1.3"),
    ("rcpt", 554, "5.7.1 relay denied", EmailRejected, "smtp 554 5.7.1"),
    ("data", 550, "5.7.1 policy", EmailRejected, "smtp 550 5.7.1"),
    ("data", 552, "5.3.4 too big", EmailRejected, "smtp 552 5.3.4"),
    ("data", 554, "5.7.1 spam", EmailRejected, "smtp 554 5.7.1"),
    (
        "rcpt",
        530,
        "5.7.0 authentication required",
        SmtpConfigurationError,
        "smtp 530 5.7.0 (authentication)",
    ),
    (
        "data",
        535,
        "5.7.8 bad credentials",
        SmtpConfigurationError,
        "smtp 535 5.7.8 (authentication)",
    ),
    ("mail", 451, "4.3.0 try later", RetryableError, "smtp 451 4.3.0"),
    (
        "mail",
        553,
        "5.7.1 Sender address rejected",
        SmtpConfigurationError,
        "smtp 553 5.7.1 (sender)",
    ),
    (
        "mail",
        550,
        "5.7.1 not allowed to send as",
        SmtpConfigurationError,
        "smtp 550 5.7.1 (sender)",
    ),
    (
        "mail",
        530,
        "5.7.0 authentication required",
        SmtpConfigurationError,
        "smtp 530 5.7.0 (authentication)",
    ),
]


@pytest.mark.parametrize(
    ("stage", "code", "text", "outcome", "reason"),
    REPLIES,
    ids=[f"{stage}-{code}" for stage, code, *_ in REPLIES],
)
async def test_each_scripted_reply_has_its_outcome(
    smtp: FakeSmtp,
    renderer: EmailRenderer,
    stage: Stage,
    code: int,
    text: str,
    outcome: type[Exception],
    reason: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # MAIL FROM is answered for the sender's address, RCPT and DATA for the recipient's.
    smtp.reply(SENDER if stage == "mail" else BOB, code, f"{text} <{BOB}>", stage=stage, times=1)
    job = email_job()
    backend = backend_for(smtp)

    with pytest.raises(outcome) as raised:
        await backend.send(renderer.render(job), notification_id=job.notification_id)

    error = raised.value
    assert isinstance(error, RetryableError | EmailRejected | DeferredError)
    assert error.reason == reason
    if isinstance(error, EmailRejected):  # only a refused recipient counts against it
        assert error.bounce is (stage == "rcpt")
    assert smtp.received == []
    assert BOB not in caplog.text
    # Only a configuration error is logged loudly (the operator has to act).
    assert any(r.levelno == logging.ERROR for r in caplog.records) is (
        outcome is SmtpConfigurationError
    )
    # The script was used once: the next attempt goes through.
    await backend.send(renderer.render(job), notification_id=job.notification_id)
    assert len(smtp.received) == 1
