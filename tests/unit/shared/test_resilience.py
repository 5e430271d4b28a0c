"""The circuit breaker as a plain object on a fake clock (each row of a table is a script of
calls and their results, and what the breaker must say after each step), and the fair limiter."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from herald_shared.resilience import (
    Admitted,
    BreakerPolicy,
    BreakerState,
    CallResult,
    CircuitBreaker,
    FairLimiter,
    JobBudget,
    Refused,
)
from herald_shared.sending import Answer, Verdict

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
        (Verdict.GONE, OK),  # the recipient's fault: the provider works
        (Verdict.REJECTED, OK),  # the message's fault: the provider works
        (Verdict.TRANSIENT, FAIL),
        (Verdict.DEFERRED, FAIL),
        (Verdict.MISCONFIGURED, MISCONFIGURED),
    ],
)
def test_what_an_answer_says_about_the_provider(verdict: Verdict, result: CallResult) -> None:
    assert Answer(verdict, "reason").health is result


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


async def test_the_limiter_lets_limit_holders_in_and_the_next_when_one_leaves() -> None:
    limiter = FairLimiter(2)
    await limiter.acquire("a")
    await limiter.acquire("a")
    third = asyncio.create_task(limiter.acquire("a"))
    await asyncio.sleep(0)
    assert not third.done()
    assert (limiter.in_use, limiter.waiting) == (2, 1)

    limiter.release()
    await third
    assert (limiter.in_use, limiter.waiting) == (2, 0)
    limiter.release()
    limiter.release()
    assert limiter.in_use == 0
    with pytest.raises(ValueError, match="at least one"):
        FairLimiter(0)


async def test_places_go_round_robin_by_key_and_in_order_within_a_key() -> None:
    limiter = FairLimiter(1)
    await limiter.acquire("first")
    order: list[str] = []

    async def take(key: str, name: str) -> None:
        await limiter.acquire(key)
        order.append(name)
        limiter.release()

    # A big fan-out queues first, then a message of one recipient: it does not wait for all of
    # the big one's places.
    tasks = [asyncio.create_task(take("big", f"big{i}")) for i in range(4)]
    await asyncio.sleep(0)
    tasks.append(asyncio.create_task(take("dm", "dm")))
    await asyncio.sleep(0)
    limiter.release()
    await asyncio.gather(*tasks)

    assert order == ["big0", "dm", "big1", "big2", "big3"]
    assert limiter.in_use == 0


async def test_urgent_callers_get_the_next_places_ahead_of_the_others() -> None:
    limiter = FairLimiter(1)
    await limiter.acquire("chatter")
    order: list[str] = []

    async def take(key: str, name: str, *, urgent: bool = False) -> None:
        await limiter.acquire(key, urgent=urgent)
        order.append(name)
        limiter.release()

    # A backlog of room chatter waits, then two DMs and a mention arrive.
    tasks = [asyncio.create_task(take(f"room{i}", f"room{i}")) for i in range(3)]
    await asyncio.sleep(0)
    for key, name in (("dm1", "dm1a"), ("dm1", "dm1b"), ("mention", "mention")):
        tasks.append(asyncio.create_task(take(key, name, urgent=True)))
    await asyncio.sleep(0)
    limiter.release()
    await asyncio.gather(*tasks)

    # Urgent first, round robin among their keys too; then the backlog in its turn.
    assert order == ["dm1a", "mention", "dm1b", "room0", "room1", "room2"]
    assert (limiter.in_use, limiter.waiting) == (0, 0)


async def test_a_cancelled_urgent_waiter_is_forgotten() -> None:
    limiter = FairLimiter(1)
    await limiter.acquire("a")
    urgent = asyncio.create_task(limiter.acquire("dm", urgent=True))
    normal = asyncio.create_task(limiter.acquire("room"))
    await asyncio.sleep(0)
    urgent.cancel()
    with pytest.raises(asyncio.CancelledError):
        await urgent

    limiter.release()
    await normal

    assert (limiter.in_use, limiter.waiting) == (1, 0)


async def test_a_cancelled_waiter_gives_up_its_turn_and_a_granted_one_passes_it_on() -> None:
    limiter = FairLimiter(1)
    await limiter.acquire("a")
    waiting = asyncio.create_task(limiter.acquire("b"))
    behind = asyncio.create_task(limiter.acquire("c"))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert limiter.waiting == 1

    limiter.release()  # to "c"
    await behind
    granted_then_cancelled = asyncio.create_task(limiter.acquire("d"))
    await asyncio.sleep(0)
    limiter.release()  # the place moves to "d"…
    granted_then_cancelled.cancel()  # …which is cancelled before it runs: passed on, not lost
    with pytest.raises(asyncio.CancelledError):
        await granted_then_cancelled
    assert limiter.in_use == 0


async def test_a_reserve_keeps_places_free_for_urgent_callers_only() -> None:
    limiter = FairLimiter(4, urgent_reserve=1)
    for _ in range(3):
        await limiter.acquire("chatter")
    fourth_normal = asyncio.create_task(limiter.acquire("chatter"))
    await asyncio.sleep(0)

    await asyncio.wait_for(limiter.acquire("dm", urgent=True), timeout=1)  # the reserved place
    assert not fourth_normal.done()  # the others hold 3 of 4 at most
    assert limiter.in_use == 4

    limiter.release()  # the urgent place comes back: still reserved, the normal caller waits
    await asyncio.sleep(0)
    assert not fourth_normal.done()
    assert limiter.in_use == 3
    limiter.release()  # a normal place: it moves to the normal caller
    await asyncio.wait_for(fourth_normal, timeout=1)
    assert limiter.in_use == 3


async def test_an_urgent_caller_waits_only_behind_urgent_ones() -> None:
    limiter = FairLimiter(2, urgent_reserve=1)
    await limiter.acquire("chatter")
    waiting_normal = asyncio.create_task(limiter.acquire("chatter"))
    await asyncio.sleep(0)

    # A normal caller waits (its one place is taken), yet the urgent one gets the reserve.
    await asyncio.wait_for(limiter.acquire("dm", urgent=True), timeout=1)
    assert not waiting_normal.done()
    limiter.release()
    limiter.release()
    await asyncio.wait_for(waiting_normal, timeout=1)


def test_the_default_reserve_is_a_tenth_and_never_all_places() -> None:
    assert FairLimiter(100).normal_limit == 90
    assert FairLimiter(5).normal_limit == 5  # a tenth of 5 places is none
    with pytest.raises(ValueError, match="no place"):
        FairLimiter(3, urgent_reserve=3)


async def test_a_budget_lets_deliveries_in_while_their_jobs_fit_then_in_turn() -> None:
    budget = JobBudget(10)
    await budget.acquire(6)
    big = asyncio.create_task(budget.acquire(8))
    small = asyncio.create_task(budget.acquire(1))  # would fit, but comes after the big one
    await asyncio.sleep(0)
    assert (budget.in_use, budget.waiting) == (6, 2)

    budget.release(3)  # 3 held: still no room for 8
    await asyncio.sleep(0)
    assert not big.done()
    assert not small.done()
    budget.release(3)
    await asyncio.gather(big, small)
    assert (budget.in_use, budget.waiting) == (9, 0)


async def test_urgent_deliveries_never_wait_for_the_budget() -> None:
    budget = JobBudget(2)
    await budget.acquire(2)
    waiting = asyncio.create_task(budget.acquire(1))
    await asyncio.sleep(0)

    await asyncio.wait_for(budget.acquire(3, urgent=True), timeout=1)

    assert (budget.in_use, budget.waiting) == (5, 1)
    budget.release(4)
    await waiting
    assert budget.in_use == 2


async def test_a_cancelled_delivery_leaves_the_queue_and_a_granted_one_passes_its_jobs_on() -> None:
    budget = JobBudget(4)
    await budget.acquire(3)
    head = asyncio.create_task(budget.acquire(4))
    behind = asyncio.create_task(budget.acquire(1))
    await asyncio.sleep(0)
    head.cancel()  # the one that blocked the queue leaves: the one behind it fits at once
    with pytest.raises(asyncio.CancelledError):
        await head
    await asyncio.wait_for(behind, timeout=1)
    assert (budget.in_use, budget.waiting) == (4, 0)

    granted_then_cancelled = asyncio.create_task(budget.acquire(2))
    await asyncio.sleep(0)
    budget.release(2)  # the two move to it…
    granted_then_cancelled.cancel()  # …which is cancelled before it runs: given back, not lost
    with pytest.raises(asyncio.CancelledError):
        await granted_then_cancelled
    assert budget.in_use == 2


def test_a_budget_refuses_what_could_never_fit() -> None:
    with pytest.raises(ValueError, match="at least one"):
        JobBudget(0)
    with pytest.raises(ValueError, match="never fit"):
        asyncio.run(JobBudget(2).acquire(3))
