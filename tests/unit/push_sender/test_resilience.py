"""The circuit breaker and the bulkhead as plain objects on a fake clock: each row of a table is a
script of calls and their results, and what the breaker must say after each step."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from push_sender.providers import Verdict
from push_sender.resilience import (
    Admitted,
    BreakerPolicy,
    BreakerState,
    Bulkhead,
    CallResult,
    CircuitBreaker,
    GuardedProvider,
    Pass,
    Refusal,
    RefusalKind,
    Refused,
    call_result,
)
from tests.unit.push_sender.support import RecordingProvider

OK, FAIL, MISCONFIGURED = CallResult.SUCCESS, CallResult.FAILURE, CallResult.MISCONFIGURED
CLOSED, HALF_OPEN, OPEN = BreakerState.CLOSED, BreakerState.HALF_OPEN, BreakerState.OPEN
POLICY = BreakerPolicy(
    failures=3, failure_rate=0.5, window=10.0, min_calls=6, cool_down=5.0, max_cool_down=12.0
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def breaker(policy: BreakerPolicy = POLICY) -> tuple[CircuitBreaker, FakeClock, list[str]]:
    clock = FakeClock()
    transitions: list[str] = []
    return (
        CircuitBreaker(
            policy,
            clock=clock,
            on_change=lambda _, old, new: transitions.append(f"{old.label}->{new.label}"),
        ),
        clock,
        transitions,
    )


def call(subject: CircuitBreaker, result: CallResult) -> Admitted:
    admitted = subject.admit()
    assert isinstance(admitted, Admitted), "the breaker refused a call the script expected"
    subject.record(admitted, result)
    return admitted


@pytest.mark.parametrize(
    ("verdict", "result"),
    [
        (Verdict.ACCEPTED, OK),
        (Verdict.TOKEN_INVALID, OK),  # the recipient's fault: the provider works
        (Verdict.REJECTED, OK),  # the message's fault: the provider works
        (Verdict.TRANSIENT, FAIL),
        (Verdict.MISCONFIGURED, MISCONFIGURED),
    ],
)
def test_what_an_answer_says_about_the_provider(verdict: Verdict, result: CallResult) -> None:
    assert call_result(verdict) is result


@dataclass(frozen=True)
class Case:
    results: tuple[CallResult, ...]  # calls made 1 s apart, all admitted
    state: BreakerState
    retry_in: float = 0.0


@pytest.mark.parametrize(
    "case",
    [
        Case((), CLOSED),
        Case((FAIL, FAIL), CLOSED),
        Case((FAIL, FAIL, FAIL), OPEN, retry_in=5.0),  # N consecutive failures
        Case((FAIL, FAIL, OK, FAIL, FAIL), CLOSED),  # a success resets the run
        Case((MISCONFIGURED,), OPEN, retry_in=5.0),  # our credentials: at once
        Case((OK, OK, OK, OK), CLOSED),
        # A failure rate of 50 % over the window, never 3 in a row: open.
        Case((OK, FAIL, OK, FAIL, OK, FAIL), OPEN, retry_in=5.0),
        # Below the minimum number of calls the rate does not count.
        Case((OK, FAIL, OK, FAIL, OK), CLOSED),
        # 2 failures among 6 calls: closed.
        Case((OK, FAIL, OK, OK, FAIL, OK), CLOSED),
    ],
    ids=[
        "nothing",
        "two-failures",
        "three-in-a-row",
        "reset-by-success",
        "misconfigured",
        "successes",
        "failure-rate",
        "too-few-calls",
        "low-rate",
    ],
)
def test_when_the_breaker_opens(case: Case) -> None:
    subject, clock, _ = breaker()
    for result in case.results:
        clock.now += 1
        call(subject, result)
    assert subject.state is case.state
    assert subject.retry_in() == case.retry_in


def test_failures_older_than_the_window_are_forgotten() -> None:
    subject, clock, _ = breaker()
    for result in (OK, FAIL, OK, FAIL, OK):
        clock.now += 1
        call(subject, result)
    clock.now += 20  # the window is 10 s: all of the above are gone
    for result in (FAIL, OK, OK, OK, OK, OK):
        clock.now += 1
        call(subject, result)
    assert subject.state is CLOSED


def test_the_failure_rate_counts_every_call_of_a_busy_second() -> None:
    subject, clock, _ = breaker()
    clock.now = 100.25
    for result in (OK, OK, FAIL) * 3 + (FAIL, OK) * 3:  # 15 calls in one second, 6 failed
        call(subject, result)
    assert subject.state is CLOSED
    for result in (FAIL, OK, FAIL, FAIL, OK, FAIL):  # never three in a row
        call(subject, result)
    assert subject.state is CLOSED  # 10 of 21
    call(subject, FAIL)  # 11 of 22: half of every call of that second failed
    assert subject.state is OPEN


@pytest.mark.parametrize(("later", "state"), [(9.25, OPEN), (10.25, CLOSED)])
def test_a_second_leaves_the_window_once_the_window_has_passed_it(
    later: float, state: BreakerState
) -> None:
    subject, clock, _ = breaker()
    clock.now = 100.25
    for result in (FAIL, OK, FAIL, OK, OK):  # 2 of 5: below the 6 calls the rate needs
        call(subject, result)
    clock.now += later
    for result in (OK, FAIL, FAIL):  # with second 100 still in the window: 4 of 8 failed
        call(subject, result)
    assert subject.state is state


def test_open_refuses_until_the_cool_down_then_lets_one_probe_through() -> None:
    subject, clock, transitions = breaker()
    for _ in range(3):
        call(subject, FAIL)

    clock.now += 2
    assert subject.admit() == Refused(3.0)
    clock.now += 3
    probe = subject.admit()
    assert probe == Admitted(probe=True)
    assert subject.state is HALF_OPEN
    # While the probe is out, nobody else goes.
    assert isinstance(subject.admit(), Refused)

    subject.record(probe, OK)

    assert subject.state is CLOSED
    assert isinstance(subject.admit(), Admitted)
    assert transitions == ["closed->open", "open->half-open", "half-open->closed"]


@pytest.mark.parametrize(
    ("probe_results", "cool_downs"),
    [
        ((FAIL,), (10.0,)),
        ((FAIL, FAIL), (10.0, 12.0)),  # doubled, up to the cap
        ((FAIL, FAIL, FAIL), (10.0, 12.0, 12.0)),
        ((MISCONFIGURED,), (10.0,)),
        ((FAIL, OK), (10.0, 5.0)),  # a success starts again from the first cool-down
    ],
)
def test_a_failed_probe_reopens_for_longer(
    probe_results: tuple[CallResult, ...], cool_downs: tuple[float, ...]
) -> None:
    subject, clock, _ = breaker()
    for _ in range(3):
        call(subject, FAIL)
    seen = []
    for result in probe_results:
        clock.now += subject.retry_in()
        probe = subject.admit()
        assert probe == Admitted(probe=True)
        subject.record(probe, result)
        seen.append(subject.cool_down if subject.state is OPEN else None)
        if subject.state is CLOSED:
            for _ in range(3):
                call(subject, FAIL)
            seen[-1] = subject.cool_down
    assert tuple(seen) == cool_downs


def test_answers_of_calls_made_before_it_opened_change_nothing() -> None:
    subject, clock, _ = breaker()
    early = subject.admit()
    assert isinstance(early, Admitted)
    for _ in range(3):
        call(subject, FAIL)
    subject.record(early, OK)  # a slow call that started while closed
    assert subject.state is OPEN
    clock.now += 5
    probe = subject.admit()
    assert isinstance(probe, Admitted)
    subject.record(early, FAIL)
    assert subject.state is HALF_OPEN  # only the probe decides


def test_an_abandoned_probe_hands_its_turn_to_the_next_call() -> None:
    subject, clock, _ = breaker()
    for _ in range(3):
        call(subject, FAIL)
    clock.now += 5
    probe = subject.admit()
    assert isinstance(probe, Admitted)
    subject.abandon(probe)
    assert subject.admit() == Admitted(probe=True)


def test_the_bulkhead_never_waits() -> None:
    bulkhead = Bulkhead(2)
    assert bulkhead.try_enter()
    assert bulkhead.try_enter()
    assert not bulkhead.try_enter()
    bulkhead.leave()
    assert bulkhead.try_enter()
    assert bulkhead.in_flight == 2
    with pytest.raises(ValueError, match="at least one"):
        Bulkhead(0)


def test_a_guarded_provider_refuses_while_open_or_full_and_frees_its_place() -> None:
    subject, clock, _ = breaker()
    guard = GuardedProvider(RecordingProvider(), Bulkhead(1), subject)

    first = guard.enter()
    assert isinstance(first, Pass)
    full = guard.enter()
    assert isinstance(full, Refusal)
    assert (full.kind, full.retry_after) == (RefusalKind.BULKHEAD_FULL, None)
    first.record(MISCONFIGURED)
    first.leave()
    first.leave()  # once only
    assert guard.bulkhead.in_flight == 0

    refused = guard.enter()
    assert isinstance(refused, Refusal)
    assert (refused.kind, refused.retry_after) == (RefusalKind.BREAKER_OPEN, 5.0)
    assert guard.bulkhead.in_flight == 0  # an open breaker takes no place

    clock.now += 5
    probe = guard.enter()
    assert isinstance(probe, Pass)
    assert probe.probe
    behind = guard.enter()
    assert isinstance(behind, Refusal)
    assert behind.kind is RefusalKind.BREAKER_OPEN
    assert guard.bulkhead.in_flight == 1
    probe.leave()  # no answer (cancelled, or a copy already done): the next call probes
    assert guard.breaker.state is HALF_OPEN
    again = guard.enter()
    assert isinstance(again, Pass)
    assert again.probe
    again.record(OK)
    again.leave()
    assert guard.breaker.state is CLOSED
