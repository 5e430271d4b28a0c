"""The sender workflow both senders are built on (`herald_shared.sending`), with a scripted
provider, SQLite and recording publishers: what is claimed, sent, recorded and published, and how
each delivery ends."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, cast

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import Column, MetaData, Uuid

from herald_shared.database import make_engine
from herald_shared.events import (
    Channel,
    DeliveriesReported,
    DeliveryOutcome,
    DeviceInvalidated,
    Event,
    Trigger,
    utc_now,
)
from herald_shared.ledger import Claimed, DeliveryLedger, DeliveryStatus, delivery_ledger_table
from herald_shared.resilience import BreakerPolicy, CircuitBreaker, FairLimiter
from herald_shared.retry import DeferredError, PermanentError, RetryableError
from herald_shared.sending import Answer, Gate, Sender, SenderTuning, Verdict
from herald_shared.topology import (
    DEVICE_INVALIDATED,
    PUSH_DELIVERED,
    PUSH_FAILED,
    routing_key_for,
)
from tests.support.infra import wait_until

metadata = MetaData()
deliveries = delivery_ledger_table(
    "test_deliveries",
    metadata,
    Column("device_id", Uuid, nullable=False),
    failures=("token_invalid", "rejected"),
)


@dataclass(frozen=True)
class Job:
    message_id: uuid.UUID = field(default_factory=uuid.uuid4)
    notification_id: uuid.UUID = field(default_factory=uuid.uuid4)
    recipient_id: uuid.UUID = field(default_factory=uuid.uuid4)
    device_id: uuid.UUID = field(default_factory=uuid.uuid4)
    trigger: Trigger = Trigger.MESSAGE

    @property
    def urgent(self) -> bool:
        return self.trigger.urgent


def jobs_of(count: int, message_id: uuid.UUID | None = None) -> list[Job]:
    message_id = message_id or uuid.uuid4()
    return [Job(message_id=message_id) for _ in range(count)]


class ScriptedProvider:
    """Answers from `answers` by notification id (accepted otherwise), after `delay` seconds
    or when `gate` opens; records every call in order."""

    name = "fake"

    def __init__(self, deadline: float = 5.0) -> None:
        self.deadline = deadline
        self.answers: dict[uuid.UUID, Answer | Exception] = {}
        self.calls: list[uuid.UUID] = []
        self.gate: asyncio.Event | None = None
        self.delay = 0.0
        self.started = asyncio.Event()

    async def send(self, job: Job) -> Answer:
        self.calls.append(job.notification_id)
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        answer = self.answers.get(job.notification_id, Answer(Verdict.ACCEPTED, "accepted"))
        if isinstance(answer, Exception):
            raise answer
        return answer


class Spec:
    channel = Channel.PUSH

    def __init__(self, gate: Gate[Job] | None) -> None:
        self.gate = gate

    def gate_for(self, job: Job) -> Gate[Job] | None:
        return self.gate

    def unsupported(self, job: Job) -> str:
        return "unsupported platform test"

    def ledger_columns(self, job: Job) -> Mapping[str, Any]:
        return {"device_id": job.device_id}

    def gone_failures(self) -> frozenset[str]:
        return frozenset({"token_invalid"})

    def events_for_failure(self, job: Job, failure: str, reason: str) -> tuple[Event, ...]:
        if failure != "token_invalid":
            return ()
        return (
            DeviceInvalidated(user_id=job.recipient_id, device_id=job.device_id, reason=reason),
        )

    def settings_hint(self, provider: str) -> str:
        return "FAKE_SETTINGS"


class RecordingPublisher:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.fail: Exception | None = None

    async def publish(self, event: Event, **_: Any) -> None:
        if self.fail is not None:
            raise self.fail
        self.events.append(event)


class Counts:
    def __init__(self) -> None:
        self.outcomes: list[tuple[str, str]] = []

    def count(self, provider: str, outcome: str) -> None:
        self.outcomes.append((provider, outcome))

    def observe_send(self, provider: str, seconds: float) -> None:
        assert seconds >= 0


@dataclass
class Rig:
    sender: Sender[Job]
    provider: ScriptedProvider
    gate: Gate[Job]
    ledger: DeliveryLedger
    publisher: RecordingPublisher
    metrics: Counts

    def reports(self, outcome: DeliveryOutcome) -> list[DeliveriesReported]:
        return [
            event
            for event in self.publisher.events
            if isinstance(event, DeliveriesReported) and event.outcome is outcome
        ]

    def reported(self, outcome: DeliveryOutcome) -> set[uuid.UUID]:
        return {
            report.notification_id for event in self.reports(outcome) for report in event.reports
        }

    def invalidations(self) -> list[DeviceInvalidated]:
        return [event for event in self.publisher.events if isinstance(event, DeviceInvalidated)]

    def another_worker(self) -> Sender[Job]:
        return Sender(
            spec=Spec(self.gate),
            ledger=self.ledger,
            publishers=self.sender.publishers,
            publish_timeout=1.0,
            metrics=Counts(),
            tuning=self.sender.tuning,
        )


def make_rig(
    ledger: DeliveryLedger,
    *,
    limit: int = 100,
    breaker: CircuitBreaker | None = None,
    lease: timedelta = timedelta(seconds=15),
    deadline: float = 5.0,
    max_jobs_held: int = 1000,
) -> Rig:
    provider = ScriptedProvider(deadline)
    gate = Gate(provider, FairLimiter(limit), breaker)
    publisher = RecordingPublisher()
    metrics = Counts()
    sender = Sender(
        spec=Spec(gate),
        ledger=ledger,
        publishers={
            key: cast(Any, publisher) for key in (PUSH_DELIVERED, PUSH_FAILED, DEVICE_INVALIDATED)
        },
        publish_timeout=1.0,
        metrics=metrics,
        tuning=SenderTuning(lease=lease, linger=0.0, max_jobs_held=max_jobs_held),
    )
    return Rig(sender, provider, gate, ledger, publisher, metrics)


@pytest.fixture
async def ledger(sqlite_url: str) -> AsyncIterator[DeliveryLedger]:
    engine = make_engine(sqlite_url)
    async with engine.begin() as connection:
        await connection.run_sync(metadata.create_all)
    try:
        yield DeliveryLedger(engine, deliveries)
    finally:
        await engine.dispose()


@pytest.fixture
def rig(ledger: DeliveryLedger) -> Rig:
    return make_rig(ledger)


async def status(ledger: DeliveryLedger, job: Job) -> DeliveryStatus | None:
    entry = await ledger.get(job.notification_id)
    return None if entry is None else entry.status


async def test_deliveries_handled_together_share_their_statements_and_reports(rig: Rig) -> None:
    first, second = jobs_of(3), jobs_of(2)

    await asyncio.gather(rig.sender.deliver(first), rig.sender.deliver(second))

    assert sorted(rig.provider.calls) == sorted(job.notification_id for job in first + second)
    # One report event for both messages' deliveries, with every notification in it.
    (event,) = rig.reports(DeliveryOutcome.DELIVERED)
    assert {report.notification_id for report in event.reports} == {
        job.notification_id for job in first + second
    }
    assert {report.message_id for report in event.reports} == {
        first[0].message_id,
        second[0].message_id,
    }
    assert routing_key_for(event) == PUSH_DELIVERED
    for job in first + second:
        entry = await rig.ledger.get(job.notification_id)
        assert entry is not None
        assert (entry.status, entry.reported, entry.attempts) == (DeliveryStatus.DELIVERED, True, 1)
    assert rig.metrics.outcomes.count(("fake", "delivered")) == 5


async def test_a_redelivered_job_is_not_sent_again(rig: Rig) -> None:
    jobs = jobs_of(2)
    await rig.sender.deliver(jobs)
    rig.publisher.events.clear()

    await rig.sender.deliver(jobs)

    assert len(rig.provider.calls) == 2
    assert rig.publisher.events == []
    assert ("fake", "duplicate") in rig.metrics.outcomes


async def test_outcomes_recorded_but_not_published_go_out_on_the_next_copy(rig: Rig) -> None:
    gone, delivered = jobs_of(2)
    rig.provider.answers[gone.notification_id] = Answer(
        Verdict.GONE, "fcm UNREGISTERED", failure="token_invalid"
    )
    rig.publisher.fail = ConnectionResetError("broker gone")
    with pytest.raises(ConnectionResetError):
        await rig.sender.deliver([gone, delivered])
    assert rig.publisher.events == []
    rig.publisher.fail = None

    await rig.sender.deliver([gone, delivered])

    assert len(rig.provider.calls) == 2  # recorded: not sent again
    assert rig.reported(DeliveryOutcome.DELIVERED) == {delivered.notification_id}
    assert rig.reported(DeliveryOutcome.FAILED) == {gone.notification_id}
    assert [event.device_id for event in rig.invalidations()] == [gone.device_id]
    entry = await rig.ledger.get(gone.notification_id)
    assert entry is not None
    assert entry.reported


async def test_how_each_answer_ends_its_job_and_its_delivery(rig: Rig) -> None:
    accepted, gone, rejected = jobs_of(3)
    rig.provider.answers[gone.notification_id] = Answer(
        Verdict.GONE, "fcm UNREGISTERED", failure="token_invalid"
    )
    rig.provider.answers[rejected.notification_id] = Answer(
        Verdict.REJECTED, "fcm INVALID_ARGUMENT", failure="rejected"
    )

    # A job refused for good dead-letters its delivery; a dead token does not.
    with pytest.raises(PermanentError, match="push refused: fcm INVALID_ARGUMENT"):
        await rig.sender.deliver([accepted, gone, rejected])
    await rig.sender.deliver([*jobs_of(1), gone])

    assert await status(rig.ledger, accepted) is DeliveryStatus.DELIVERED
    assert await status(rig.ledger, gone) is DeliveryStatus.FAILED
    assert await status(rig.ledger, rejected) is DeliveryStatus.FAILED
    assert rig.reported(DeliveryOutcome.FAILED) == {gone.notification_id, rejected.notification_id}
    assert len(rig.invalidations()) == 1


async def test_a_transient_failure_retries_the_delivery_and_hands_the_job_back(rig: Rig) -> None:
    flaky, fine = jobs_of(2)
    rig.provider.answers[flaky.notification_id] = Answer(
        Verdict.TRANSIENT, "fcm 503", retry_after=7.0
    )

    with pytest.raises(RetryableError, match="fcm 503") as raised:
        await rig.sender.deliver([flaky, fine])
    assert raised.value.retry_after == 7.0
    assert rig.reported(DeliveryOutcome.DELIVERED) == {fine.notification_id}
    entry = await rig.ledger.get(flaky.notification_id)
    assert entry is not None
    assert (entry.status, entry.reason) == (DeliveryStatus.RETRYING, "fcm 503")

    del rig.provider.answers[flaky.notification_id]
    await rig.sender.deliver([flaky, fine])  # the retry: only the unfinished job is sent

    assert rig.provider.calls == [
        flaky.notification_id,
        fine.notification_id,
        flaky.notification_id,
    ]
    entry = await rig.ledger.get(flaky.notification_id)
    assert entry is not None
    assert (entry.status, entry.attempts) == (DeliveryStatus.DELIVERED, 2)


@pytest.mark.parametrize(
    ("answer", "error", "label"),
    [
        (Answer(Verdict.MISCONFIGURED, "fcm 401", retry_after=3.0), DeferredError, "misconfigured"),
        (Answer(Verdict.DEFERRED, "smtp connections busy"), DeferredError, "deferred"),
    ],
)
async def test_answers_that_wait_without_spending_an_attempt(
    rig: Rig, answer: Answer, error: type[Exception], label: str
) -> None:
    (job,) = jobs_of(1)
    rig.provider.answers[job.notification_id] = answer

    with pytest.raises(error):
        await rig.sender.deliver([job])

    assert await status(rig.ledger, job) is DeliveryStatus.RETRYING
    assert ("fake", label) in rig.metrics.outcomes
    assert rig.publisher.events == []


async def test_a_job_another_worker_holds_waits_for_its_lease(ledger: DeliveryLedger) -> None:
    rig = make_rig(ledger)
    (job,) = jobs_of(1)
    rig.provider.gate = asyncio.Event()
    first = asyncio.create_task(rig.sender.deliver([job]))
    await rig.provider.started.wait()

    with pytest.raises(DeferredError, match="in progress elsewhere") as raised:
        await rig.another_worker().deliver([job])
    assert raised.value.retry_after is not None
    assert 0 < raised.value.retry_after <= 15

    rig.provider.gate.set()
    await first
    assert len(rig.provider.calls) == 1


async def test_two_copies_of_one_job_in_one_batch_send_it_once(rig: Rig) -> None:
    (job,) = jobs_of(1)

    outcomes = await asyncio.gather(
        rig.sender.deliver([job]), rig.sender.deliver([job]), return_exceptions=True
    )

    assert len(rig.provider.calls) == 1
    assert sorted(type(outcome).__name__ for outcome in outcomes) == ["DeferredError", "NoneType"]


async def test_two_copies_of_a_finished_job_in_one_batch_are_both_no_ops(rig: Rig) -> None:
    """Nothing is in progress for the second copy to wait for: it ends as the first does."""
    (job,) = jobs_of(1)
    await rig.sender.deliver([job])
    rig.publisher.events.clear()

    outcomes = await asyncio.gather(
        rig.sender.deliver([job]), rig.sender.deliver([job]), return_exceptions=True
    )

    assert list(outcomes) == [None, None]
    assert len(rig.provider.calls) == 1
    assert rig.publisher.events == []
    assert rig.metrics.outcomes.count(("fake", "duplicate")) == 2


async def test_an_open_breaker_defers_jobs_unclaimed(ledger: DeliveryLedger) -> None:
    clock = [1000.0]
    breaker = CircuitBreaker(BreakerPolicy(failures=1, cool_down=30.0), clock=lambda: clock[0])
    rig = make_rig(ledger, breaker=breaker)
    failing, waiting = jobs_of(1), jobs_of(1)
    rig.provider.answers[failing[0].notification_id] = Answer(Verdict.TRANSIENT, "fcm 503")
    with pytest.raises(RetryableError):
        await rig.sender.deliver(failing)

    with pytest.raises(DeferredError, match="fake circuit open") as raised:
        await rig.sender.deliver(waiting)

    assert raised.value.retry_after == 30.0
    assert await rig.ledger.get(waiting[0].notification_id) is None  # not even claimed
    assert len(rig.provider.calls) == 1


async def test_a_job_nobody_serves_is_reported_failed_without_a_ledger_row(
    ledger: DeliveryLedger,
) -> None:
    rig = make_rig(ledger)
    sender = Sender(
        spec=Spec(None),
        ledger=ledger,
        publishers=rig.sender.publishers,
        publish_timeout=1.0,
        metrics=rig.metrics,
    )
    (job,) = jobs_of(1)

    with pytest.raises(PermanentError, match="unsupported platform test"):
        await sender.deliver([job])

    assert rig.reported(DeliveryOutcome.FAILED) == {job.notification_id}
    assert await ledger.get(job.notification_id) is None
    assert ("none", "unsupported") in rig.metrics.outcomes


async def test_a_cancelled_handler_leaves_its_sends_to_finish_and_be_recorded(rig: Rig) -> None:
    jobs = jobs_of(2)
    rig.provider.gate = asyncio.Event()
    handler = asyncio.create_task(rig.sender.deliver(jobs))
    await rig.provider.started.wait()

    handler.cancel()  # the connection dropped: the delivery will come again
    with pytest.raises(asyncio.CancelledError):
        await handler
    rig.provider.gate.set()
    await rig.sender.aclose()

    assert rig.reported(DeliveryOutcome.DELIVERED) == {job.notification_id for job in jobs}
    await rig.sender.deliver(jobs)  # the redelivered copy
    assert len(rig.provider.calls) == 2


async def test_a_provider_bug_or_timeout_is_a_transient_answer(
    ledger: DeliveryLedger, caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig(ledger, deadline=0.05)
    buggy, slow = jobs_of(2)
    rig.provider.answers[buggy.notification_id] = KeyError("alice@example.com")
    slow_rig_gate = asyncio.Event()

    async def never(job: Job) -> Answer:
        if job.notification_id == slow.notification_id:
            await slow_rig_gate.wait()
        return await ScriptedProvider.send(rig.provider, job)

    rig.provider.send = never  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING), pytest.raises(RetryableError) as raised:
        await rig.sender.deliver([buggy, slow])

    assert str(raised.value) == "fake error (KeyError) (and 1 more)"
    entries = [await rig.ledger.get(job.notification_id) for job in (buggy, slow)]
    assert [(entry.status, entry.reason) for entry in entries if entry] == [
        (DeliveryStatus.RETRYING, "fake error (KeyError)"),
        (DeliveryStatus.RETRYING, "fake deadline exceeded"),
    ]
    assert "provider_error" in caplog.text
    assert "alice@example.com" not in caplog.text


async def test_places_at_the_provider_go_in_turn_per_message(ledger: DeliveryLedger) -> None:
    rig = make_rig(ledger, limit=1)
    rig.provider.gate = asyncio.Event()
    big, direct = jobs_of(6), jobs_of(1)

    big_delivery = asyncio.create_task(rig.sender.deliver(big))
    await rig.provider.started.wait()  # one of the fan-out's sends has the place…
    direct_delivery = asyncio.create_task(rig.sender.deliver(direct))

    async def everyone_waits() -> bool:
        return rig.gate.limiter.waiting == 6  # …its five others and the direct message wait

    await wait_until(everyone_waits, timeout=5)
    rig.provider.gate.set()
    await asyncio.gather(big_delivery, direct_delivery)

    # The direct message waited for one of the fan-out's sends, not for all of them.
    assert rig.provider.calls.index(direct[0].notification_id) == 1


async def test_deliveries_past_the_jobs_held_wait_unclaimed_and_urgent_ones_do_not(
    ledger: DeliveryLedger,
) -> None:
    rig = make_rig(ledger, max_jobs_held=3)
    registry = CollectorRegistry()
    rig.sender.export_gauges(registry)
    rig.provider.gate = asyncio.Event()
    first, second = jobs_of(3), jobs_of(2)
    direct = [Job(trigger=Trigger.DIRECT)]

    first_delivery = asyncio.create_task(rig.sender.deliver(first))
    await rig.provider.started.wait()
    second_delivery = asyncio.create_task(rig.sender.deliver(second))
    direct_delivery = asyncio.create_task(rig.sender.deliver(direct))

    async def direct_sent() -> bool:
        return direct[0].notification_id in rig.provider.calls

    await wait_until(direct_sent, timeout=5)  # past the budget, while the second one waits…
    assert [await status(ledger, job) for job in second] == [None, None]  # …with no ledger row
    assert not second_delivery.done()
    assert registry.get_sample_value("herald_sender_jobs_held") == 3 + 1
    assert registry.get_sample_value("herald_sender_deliveries_waiting") == 1

    rig.provider.gate.set()
    await asyncio.gather(first_delivery, second_delivery, direct_delivery)
    assert registry.get_sample_value("herald_sender_jobs_held") == 0
    assert registry.get_sample_value("herald_sender_deliveries_waiting") == 0
    assert rig.reported(DeliveryOutcome.DELIVERED) == {
        job.notification_id for job in [*first, *second, *direct]
    }


async def test_a_delivery_whose_claim_fails_gives_its_jobs_back(ledger: DeliveryLedger) -> None:
    rig = make_rig(ledger, max_jobs_held=2)
    failing = jobs_of(2)

    async def unreachable(*_: Any, **__: Any) -> Any:
        raise ConnectionRefusedError("the ledger's database is down")

    claim_many = ledger.claim_many
    ledger.claim_many = unreachable  # type: ignore[method-assign]
    with pytest.raises(ConnectionRefusedError):
        await rig.sender.deliver(failing)
    ledger.claim_many = claim_many  # type: ignore[method-assign]

    await asyncio.wait_for(rig.sender.deliver(jobs_of(2)), timeout=5)  # the budget is whole
    assert len(rig.provider.calls) == 2


async def test_leases_are_renewed_while_jobs_wait(ledger: DeliveryLedger) -> None:
    rig = make_rig(ledger, lease=timedelta(seconds=1.5))
    (job,) = jobs_of(1)
    rig.provider.gate = asyncio.Event()
    first = asyncio.create_task(rig.sender.deliver([job]))
    await rig.provider.started.wait()

    # Well past the lease, another worker still finds the job taken.
    await asyncio.sleep(2.2)
    with pytest.raises(DeferredError, match="in progress elsewhere"):
        await rig.another_worker().deliver([job])

    rig.provider.gate.set()
    await first
    assert len(rig.provider.calls) == 1


async def test_closing_drops_the_leases_of_work_it_could_not_finish(ledger: DeliveryLedger) -> None:
    rig = make_rig(ledger)
    (job,) = jobs_of(1)
    rig.provider.gate = asyncio.Event()  # never opens
    handler = asyncio.create_task(rig.sender.deliver([job]))
    await rig.provider.started.wait()

    await rig.sender.aclose(timeout=0.1)

    entry = await rig.ledger.get(job.notification_id)
    assert entry is not None
    assert entry.status is DeliveryStatus.RETRYING  # free for the next worker at once
    claims = await ledger.claim_many(
        [job],
        provider="fake",
        now=utc_now(),
        lease=timedelta(seconds=1),
        extra=lambda job: {"device_id": job.device_id},
    )
    assert isinstance(claims[job.notification_id], Claimed)
    rig.provider.gate.set()
    await rig.sender.aclose()
    assert handler.done()


async def test_given_up_jobs_are_reported_failed(rig: Rig) -> None:
    jobs = jobs_of(3)

    await rig.sender.report_given_up(jobs, correlation_id="c-1")

    (event,) = rig.reports(DeliveryOutcome.FAILED)
    assert {report.reason for report in event.reports} == {"retries exhausted"}
    assert {report.notification_id for report in event.reports} == {
        job.notification_id for job in jobs
    }
    assert utc_now() >= event.occurred_at


async def test_a_claimed_job_the_breaker_refuses_spends_no_ledger_attempt(
    ledger: DeliveryLedger,
) -> None:
    clock = [1000.0]
    breaker = CircuitBreaker(BreakerPolicy(failures=1, cool_down=30.0), clock=lambda: clock[0])
    rig = make_rig(ledger, breaker=breaker)
    opener, (probe, behind) = jobs_of(1), jobs_of(2)
    rig.provider.answers[opener[0].notification_id] = Answer(Verdict.TRANSIENT, "fcm 503")
    with pytest.raises(RetryableError):
        await rig.sender.deliver(opener)
    clock[0] += 30  # half-open: one probe may go
    rig.provider.gate = asyncio.Event()

    rig.provider.started.clear()
    delivery = asyncio.create_task(rig.sender.deliver([probe, behind]))
    await rig.provider.started.wait()  # the probe is out; the other job is refused meanwhile
    rig.provider.gate.set()
    with pytest.raises(DeferredError, match="fake circuit open"):
        await delivery

    refused = await ledger.get(behind.notification_id)
    assert refused is not None
    assert (refused.status, refused.attempts) == (DeliveryStatus.RETRYING, 0)
    await rig.sender.deliver([probe, behind])  # the breaker closed: sent, first attempt
    entry = await ledger.get(behind.notification_id)
    assert entry is not None
    assert (entry.status, entry.attempts) == (DeliveryStatus.DELIVERED, 1)
