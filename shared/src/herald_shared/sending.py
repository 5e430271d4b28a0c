"""The one shape of a sender: push-sender and email-sender are each this workflow with their
own `Channel` (which providers serve a job, what a failure means for the recipient).

For every delivery (a broker message carrying jobs) the handler calls `Sender.deliver`, which
first waits until the worker holds few enough jobs (`JobBudget`, `SenderTuning.max_jobs_held`;
the urgent lane never waits), so that what the prefetch brought in beyond that waits unclaimed,
then takes the jobs through three stages and raises how the delivery ends:

1. **claim** (batched across deliveries, `MicroBatcher`): route each job to its provider's gate;
   a job nobody serves, or whose provider's breaker is open, ends at once (reported failed /
   deferred, unclaimed); the others are claimed in the delivery ledger in one statement for the
   whole batch. A job final already is a no-op (or, if its events never went out, they are
   published again); one another worker holds is deferred.
2. **send** (per job): wait for a place at the provider (`FairLimiter`: bounded concurrency,
   places in turn per message), ask the breaker again, call the provider under its deadline,
   which starts only now (a job waiting for a place never times out), and turn its `Answer`
   into an `Outcome`. Leases of jobs still waiting or sending are renewed meanwhile, so a long
   wait never lets another worker take a job over, and a lease can stay short (a dead worker's
   jobs are taken over quickly).
3. **settle** (batched across deliveries again, as sends complete): record the final outcomes
   (one statement per outcome), hand transient failures back, publish the side events and the
   reports (one event per outcome for the whole batch), then mark them reported, or drop the
   leases if publishing failed so the retry publishes at once.

A delivery then ends as its jobs say (`batch_error`: a retry beats a deferral beats a dead
letter); the retry middleware does the rest. The work of a delivery runs on even if its handler
is cancelled (its connection lost, the service stopping): provider calls finish and their
outcomes are recorded, so the redelivered copy finds them done instead of sending again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import Enum, StrEnum
from typing import Any, Generic, Protocol, TypeVar

from faststream.message import StreamMessage
from faststream.rabbit import RabbitBroker
from faststream.rabbit.publisher import RabbitPublisher
from faststream.rabbit.subscriber import RabbitSubscriber
from prometheus_client import CollectorRegistry, Gauge
from pydantic import TypeAdapter

from herald_shared.batching import DEFAULT_LINGER, MicroBatcher
from herald_shared.events import (
    Channel,
    DeliveryOutcome,
    DeliveryReported,
    Event,
    Trigger,
    decided_when_quiet,
    reports_events,
    utc_now,
)
from herald_shared.ledger import (
    AlreadyFinal,
    Busy,
    Claimed,
    DeliveryJob,
    DeliveryLedger,
    DeliveryStatus,
)
from herald_shared.publishing import publish_events
from herald_shared.resilience import (
    Admitted,
    CallResult,
    CircuitBreaker,
    FairLimiter,
    JobBudget,
    Refused,
)
from herald_shared.retry import (
    DeadLetterHooks,
    DeferredError,
    ItemError,
    PermanentError,
    RetryableError,
    batch_error,
    describe_error,
    is_deferred,
)
from herald_shared.topology import EXCHANGE, ConsumerQueue


class SendJob(DeliveryJob, Protocol):
    """What the sender workflow reads from a job: the ledger's ids, why it is sent, and
    whether it goes ahead of the others."""

    @property
    def trigger(self) -> Trigger: ...

    @property
    def urgent(self) -> bool: ...


J = TypeVar("J", bound=SendJob)
J_contra = TypeVar("J_contra", bound=SendJob, contravariant=True)

# Report event ids derive from the notification and the outcome, so a report published again
# (after a crash between publishing and recording that it went out) carries the same id.
REPORT_NAMESPACE = uuid.UUID("5c0f3d2e-8a41-4b7e-9c6d-2f1e0a9b8c73")
RETRIES_EXHAUSTED = "retries exhausted"
# The `provider` label of jobs that no provider serves.
UNSUPPORTED = "none"


# --- what a provider says ---------------------------------------------------------------------


class Verdict(StrEnum):
    """A provider's answer about one job, reduced to what the sender does about it
    (the tables in docs/providers.md)."""

    ACCEPTED = "accepted"  # the provider has it: record delivered, report
    GONE = "gone"  # the address is dead (a push token the provider no longer knows): record
    # failed, report, tell whoever owns the address; nothing to retry or dead-letter
    REJECTED = "rejected"  # this notification is refused for good: record failed, report,
    # dead-letter
    TRANSIENT = "transient"  # throttled, provider down, timeout: retry later (an attempt spent)
    MISCONFIGURED = "misconfigured"  # our credentials or permissions: wait for the fix without
    # spending attempts (and open the provider's breaker)
    DEFERRED = "deferred"  # not now, and not the job's fault (a dependency down): wait


@dataclass(frozen=True)
class Answer:
    """`reason` is safe to log, to store and to publish: codes only, never an address, a token,
    a text or the provider's free-form message. `failure` is the ledger's code for a job that
    ends failed (GONE, REJECTED)."""

    verdict: Verdict
    reason: str
    failure: str | None = None
    retry_after: float | None = None  # what the provider asked us to wait, if it said

    @property
    def health(self) -> CallResult:
        """What the answer says about the provider (for its breaker)."""
        if self.verdict in (Verdict.TRANSIENT, Verdict.DEFERRED):
            return CallResult.FAILURE
        if self.verdict is Verdict.MISCONFIGURED:
            return CallResult.MISCONFIGURED
        return CallResult.SUCCESS


class Provider(Protocol[J_contra]):
    """Sends one job and classifies the answer. It never retries by itself and never raises for
    an answer of the provider (a timeout or a refused connection is a TRANSIENT answer); an
    exception means a bug, which the sender logs and treats as TRANSIENT."""

    @property
    def name(self) -> str:
        """The provider's label in the ledger, metrics and logs."""
        ...

    @property
    def deadline(self) -> float:
        """The longest one `send` may take, in seconds, once it has its place."""
        ...

    async def send(self, job: J_contra) -> Answer: ...


@dataclass
class Gate(Generic[J]):
    """A provider behind its concurrency limit and, optionally, its circuit breaker."""

    provider: Provider[J]
    limiter: FairLimiter
    breaker: CircuitBreaker | None = None

    @property
    def name(self) -> str:
        return self.provider.name


class ChannelSpec(Protocol[J]):
    """What makes a sender a push sender or an e-mail sender."""

    @property
    def channel(self) -> Channel: ...

    def gate_for(self, job: J) -> Gate[J] | None:
        """The provider that serves `job`, or None if none is configured for it."""
        ...

    def unsupported(self, job: J) -> str:
        """Why nobody serves `job` (a reason code)."""
        ...

    def ledger_columns(self, job: J) -> Mapping[str, Any]:
        """The sender's own columns of the job's ledger row."""
        ...

    def gone_failures(self) -> frozenset[str]:
        """Ledger failure codes of GONE answers (the others are REJECTED)."""
        ...

    def events_for_failure(self, job: J, failure: str, reason: str) -> tuple[Event, ...]:
        """Events besides the report for a job that ended failed (e.g. a dead push token's
        `DeviceInvalidated`); published with the report (at once, each with its confirm), and
        again with it, with the same ids, if it goes out again."""
        ...

    def settings_hint(self, provider: str) -> str:
        """The settings an operator checks when `provider` refuses our credentials."""
        ...


class SendMetrics(Protocol):
    def count(self, provider: str, outcome: str) -> None:
        """One job ended this attempt with `outcome` (an `Outcome.label`)."""
        ...

    def observe_send(self, provider: str, seconds: float) -> None:
        """One provider call took `seconds`, whatever its answer."""
        ...


# --- what happens to a job --------------------------------------------------------------------


class Lease(Enum):
    NONE = "none"  # this worker holds nothing of the job's row
    SEND = "send"  # claimed to send: finish (final) or release (transient) it
    REPORT = "report"  # claimed to publish the events of a final row that never went out


@dataclass(frozen=True)
class Outcome:
    """How one job ends this attempt: `status` (final, with `failure` and `reason`) to record,
    the `report` and other `events` to publish, and `error`, its part in how the delivery ends.
    `label` is its metric outcome."""

    label: str
    lease: Lease = Lease.NONE
    # False: the provider was not called after all (its breaker refused the claimed job).
    attempted: bool = True
    status: DeliveryStatus | None = None
    failure: str | None = None
    reason: str | None = None
    report: DeliveryReported | None = None
    events: tuple[Event, ...] = ()
    error: ItemError | None = None


def report_for(
    channel: Channel, job: SendJob, outcome: DeliveryOutcome, reason: str | None = None
) -> DeliveryReported:
    return DeliveryReported(
        event_id=uuid.uuid5(REPORT_NAMESPACE, f"{job.notification_id}:report:{outcome}"),
        notification_id=job.notification_id,
        message_id=job.message_id,
        recipient_id=job.recipient_id,
        channel=channel,
        outcome=outcome,
        reason=reason,
        trigger=job.trigger,
    )


def refused(channel: Channel, reason: str) -> PermanentError:
    return PermanentError(f"{channel} refused: {reason}")


def outcome_of_answer(
    spec: ChannelSpec[J],
    job: J,
    answer: Answer,
    *,
    breaker_retry_in: float | None = None,
) -> Outcome:
    """A claimed job's provider answer → what to record, publish and raise.

    `breaker_retry_in`: how long the provider's breaker stays open after this answer; a
    configuration problem waits at least that long (it opened the breaker).
    """
    channel = spec.channel
    reason = answer.reason
    match answer.verdict:
        case Verdict.ACCEPTED:
            return Outcome(
                "delivered",
                Lease.SEND,
                status=DeliveryStatus.DELIVERED,
                report=report_for(channel, job, DeliveryOutcome.DELIVERED),
            )
        case Verdict.GONE | Verdict.REJECTED:
            failure = answer.failure or str(answer.verdict)
            return Outcome(
                failure,
                Lease.SEND,
                status=DeliveryStatus.FAILED,
                failure=failure,
                reason=reason,
                report=report_for(channel, job, DeliveryOutcome.FAILED, reason),
                events=spec.events_for_failure(job, failure, reason),
                error=None if answer.verdict is Verdict.GONE else refused(channel, reason),
            )
        case Verdict.MISCONFIGURED:
            # Our credentials or permissions, not this job: it waits for the fix (no attempt
            # spent) instead of burning its retries.
            waits = [w for w in (answer.retry_after, breaker_retry_in) if w]
            return Outcome(
                "misconfigured",
                Lease.SEND,
                reason=reason,
                error=DeferredError(
                    f"{reason} (provider configuration)", retry_after=max(waits, default=None)
                ),
            )
        case Verdict.DEFERRED:
            return Outcome(
                "deferred",
                Lease.SEND,
                reason=reason,
                error=DeferredError(reason, retry_after=answer.retry_after),
            )
        case Verdict.TRANSIENT:
            return Outcome(
                "retry",
                Lease.SEND,
                reason=reason,
                error=RetryableError(reason, retry_after=answer.retry_after),
            )


def outcome_of_claim(
    spec: ChannelSpec[J], job: J, claim: AlreadyFinal | Busy, *, now: datetime
) -> Outcome:
    """A job this worker may not send: a copy of one that ended before (a no-op, or its events
    go out again if they had not), or of one another worker holds right now (it comes back when
    that worker's lease would have run out)."""
    channel = spec.channel
    if isinstance(claim, Busy):
        wait = max((claim.lease_expires_at - now).total_seconds(), 0.0)
        return Outcome(
            "in_progress", error=DeferredError("delivery in progress elsewhere", retry_after=wait)
        )
    if claim.reported:
        return Outcome("duplicate")
    # The last attempt recorded the outcome but did not get to publish it: publish it now (this
    # worker holds the lease for that).
    if claim.status is DeliveryStatus.DELIVERED:
        return Outcome(
            "duplicate", Lease.REPORT, report=report_for(channel, job, DeliveryOutcome.DELIVERED)
        )
    failure = claim.failure or "failed"
    reason = claim.reason or "failed"
    gone = failure in spec.gone_failures()
    return Outcome(
        "duplicate",
        Lease.REPORT,
        report=report_for(channel, job, DeliveryOutcome.FAILED, reason),
        events=spec.events_for_failure(job, failure, reason),
        error=None if gone else refused(channel, reason),
    )


def outcome_of_refusal(gate: Gate[Any], refusal: Refused, lease: Lease) -> Outcome:
    """The provider's breaker is open: the job waits in the delayed-retry path, unsent, without
    spending an attempt."""
    reason = f"{gate.name} circuit open"
    return Outcome(
        "breaker_open",
        lease,
        attempted=False,
        reason=reason,
        error=DeferredError(reason, retry_after=refusal.retry_after),
    )


def outcome_unsupported(spec: ChannelSpec[J], job: J) -> Outcome:
    """Nobody serves the job (no provider configured for its platform): reported failed and
    dead-lettered at once, without a ledger row, so that the job replayed from the dead-letter
    queue once a provider is configured is sent as usual."""
    reason = spec.unsupported(job)
    return Outcome(
        "unsupported",
        reason=reason,
        report=report_for(spec.channel, job, DeliveryOutcome.FAILED, reason),
        error=refused(spec.channel, reason),
    )


# --- the workflow -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SenderTuning:
    """How the stages batch (see `MicroBatcher`), how long a lease lasts between renewals, and
    how many jobs the worker holds at once (`JobBudget`; the urgent lane's count but never
    wait)."""

    max_jobs_per_batch: int = 1000
    concurrent_batches: int = 2
    linger: float = DEFAULT_LINGER
    lease: timedelta = timedelta(seconds=5)
    # At least one delivery's worth (`DELIVERY_MAX_JOBS` makes sure), or a delivery that big
    # would never fit.
    max_jobs_held: int = 1000

    @property
    def renew_every(self) -> float:
        """How often the leases held are renewed, and how old one is when it is: a lease is
        never older than two of these (two fifths of it) while its worker lives."""
        return self.lease.total_seconds() / 5


@dataclass
class _Settling(Generic[J]):
    job: J
    provider: str
    attempt: int
    outcome: Outcome


@dataclass(frozen=True)
class _Step(Generic[J]):
    """Where the claim stage left a job: to be sent through `gate` (attempt `attempt`), or
    ended with `outcome`. `provider` labels its metrics and logs."""

    provider: str
    outcome: Outcome | None = None
    gate: Gate[J] | None = None
    attempt: int = 0


@dataclass(frozen=True)
class _JobResult:
    """How one job ended (`error`: its part in how its delivery ends; None: done)."""

    error: ItemError | None


@dataclass
class _Leases:
    """The leases this worker holds, by the `claimed_at` they carry in the ledger."""

    by_id: dict[uuid.UUID, datetime] = field(default_factory=dict)

    def hold(self, ids: Sequence[uuid.UUID], claimed_at: datetime) -> None:
        for notification_id in ids:
            self.by_id[notification_id] = claimed_at

    def drop(self, ids: Sequence[uuid.UUID]) -> None:
        for notification_id in ids:
            self.by_id.pop(notification_id, None)

    def older_than(self, moment: datetime) -> list[uuid.UUID]:
        return [
            notification_id
            for notification_id, claimed_at in self.by_id.items()
            if claimed_at <= moment
        ]


class Sender(Generic[J]):
    """The workflow of one sender service (see the module docstring)."""

    def __init__(
        self,
        *,
        spec: ChannelSpec[J],
        ledger: DeliveryLedger,
        publishers: Mapping[str, RabbitPublisher],
        publish_timeout: float,
        metrics: SendMetrics,
        tuning: SenderTuning = SenderTuning(),
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.spec = spec
        self.ledger = ledger
        self.publishers = publishers
        self.publish_timeout = publish_timeout
        self.metrics = metrics
        self.tuning = tuning
        self.clock = clock
        self.logger = logging.getLogger(f"herald.{spec.channel}")
        self._claims: MicroBatcher[list[J], list[_Step[J]]] = MicroBatcher(
            self._claim,
            name=f"{spec.channel}-claims",
            max_size=tuning.max_jobs_per_batch,
            max_concurrent=tuning.concurrent_batches,
            linger=tuning.linger,
            size=len,
        )
        self._settles: MicroBatcher[_Settling[J], ItemError | None] = MicroBatcher(
            self._settle,
            name=f"{spec.channel}-settles",
            max_size=tuning.max_jobs_per_batch,
            max_concurrent=tuning.concurrent_batches,
            linger=tuning.linger,
        )
        self._held = JobBudget(tuning.max_jobs_held)
        self._leases = _Leases()
        self._work: set[asyncio.Future[ItemError | None]] = set()
        self._renewing: asyncio.Task[None] | None = None

    # -- entry points ------------------------------------------------------------------------

    def export_gauges(self, registry: CollectorRegistry) -> None:
        """The job budget's state, read at each scrape: the jobs held (claimed or about to be,
        up to DELIVERY_MAX_JOBS, urgent ones past it) and the deliveries waiting for room."""
        Gauge(
            "herald_sender_jobs_held",
            "Jobs this sender holds (claimed, waiting for the provider or being sent).",
            registry=registry,
        ).set_function(lambda: self._held.in_use)
        Gauge(
            "herald_sender_deliveries_waiting",
            "Deliveries waiting, unclaimed, for room under DELIVERY_MAX_JOBS.",
            registry=registry,
        ).set_function(lambda: self._held.waiting)

    async def deliver(self, jobs: Sequence[J], *, quiet: bool = False) -> None:
        """Deliver the jobs of one delivery, and raise how it ends (nothing: ack it). `quiet`:
        the router decided them in a quiet pipeline, so their claim does not wait for company."""
        unique = list({job.notification_id: job for job in jobs}.values())
        # Waiting here holds nothing yet: a handler cancelled meanwhile leaves no trace.
        await self._held.acquire(len(unique), urgent=any(job.urgent for job in unique))
        work = asyncio.ensure_future(self._deliver(unique, quiet=quiet))
        self._work.add(work)
        work.add_done_callback(self._work.discard)
        # Shielded: a cancelled handler leaves its jobs' work running to its end (see above).
        error = await asyncio.shield(work)
        if error is not None:
            raise error

    async def report_given_up(self, jobs: Sequence[J], *, correlation_id: str | None) -> None:
        """For a delivery out of retries: report its jobs failed, so the router does not keep
        them pending. Those delivered before are reported too: the router never lets a failure
        overwrite a delivery. Their ledger rows stay as they are, so a delivery replayed from
        the dead-letter queue sends the unsent ones (and reports them delivered) as usual."""
        channel = self.spec.channel
        reports = [
            report_for(channel, job, DeliveryOutcome.FAILED, RETRIES_EXHAUSTED) for job in jobs
        ]
        await publish_events(
            reports_events(reports),
            self.publishers,
            timeout=self.publish_timeout,
            correlation_id=correlation_id,
        )

    async def aclose(self, timeout: float = 30.0) -> None:
        """At shutdown, once no delivery comes in any more: let the work in progress end (its
        provider calls are bounded by their deadlines), then drop the leases still held, so the
        redelivered copies need not wait for them to run out."""
        if self._work:
            await asyncio.wait(set(self._work), timeout=timeout)
        if self._renewing is not None:
            self._renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewing
        ids = list(self._leases.by_id)
        try:
            await self.ledger.abandon_many(ids, reason="send interrupted", now=self.clock())
        except Exception:
            self.logger.warning("%s.abandon_failed notifications=%d", self.spec.channel, len(ids))
        self._leases.drop(ids)

    # -- the stages ----------------------------------------------------------------------------

    async def _deliver(self, jobs: list[J], *, quiet: bool) -> ItemError | None:
        # A delivery of the urgent lane (DMs, personal mentions) is claimed in the next batch.
        try:
            steps = await self._claims.submit(
                jobs, urgent=any(job.urgent for job in jobs), linger=not quiet
            )
        except BaseException:
            self._held.release(len(jobs))
            raise
        # Each job's own error comes back as a value; an exception raised is the ledger or the
        # broker failing, which brings the whole delivery back.
        results = await asyncio.gather(
            *(self._one(job, step) for job, step in zip(jobs, steps, strict=True)),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return batch_error(
            result.error for result in results if not isinstance(result, BaseException)
        )

    async def _one(self, job: J, step: _Step[J]) -> _JobResult:
        try:
            outcome = step.outcome if step.gate is None else await self._send(job, step.gate)
            if outcome is None:
                raise RuntimeError("a claim step has a gate or an outcome")
            error = await self._settles.submit(_Settling(job, step.provider, step.attempt, outcome))
            return _JobResult(error)
        finally:
            self._held.release()

    async def _claim(self, deliveries: list[list[J]]) -> list[list[_Step[J]]]:
        """Stage 1 for every job of `deliveries` at once: one claim statement per provider."""
        now = self.clock()
        steps: dict[uuid.UUID, _Step[J]] = {}
        owner: dict[uuid.UUID, int] = {}  # the delivery whose copy of a job goes ahead
        to_claim: dict[int, tuple[Gate[J], list[J]]] = {}
        for index, jobs in enumerate(deliveries):
            for job in jobs:
                if job.notification_id in owner:
                    continue
                owner[job.notification_id] = index
                gate = self.spec.gate_for(job)
                if gate is None:
                    steps[job.notification_id] = _Step(
                        UNSUPPORTED, outcome_unsupported(self.spec, job)
                    )
                elif gate.breaker is not None and gate.breaker.retry_in() > 0:
                    # While the breaker refuses, the job is not even claimed.
                    refusal = Refused(gate.breaker.retry_in())
                    steps[job.notification_id] = _Step(
                        gate.name, outcome_of_refusal(gate, refusal, Lease.NONE)
                    )
                else:
                    to_claim.setdefault(id(gate), (gate, []))[1].append(job)
        for gate, jobs in to_claim.values():
            claims = await self.ledger.claim_many(
                jobs,
                provider=gate.name,
                now=now,
                lease=self.tuning.lease,
                extra=self.spec.ledger_columns,
            )
            held = []
            for job in jobs:
                claim = claims[job.notification_id]
                if isinstance(claim, Claimed):
                    steps[job.notification_id] = _Step(gate.name, gate=gate, attempt=claim.attempt)
                    held.append(job.notification_id)
                else:
                    outcome = outcome_of_claim(self.spec, job, claim, now=now)
                    steps[job.notification_id] = _Step(gate.name, outcome)
                    if outcome.lease is Lease.REPORT:
                        held.append(job.notification_id)
            self._leases.hold(held, now)
        if self._leases.by_id and self._renewing is None:
            self._renewing = asyncio.get_running_loop().create_task(self._renew_leases())
        return [
            [
                steps[job.notification_id]
                if owner[job.notification_id] == index
                else self._second_copy(steps[job.notification_id])
                for job in jobs
            ]
            for index, jobs in enumerate(deliveries)
        ]

    def _second_copy(self, first: _Step[J]) -> _Step[J]:
        """A job that two deliveries of one batch carry: the first copy goes ahead, this one
        waits as a copy of a job in progress does. If the first copy holds nothing (the job
        ended before, is another worker's, or waits for its provider's breaker), nothing is in
        progress here: this one ends the same way."""
        if first.outcome is not None and first.outcome.lease is Lease.NONE:
            return first
        wait = self.tuning.lease.total_seconds()
        error = DeferredError("delivery in progress elsewhere", retry_after=wait)
        return _Step(first.provider, Outcome("in_progress", error=error))

    async def _send(self, job: J, gate: Gate[J]) -> Outcome:
        """Stage 2: one provider call, once the job has its place."""
        # A DM or a personal mention gets the next free place, ahead of room chatter.
        await gate.limiter.acquire(job.message_id, urgent=job.urgent)
        try:
            admission: Admitted | Refused = (
                gate.breaker.admit() if gate.breaker is not None else Admitted()
            )
            if isinstance(admission, Refused):
                return outcome_of_refusal(gate, admission, Lease.SEND)
            answer: Answer | None = None
            try:
                answer = await self._call(gate.provider, job)
            finally:
                if gate.breaker is not None:
                    if answer is None:  # cancelled: a probe's turn goes to the next job
                        gate.breaker.abandon(admission)
                    else:
                        gate.breaker.record(admission, answer.health)
            retry_in = gate.breaker.retry_in() if gate.breaker is not None else None
            return outcome_of_answer(self.spec, job, answer, breaker_retry_in=retry_in)
        finally:
            gate.limiter.release()

    async def _call(self, provider: Provider[J], job: J) -> Answer:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(provider.deadline):
                return await provider.send(job)
        except TimeoutError:
            return Answer(Verdict.TRANSIENT, f"{provider.name} deadline exceeded")
        except Exception as exc:
            # A bug rather than an answer. Raised, it would take the outcomes of the delivery's
            # other jobs with it; as a transient answer (deferred, if it says a dependency is
            # unreachable) its claim is handed back and the others are reported. Described
            # without its text, which may quote an address.
            self.logger.error(
                "%s.provider_error notification_id=%s provider=%s error=%s",
                self.spec.channel,
                job.notification_id,
                provider.name,
                describe_error(exc),
            )
            verdict = Verdict.DEFERRED if is_deferred(exc) else Verdict.TRANSIENT
            return Answer(verdict, f"{provider.name} error ({type(exc).__name__})")
        finally:
            self.metrics.observe_send(provider.name, time.perf_counter() - started)

    async def _settle(self, items: list[_Settling[J]]) -> list[ItemError | None]:
        """Stage 3 for every job of `items` at once."""
        held = [item.job.notification_id for item in items if item.outcome.lease is not Lease.NONE]
        try:
            taken_over = await self._record_and_report(items)
        finally:
            # Settled, or failed on the way: either way no longer renewed (a lease left in the
            # ledger runs out, and the retry takes the job over then).
            self._leases.drop(held)
        for item in items:
            if item.job.notification_id in taken_over:
                item.outcome = self._taken_over(item.outcome)
            self.metrics.count(item.provider, item.outcome.label)
            self._log(item)
        return [item.outcome.error for item in items]

    def _taken_over(self, outcome: Outcome) -> Outcome:
        """A job whose lease ran out while this worker sent it (its renewals failed: the
        database was out of reach, or the process stalled) and that another worker claimed:
        the ledger kept the new owner's row, and the new owner reports it. This copy comes back
        later (deferred, no attempt spent) and finds it final."""
        wait = self.tuning.lease.total_seconds()
        return Outcome(
            "taken_over",
            reason=outcome.reason,
            error=DeferredError("delivery taken over by another worker", retry_after=wait),
        )

    async def _record_and_report(self, items: list[_Settling[J]]) -> set[uuid.UUID]:
        """Record, publish and mark reported; returns the jobs whose outcome was not recorded
        because another worker holds them now (nothing is published for those)."""
        now = self.clock()
        finals: dict[tuple[DeliveryStatus, str | None, str | None], list[uuid.UUID]] = {}
        released: dict[tuple[str, bool], list[uuid.UUID]] = {}
        for item in items:
            outcome, notification_id = item.outcome, item.job.notification_id
            if outcome.lease is Lease.SEND:
                if outcome.status is not None:
                    key = (outcome.status, outcome.failure, outcome.reason)
                    finals.setdefault(key, []).append(notification_id)
                else:
                    why = outcome.reason or "transient failure"
                    released.setdefault((why, outcome.attempted), []).append(notification_id)
        taken_over: set[uuid.UUID] = set()
        for (status, failure, reason), ids in finals.items():
            recorded = await self.ledger.finish_many(
                ids, status=status, failure=failure, reason=reason, now=now
            )
            taken_over.update(set(ids) - recorded)
        for (why, attempted), ids in released.items():
            await self._release(ids, why, now, attempted=attempted)
        reported: list[uuid.UUID] = []
        events: list[Event] = []
        reports: list[DeliveryReported] = []
        for item in items:
            outcome, notification_id = item.outcome, item.job.notification_id
            if outcome.report is None or notification_id in taken_over:
                continue
            reports.append(outcome.report)
            events.extend(outcome.events)
            if outcome.lease is not Lease.NONE:
                reported.append(notification_id)
        try:
            await publish_events(
                [*events, *reports_events(reports)], self.publishers, timeout=self.publish_timeout
            )
        except Exception:
            await self._publishing_failed(reported)
            raise
        await self.ledger.mark_reported_many(reported, now=self.clock())
        return taken_over

    # -- helpers -------------------------------------------------------------------------------

    async def _release(
        self, ids: list[uuid.UUID], reason: str, now: datetime, *, attempted: bool
    ) -> None:
        """Best effort: hand the claims back after a transient failure, so the retry can claim
        at once (else it waits for the leases to run out)."""
        try:
            await self.ledger.release_many(ids, reason=reason, now=now, attempted=attempted)
        except Exception:
            self.logger.warning(
                "%s.release_failed notifications=%d", self.spec.channel, len(ids), exc_info=True
            )

    async def _publishing_failed(self, ids: list[uuid.UUID]) -> None:
        """Best effort: let the retry publish the events at once (else it waits for the
        leases)."""
        try:
            await self.ledger.unclaim_many(ids, now=self.clock())
        except Exception:
            self.logger.warning(
                "%s.unclaim_failed notifications=%d", self.spec.channel, len(ids), exc_info=True
            )

    async def _renew_leases(self) -> None:
        """While this worker holds leases, move every one older than a fifth of a lease to now,
        so none runs out while its job waits for a place or for its provider."""
        try:
            while True:
                await asyncio.sleep(self.tuning.renew_every)
                now = self.clock()
                stale = now - timedelta(seconds=self.tuning.renew_every)
                ids = self._leases.older_than(stale)
                if not ids:
                    continue
                try:
                    # One statement for all of them, only where this worker still holds the
                    # lease (the ledger's compare-and-set on the owner).
                    await self.ledger.renew_many(ids, now=now)
                except Exception:
                    self.logger.warning(
                        "%s.renew_failed notifications=%d",
                        self.spec.channel,
                        len(ids),
                        exc_info=True,
                    )
                    continue
                # Only those still held: a job may have been settled meanwhile.
                self._leases.hold([i for i in ids if i in self._leases.by_id], now)
        finally:
            self._renewing = None

    def _log(self, item: _Settling[J]) -> None:
        outcome = item.outcome
        level = _LOG_LEVELS.get(outcome.label, logging.WARNING if outcome.error else logging.INFO)
        if not self.logger.isEnabledFor(level):
            return
        hint = (
            " (the provider refuses our credentials: its breaker is open and its jobs wait; "
            f"check {self.spec.settings_hint(item.provider)})"
            if outcome.label == "misconfigured"
            else ""
        )
        self.logger.log(
            level,
            "%s.%s notification_id=%s message_id=%s provider=%s attempt=%d reason=%s%s",
            self.spec.channel,
            outcome.label,
            item.job.notification_id,
            item.job.message_id,
            item.provider,
            item.attempt,
            outcome.reason or "-",
            hint,
        )


# One line per delivered notification would be thousands a second: successes are in the metrics.
_LOG_LEVELS = {
    "delivered": logging.DEBUG,
    "duplicate": logging.INFO,
    "in_progress": logging.INFO,
    "taken_over": logging.WARNING,
    "breaker_open": logging.INFO,
    "misconfigured": logging.ERROR,
}


def subscribe(
    broker: RabbitBroker,
    sender: Sender[J],
    *,
    queue: ConsumerQueue,
    event_type: Any,
    jobs_of: Callable[[Any], list[J]],
    hooks: DeadLetterHooks,
    description: str,
) -> RabbitSubscriber:
    """A sender's one subscriber: each delivery on `queue` (parsed as `event_type`, whose
    `jobs_of` are the jobs) goes to `sender.deliver`; and the queue's dead-letter hook, which
    reports a delivery out of retries failed."""
    subscriber = broker.subscriber(
        queue.queue, EXCHANGE, title=f"{queue.name}:consume", description=description
    )
    parser: TypeAdapter[Any] = TypeAdapter(event_type)

    async def deliver(event: Any) -> None:
        await sender.deliver(jobs_of(event), quiet=decided_when_quiet(event))

    # FastStream parses (and documents) what the handler's annotation says.
    deliver.__annotations__ = {"event": event_type, "return": None}
    subscriber(deliver)

    async def report_given_up(message: StreamMessage[Any], error: str) -> None:
        jobs = jobs_of(parser.validate_json(message.body))
        await sender.report_given_up(jobs, correlation_id=message.correlation_id)

    hooks.register(queue.name, report_given_up)
    return subscriber
