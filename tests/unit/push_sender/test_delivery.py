"""The decisions, without I/O: the provider's answer or the ledger's state → what is recorded,
what is published and how the job ends (docs/providers.md)."""

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
    batch_reports,
)
from herald_shared.ledger import AlreadyFinal, Busy, DeliveryStatus
from herald_shared.retry import DeferredError, PermanentError, RetryableError
from push_sender.delivery import plan_for_answer, plan_for_claim, report_for
from push_sender.metrics import PushOutcome
from push_sender.providers import ProviderAnswer, Verdict
from push_sender.tables import Failure
from tests.unit.push_sender.support import push_job, push_jobs

NOW = datetime(2026, 3, 14, 9, 26, 53, tzinfo=UTC)


def contents(events: tuple[Event, ...]) -> list[dict[str, Any]]:
    """The events without their creation time (ids included)."""
    return [event.model_dump(exclude={"occurred_at"}) for event in events]


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

    plan = plan_for_answer(job, answer)

    assert plan.outcome is outcome
    assert (plan.status, plan.failure) == (status, failure)
    assert (plan.invalidation is not None) is invalidates
    assert (plan.report.outcome if plan.report else None) == report
    assert type(plan.error) is error if error else plan.error is None
    if plan.report is not None:
        assert plan.report.notification_id == job.notification_id
        assert plan.report.recipient_id == job.recipient_id
        assert plan.report.channel is Channel.PUSH
        assert plan.report.reason == (
            None if report is DeliveryOutcome.DELIVERED else answer.reason
        )
    if plan.invalidation is not None:
        assert (plan.invalidation.user_id, plan.invalidation.device_id) == (
            job.recipient_id,
            job.device_id,
        )
        assert plan.invalidation.reason == answer.reason
        # The device is invalidated before the failure is reported.
        assert plan.events == (plan.invalidation, plan.report)


def test_retry_after_is_passed_on() -> None:
    plan = plan_for_answer(push_job(), ProviderAnswer(Verdict.TRANSIENT, "fcm 429 QUOTA", 7.0))
    assert isinstance(plan.error, RetryableError)
    assert plan.error.retry_after == 7.0
    plan = plan_for_answer(push_job(), ProviderAnswer(Verdict.MISCONFIGURED, "fcm 403", 7.0))
    assert isinstance(plan.error, DeferredError)
    assert plan.error.retry_after == 7.0


@pytest.mark.parametrize(
    ("retry_after", "breaker_retry_in", "expected"),
    [(None, None, None), (None, 30.0, 30.0), (7.0, 30.0, 30.0), (60.0, 30.0, 60.0)],
)
def test_a_configuration_problem_waits_for_the_breaker(
    retry_after: float | None, breaker_retry_in: float | None, expected: float | None
) -> None:
    answer = ProviderAnswer(Verdict.MISCONFIGURED, "fcm 401 UNAUTHENTICATED", retry_after)
    plan = plan_for_answer(push_job(), answer, breaker_retry_in=breaker_retry_in)
    assert isinstance(plan.error, DeferredError)
    assert plan.error.retry_after == expected


def test_event_ids_derive_from_the_notification() -> None:
    job = push_job()
    answer = ProviderAnswer(Verdict.TOKEN_INVALID, "fcm 404 UNREGISTERED")
    first, second = plan_for_answer(job, answer), plan_for_answer(job, answer)
    assert contents(first.events) == contents(second.events)
    other = plan_for_answer(push_job(), answer)
    assert {e.event_id for e in first.events}.isdisjoint(e.event_id for e in other.events)


def test_a_reported_final_job_is_a_no_op() -> None:
    for status, failure in (
        (DeliveryStatus.DELIVERED, None),
        (DeliveryStatus.FAILED, Failure.TOKEN_INVALID),
        (DeliveryStatus.FAILED, Failure.REJECTED),
    ):
        plan = plan_for_claim(
            push_job(), AlreadyFinal(status, failure, "x", reported=True), now=NOW
        )
        assert plan.outcome is PushOutcome.DUPLICATE
        assert plan.events == ()
        assert plan.error is None
        assert plan.status is None


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
    plan = plan_for_claim(
        job, AlreadyFinal(status, failure, "fcm 404 UNREGISTERED", reported=False), now=NOW
    )
    assert [type(event) for event in plan.events] == events
    assert type(plan.error) is error if error else plan.error is None
    assert plan.status is None  # nothing new to record
    # The same events as the first time, ids included.
    if failure is not None:
        first = plan_for_answer(
            job,
            ProviderAnswer(
                Verdict.TOKEN_INVALID if failure is Failure.TOKEN_INVALID else Verdict.REJECTED,
                "fcm 404 UNREGISTERED",
            ),
        )
        assert contents(plan.events) == contents(first.events)


def test_a_job_in_progress_elsewhere_comes_back_after_the_lease_without_spending_an_attempt() -> (
    None
):
    plan = plan_for_claim(push_job(), Busy(NOW + timedelta(seconds=42)), now=NOW)
    assert plan.outcome is PushOutcome.IN_PROGRESS
    assert isinstance(plan.error, DeferredError)
    assert plan.error.retry_after == 42.0
    assert plan.events == ()


def test_reports_are_batched_by_outcome_with_ids_that_derive_from_their_contents() -> None:
    delivered, failed, also_delivered = push_jobs(3)
    reports = [
        report_for(delivered, DeliveryOutcome.DELIVERED),
        report_for(failed, DeliveryOutcome.FAILED, "fcm 404 UNREGISTERED"),
        report_for(also_delivered, DeliveryOutcome.DELIVERED),
    ]

    batches = batch_reports(reports)

    assert [(batch.outcome, batch.channel, batch.message_id) for batch in batches] == [
        (DeliveryOutcome.DELIVERED, Channel.PUSH, delivered.message_id),
        (DeliveryOutcome.FAILED, Channel.PUSH, delivered.message_id),
    ]
    assert [[r.notification_id for r in batch.reports] for batch in batches] == [
        [delivered.notification_id, also_delivered.notification_id],
        [failed.notification_id],
    ]
    # Published again, in any order: the same ids, so consumers deduplicate.
    again = batch_reports(reversed(reports))
    assert [batch.event_id for batch in again] == [batch.event_id for batch in batches]
    # Other reports, or the same notifications with another outcome: other ids.
    fewer = batch_reports(reports[:1])
    as_failed = batch_reports(
        report_for(job, DeliveryOutcome.FAILED, "x") for job in (delivered, also_delivered)
    )
    ids = {batch.event_id for batch in (*batches, *fewer, *as_failed)}
    assert len(ids) == 4


def test_no_reports_make_no_batch() -> None:
    assert batch_reports([]) == []
