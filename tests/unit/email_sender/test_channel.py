"""What makes the shared sender workflow an e-mail sender: each backend outcome classified into
an answer (the SMTP table in docs/providers.md), and what the workflow does with it."""

from __future__ import annotations

import uuid
from email import policy
from email.parser import BytesParser

import pytest

from email_sender.backends import EmailRejected, SmtpConfigurationError
from email_sender.channel import DEADLINE_MARGIN, EmailChannel, EmailSending
from email_sender.metrics import EmailOutcome
from email_sender.tables import Failure
from herald_shared.events import DeliveryOutcome, EmailBounced, address_digest
from herald_shared.ledger import DeliveryStatus
from herald_shared.retry import DeferredError, PermanentError, RetryableError
from herald_shared.sending import Verdict, outcome_of_answer
from tests.unit.email_sender import support
from tests.unit.email_sender.support import RecordingBackend, email_job


def sending(backend: RecordingBackend) -> EmailSending:
    return EmailSending(backend, support.renderer(), timeout=30.0)


@pytest.mark.parametrize(
    ("failure", "verdict", "code", "label", "status", "error", "retry_after"),
    [
        (
            None,
            Verdict.ACCEPTED,
            None,
            EmailOutcome.DELIVERED,
            DeliveryStatus.DELIVERED,
            None,
            None,
        ),
        (
            EmailRejected("smtp 550 5.1.1", bounce=True),
            Verdict.REJECTED,
            Failure.BOUNCED,
            EmailOutcome.BOUNCED,
            DeliveryStatus.FAILED,
            PermanentError,
            None,
        ),
        (
            # Refused at DATA (its content): failed for good, but not the address's bounce.
            EmailRejected("smtp 554 5.7.1", bounce=False),
            Verdict.REJECTED,
            Failure.REJECTED,
            EmailOutcome.REJECTED,
            DeliveryStatus.FAILED,
            PermanentError,
            None,
        ),
        (
            RetryableError("smtp 451 4.3.0", retry_after=7.0),
            Verdict.TRANSIENT,
            None,
            EmailOutcome.RETRY,
            None,
            RetryableError,
            7.0,
        ),
        (
            DeferredError("smtp connections busy", retry_after=2.0),
            Verdict.DEFERRED,
            None,
            EmailOutcome.DEFERRED,
            None,
            DeferredError,
            2.0,
        ),
        (
            SmtpConfigurationError("smtp 535 5.7.8"),
            Verdict.MISCONFIGURED,
            None,
            EmailOutcome.MISCONFIGURED,
            None,
            DeferredError,  # waits for the fix without spending an attempt
            None,  # compared with the error's own below
        ),
    ],
    ids=["accepted", "bounced", "rejected", "transient", "deferred", "misconfigured"],
)
async def test_each_backend_outcome_is_an_answer_and_an_outcome(
    failure: Exception | None,
    verdict: Verdict,
    code: Failure | None,
    label: EmailOutcome,
    status: DeliveryStatus | None,
    error: type[Exception] | None,
    retry_after: float | None,
) -> None:
    backend = RecordingBackend(*((failure,) if failure is not None else ()))
    job = email_job()

    answer = await sending(backend).send(job)

    assert backend.attempted == [job.notification_id]
    assert answer.verdict is verdict
    assert answer.failure == code
    if isinstance(failure, SmtpConfigurationError):
        retry_after = failure.retry_after
    assert answer.retry_after == retry_after
    if isinstance(failure, RetryableError | PermanentError | DeferredError):
        assert answer.reason == failure.reason
    decided = outcome_of_answer(EmailChannel(sending(backend), max_in_flight=1), job, answer)
    assert decided.label == label
    assert decided.status is status
    assert type(decided.error) is error if error else decided.error is None
    if code is Failure.BOUNCED:
        # A bounce tells message-service, which counts them against the address.
        (bounce,) = decided.events
        assert isinstance(bounce, EmailBounced)
        assert (bounce.user_id, bounce.notification_id) == (job.recipient_id, job.notification_id)
        assert bounce.address_digest == address_digest(job.to_address)
    else:
        assert decided.events == ()
    if status is DeliveryStatus.FAILED:
        assert isinstance(failure, EmailRejected)
        assert decided.report is not None
        assert (decided.report.outcome, decided.report.reason) == (
            DeliveryOutcome.FAILED,
            failure.reason,
        )


def test_only_a_bounced_failure_publishes_a_bounce_even_when_published_again() -> None:
    """A row already final is published again from its ledger failure code alone (after a
    crash before its events went out): only `bounced` carries an `EmailBounced`."""
    channel = EmailChannel(sending(RecordingBackend()), max_in_flight=1)
    job = email_job()

    assert channel.events_for_failure(job, Failure.REJECTED, "smtp 554 5.7.1") == ()
    assert channel.events_for_failure(job, Failure.INVALID, "invalid recipient address") == ()
    (bounce,) = channel.events_for_failure(job, Failure.BOUNCED, "smtp 550 5.1.1")
    assert isinstance(bounce, EmailBounced)


async def test_a_job_that_cannot_become_an_email_is_invalid_without_reaching_the_backend() -> None:
    backend = RecordingBackend()
    job = email_job(to_address="bob@example.test\r\nBcc: eve@evil.test")

    answer = await sending(backend).send(job)

    assert backend.attempted == []
    assert (answer.verdict, answer.failure, answer.reason) == (
        Verdict.REJECTED,
        Failure.INVALID,
        "invalid recipient address",
    )
    decided = outcome_of_answer(EmailChannel(sending(backend), max_in_flight=1), job, answer)
    assert decided.label == EmailOutcome.INVALID
    assert isinstance(decided.error, PermanentError)


async def test_the_rendered_email_goes_to_the_backend_under_the_notifications_id() -> None:
    backend = RecordingBackend()
    job = email_job(notification_id=uuid.uuid4())

    await sending(backend).send(job)

    ((notification_id, rendered),) = backend.sent
    assert notification_id == job.notification_id
    message = BytesParser(policy=policy.default).parsebytes(rendered.data)
    assert message["Message-ID"] == f"<{job.notification_id}@{support.DOMAIN}>"
    assert (rendered.recipient, rendered.message_id) == (job.to_address, message["Message-ID"])


def test_one_gate_with_the_backends_connections_serves_every_job() -> None:
    backend = RecordingBackend()
    channel = EmailChannel(sending(backend), max_in_flight=3)

    gate = channel.gate_for(email_job())

    assert gate is channel.gate_for(email_job(notification_id=uuid.uuid4()))
    assert (gate.name, gate.limiter.limit, gate.breaker) == ("recording", 3, None)
    # The backend's own timeout bounds a send; the workflow's deadline is only the backstop.
    assert gate.provider.deadline == 30.0 + DEADLINE_MARGIN
    assert channel.gone_failures() == frozenset()
