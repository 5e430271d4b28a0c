"""The decisions, without I/O: a push provider's answer or the ledger's state → what is recorded,
what is published and how the job ends (docs/providers.md), as the shared sender workflow takes
them (`herald_shared.sending.outcome_of_*`) with push-sender's channel and answer mapping."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from herald_shared.events import (
    Channel,
    DeliveryOutcome,
    DeliveryReported,
    DeviceInvalidated,
    Event,
)
from herald_shared.ledger import AlreadyFinal, Busy, DeliveryStatus
from herald_shared.retry import DeferredError, PermanentError, RetryableError
from herald_shared.sending import (
    Lease,
    Outcome,
    outcome_of_answer,
    outcome_of_claim,
    outcome_unsupported,
)
from push_sender.channel import PushChannel
from push_sender.metrics import PushOutcome
from push_sender.providers import ProviderAnswer, Verdict
from push_sender.registry import ProviderRegistry, answer_of
from push_sender.tables import Failure
from tests.unit.push_sender.support import push_job

NOW = datetime(2026, 3, 14, 9, 26, 53, tzinfo=UTC)
CHANNEL = PushChannel(ProviderRegistry({}))  # deciding needs no provider


def contents(events: tuple[Event, ...]) -> list[dict[str, Any]]:
    """The events without their creation time (ids included)."""
    return [event.model_dump(exclude={"occurred_at"}) for event in events]


def published(outcome: Outcome) -> tuple[Event, ...]:
    """What the outcome publishes: its other events, then its report."""
    return (*outcome.events, *((outcome.report,) if outcome.report is not None else ()))


def decide(answer: ProviderAnswer, **options: Any) -> Outcome:
    return outcome_of_answer(CHANNEL, push_job(), answer_of(answer), **options)


@pytest.mark.parametrize(
    ("answer", "outcome", "status", "failure", "invalidates", "report", "error"),
    [
        (
            ProviderAnswer.accepted(),
            PushOutcome.DELIVERED,
            DeliveryStatus.DELIVERED,
            None,
            False,
            DeliveryOutcome.DELIVERED,
            None,
        ),
        (
            ProviderAnswer(Verdict.TOKEN_INVALID, "fcm 404 UNREGISTERED"),
            PushOutcome.TOKEN_INVALID,
            DeliveryStatus.FAILED,
            Failure.TOKEN_INVALID,
            True,
            DeliveryOutcome.FAILED,
            None,  # acknowledged: nothing to retry, nothing to park
        ),
        (
            ProviderAnswer(Verdict.REJECTED, "fcm 400 INVALID_ARGUMENT"),
            PushOutcome.REJECTED,
            DeliveryStatus.FAILED,
            Failure.REJECTED,
            False,
            DeliveryOutcome.FAILED,
            PermanentError,
        ),
        (
            ProviderAnswer.transient("fcm 503 UNAVAILABLE"),
            PushOutcome.RETRY,
            None,
            None,
            False,
            None,
            RetryableError,
        ),
        (
            ProviderAnswer(Verdict.MISCONFIGURED, "fcm 403 PERMISSION_DENIED"),
            PushOutcome.MISCONFIGURED,
            None,
            None,
            False,
            None,
            DeferredError,  # our configuration: waits without spending an attempt
        ),
    ],
)
def test_answers(
    answer: ProviderAnswer,
    outcome: PushOutcome,
    status: DeliveryStatus | None,
    failure: Failure | None,
    invalidates: bool,
    report: DeliveryOutcome | None,
    error: type[Exception] | None,
) -> None:
    job = push_job()

    decided = outcome_of_answer(CHANNEL, job, answer_of(answer))

    assert decided.label == outcome
    assert decided.lease is Lease.SEND  # finished (final) or released (transient) by this worker
    assert (decided.status, decided.failure) == (status, failure)
    invalidations = [event for event in decided.events if isinstance(event, DeviceInvalidated)]
    assert bool(invalidations) is invalidates
    assert (decided.report.outcome if decided.report else None) == report
    assert type(decided.error) is error if error else decided.error is None
    if decided.report is not None:
        assert decided.report.notification_id == job.notification_id
        assert decided.report.recipient_id == job.recipient_id
        assert decided.report.channel is Channel.PUSH
        assert decided.report.reason == (
            None if report is DeliveryOutcome.DELIVERED else answer.reason
        )
    if invalidations:
        [invalidation] = invalidations
        assert (invalidation.user_id, invalidation.device_id) == (job.recipient_id, job.device_id)
        assert invalidation.reason == answer.reason
        # The device is invalidated next to the failure's report, and nothing else.
        assert published(decided) == (invalidation, decided.report)


def test_retry_after_is_passed_on() -> None:
    decided = decide(ProviderAnswer(Verdict.TRANSIENT, "fcm 429 QUOTA", 7.0))
    assert isinstance(decided.error, RetryableError)
    assert decided.error.retry_after == 7.0
    decided = decide(ProviderAnswer(Verdict.MISCONFIGURED, "fcm 403", 7.0))
    assert isinstance(decided.error, DeferredError)
    assert decided.error.retry_after == 7.0


@pytest.mark.parametrize(
    ("retry_after", "breaker_retry_in", "expected"),
    [(None, None, None), (None, 30.0, 30.0), (7.0, 30.0, 30.0), (60.0, 30.0, 60.0)],
)
def test_a_configuration_problem_waits_for_the_breaker(
    retry_after: float | None, breaker_retry_in: float | None, expected: float | None
) -> None:
    answer = ProviderAnswer(Verdict.MISCONFIGURED, "fcm 401 UNAUTHENTICATED", retry_after)
    decided = decide(answer, breaker_retry_in=breaker_retry_in)
    assert isinstance(decided.error, DeferredError)
    assert decided.error.retry_after == expected


def test_event_ids_derive_from_the_notification() -> None:
    job = push_job()
    answer = answer_of(ProviderAnswer(Verdict.TOKEN_INVALID, "fcm 404 UNREGISTERED"))
    first = outcome_of_answer(CHANNEL, job, answer)
    second = outcome_of_answer(CHANNEL, job, answer)
    assert contents(published(first)) == contents(published(second))
    other = outcome_of_answer(CHANNEL, push_job(), answer)
    assert {e.event_id for e in published(first)}.isdisjoint(e.event_id for e in published(other))


def test_a_reported_final_job_is_a_no_op() -> None:
    for status, failure in (
        (DeliveryStatus.DELIVERED, None),
        (DeliveryStatus.FAILED, Failure.TOKEN_INVALID),
        (DeliveryStatus.FAILED, Failure.REJECTED),
    ):
        decided = outcome_of_claim(
            CHANNEL, push_job(), AlreadyFinal(status, failure, "x", reported=True), now=NOW
        )
        assert decided.label == PushOutcome.DUPLICATE
        assert published(decided) == ()
        assert decided.error is None
        assert decided.status is None
        assert decided.lease is Lease.NONE


@pytest.mark.parametrize(
    ("status", "failure", "events", "error"),
    [
        (DeliveryStatus.DELIVERED, None, [DeliveryReported], None),
        (
            DeliveryStatus.FAILED,
            Failure.TOKEN_INVALID,
            [DeviceInvalidated, DeliveryReported],
            None,
        ),
        (DeliveryStatus.FAILED, Failure.REJECTED, [DeliveryReported], PermanentError),
    ],
)
def test_an_unreported_final_job_publishes_its_events_again(
    status: DeliveryStatus, failure: Failure | None, events: list[type], error: type | None
) -> None:
    job = push_job()
    decided = outcome_of_claim(
        CHANNEL, job, AlreadyFinal(status, failure, "fcm 404 UNREGISTERED", reported=False), now=NOW
    )
    assert [type(event) for event in published(decided)] == events
    assert type(decided.error) is error if error else decided.error is None
    assert decided.status is None  # nothing new to record
    assert decided.lease is Lease.REPORT  # this worker holds the row to publish them
    # The same events as the first time, ids included.
    if failure is not None:
        first = outcome_of_answer(
            CHANNEL,
            job,
            answer_of(
                ProviderAnswer(
                    Verdict.TOKEN_INVALID if failure is Failure.TOKEN_INVALID else Verdict.REJECTED,
                    "fcm 404 UNREGISTERED",
                )
            ),
        )
        assert contents(published(decided)) == contents(published(first))


def test_a_job_in_progress_elsewhere_comes_back_after_the_lease_without_spending_an_attempt() -> (
    None
):
    decided = outcome_of_claim(CHANNEL, push_job(), Busy(NOW + timedelta(seconds=42)), now=NOW)
    assert decided.label == PushOutcome.IN_PROGRESS
    assert isinstance(decided.error, DeferredError)
    assert decided.error.retry_after == 42.0
    assert published(decided) == ()


def test_a_platform_nobody_serves_is_reported_failed_and_dead_lettered_unclaimed() -> None:
    job = push_job(platform="apns", token="ab" * 32)

    decided = outcome_unsupported(CHANNEL, job)

    assert decided.label == PushOutcome.UNSUPPORTED
    assert decided.lease is Lease.NONE  # no ledger row: a replay once it is served sends it
    assert decided.report is not None
    assert (decided.report.outcome, decided.report.reason) == (
        DeliveryOutcome.FAILED,
        "unsupported platform apns",
    )
    assert isinstance(decided.error, PermanentError)
    assert decided.events == ()
