"""What keeps one provider's trouble from becoming everybody's: a circuit breaker and a fair
concurrency limit per provider (`herald_shared.sending` puts each provider behind both).

* The **concurrency limit** (`FairLimiter`) bounds the calls in flight to one provider, and with
  them its connections. A job waits for a place before its deadline starts, so a provider that is
  merely busy makes jobs wait, never time out and be sent again. Places go round-robin by key (the
  message): a message to a thousand members takes turns with a direct message instead of holding
  every place until its fan-out is done.
* The **circuit breaker** stops calling a provider that keeps failing: while it is open, jobs for
  that provider are deferred without being sent, for the rest of the cool-down, instead of each
  one waiting for a timeout and burning an attempt. After the cool-down one probe goes through;
  its answer closes the breaker or opens it again for longer.

Both are plain objects on one event loop (the breaker on an injected clock, so its decisions are
testable with a table and a fake clock).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum

logger = logging.getLogger("herald.resilience")


class BreakerState(IntEnum):
    """The values of a breaker-state gauge (push-sender's `herald_push_breaker_state`)."""

    CLOSED = 0  # calls go through
    HALF_OPEN = 1  # one probe is allowed through; its answer decides
    OPEN = 2  # no calls until the cool-down has passed

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")


class CallResult(StrEnum):
    """What one provider call says about the provider (not about the push)."""

    # The provider answered: it accepted the push, or refused this token or this push (the
    # recipient's or the message's fault, never the provider's).
    SUCCESS = "success"
    FAILURE = "failure"  # unreachable, overloaded, throttling, timed out
    MISCONFIGURED = "misconfigured"  # our credentials or permissions: no call can succeed


@dataclass(frozen=True)
class BreakerPolicy:
    # Consecutive failures that open the breaker.
    failures: int = 5
    # …or this share of failures among the calls of the last `window` seconds, once there were
    # at least `min_calls` of them (a provider failing every other call is not healthy either).
    failure_rate: float = 0.5
    window: float = 60.0
    min_calls: int = 20
    # Seconds the breaker stays open the first time; each failed probe multiplies it by
    # `growth`, up to `max_cool_down`. A successful probe starts again from `cool_down`.
    cool_down: float = 30.0
    max_cool_down: float = 600.0
    growth: float = 2.0


@dataclass
class _Second:
    """The calls a breaker saw in one second of its clock, and how many of them failed."""

    second: int
    calls: int = 0
    failures: int = 0


@dataclass(frozen=True)
class Admitted:
    """A call may go ahead. `probe`: it is the one call of a half-open breaker."""

    probe: bool = False


@dataclass(frozen=True)
class Refused:
    """No call now: try again in `retry_after` seconds."""

    retry_after: float


Transition = Callable[["CircuitBreaker", BreakerState, BreakerState], None]


class CircuitBreaker:
    """closed → (failures) → open → (cool-down passed, next call) → half-open → (probe's answer)
    → closed, or open again with a longer cool-down.

    Only calls admitted while closed, and the probe, count: the answer of a call that started
    before the breaker opened is old news. `on_change(breaker, old, new)` is told of every
    transition.
    """

    def __init__(
        self,
        policy: BreakerPolicy,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_change: Transition | None = None,
    ) -> None:
        self.policy = policy
        self._clock = clock
        self._on_change = on_change
        self._state = BreakerState.CLOSED
        self._cool_down = policy.cool_down
        self._open_until = 0.0
        self._consecutive = 0
        # The calls of the last `window` seconds (closed only), counted per second of the clock:
        # memory and time per call stay constant whatever the rate (thousands of pushes a
        # second would otherwise be a deque of every call, summed on every answer).
        self._recent: deque[_Second] = deque()
        self._recent_calls = 0
        self._recent_failures = 0
        self._probing = False

    @property
    def state(self) -> BreakerState:
        return self._state

    @property
    def cool_down(self) -> float:
        """The cool-down of the current (or next) opening."""
        return self._cool_down

    def retry_in(self) -> float:
        """Seconds until an open breaker lets a probe through (0 when it is not open)."""
        if self._state is not BreakerState.OPEN:
            return 0.0
        return max(self._open_until - self._clock(), 0.0)

    def admit(self) -> Admitted | Refused:
        if self._state is BreakerState.CLOSED:
            return Admitted()
        if self._state is BreakerState.OPEN:
            remaining = self._open_until - self._clock()
            if remaining > 0:
                return Refused(remaining)
            self._set_state(BreakerState.HALF_OPEN)
        if self._probing:
            # The probe is out; its answer comes within the provider's deadline.
            return Refused(self.policy.cool_down)
        self._probing = True
        return Admitted(probe=True)

    def record(self, admitted: Admitted, result: CallResult) -> None:
        """The answer of a call that `admit` let through."""
        now = self._clock()
        if admitted.probe:
            self._probing = False
            if self._state is not BreakerState.HALF_OPEN:
                return
            if result is CallResult.SUCCESS:
                self._close()
            else:
                self._open(
                    now, min(self._cool_down * self.policy.growth, self.policy.max_cool_down)
                )
            return
        if self._state is not BreakerState.CLOSED:
            return
        failed = result is not CallResult.SUCCESS
        self._consecutive = self._consecutive + 1 if failed else 0
        self._count(now, failed=failed)
        if (
            result is CallResult.MISCONFIGURED
            or self._consecutive >= self.policy.failures
            or (
                self._recent_calls >= self.policy.min_calls
                and self._recent_failures >= self.policy.failure_rate * self._recent_calls
            )
        ):
            self._open(now, self.policy.cool_down)

    def _count(self, now: float, *, failed: bool) -> None:
        """Add a call to the window and drop the seconds that left it."""
        while self._recent and self._recent[0].second <= now - self.policy.window:
            gone = self._recent.popleft()
            self._recent_calls -= gone.calls
            self._recent_failures -= gone.failures
        second = math.floor(now)
        if not self._recent or self._recent[-1].second != second:
            self._recent.append(_Second(second))
        self._recent[-1].calls += 1
        self._recent_calls += 1
        if failed:
            self._recent[-1].failures += 1
            self._recent_failures += 1

    def _forget_recent(self) -> None:
        self._recent.clear()
        self._recent_calls = 0
        self._recent_failures = 0

    def abandon(self, admitted: Admitted) -> None:
        """A call that `admit` let through ended without an answer (cancelled, or not sent
        after all): a probe's turn goes to the next call."""
        if admitted.probe:
            self._probing = False

    def _open(self, now: float, cool_down: float) -> None:
        self._cool_down = cool_down
        self._open_until = now + cool_down
        self._consecutive = 0
        self._forget_recent()
        self._set_state(BreakerState.OPEN)

    def _close(self) -> None:
        self._cool_down = self.policy.cool_down
        self._consecutive = 0
        self._forget_recent()
        self._set_state(BreakerState.CLOSED)

    def _set_state(self, state: BreakerState) -> None:
        old, self._state = self._state, state
        if self._on_change is not None and old is not state:
            self._on_change(self, old, state)


class FairLimiter:
    """At most `limit` holders at once. A caller that finds no place waits; places go to the
    urgent callers first, then to the others; within each, to the waiting keys in turn (one
    caller of each key, then the next key), and to the callers of one key in the order they
    came.

    `urgent_reserve` places (a tenth of `limit` by default) are for urgent callers only: the
    others hold at most `limit - urgent_reserve`, so that an urgent caller finds a place free at
    once (and, when `limit` is what the provider serves at a time, the provider a free slot)
    rather than waiting for a normal call to end, however large the normal backlog."""

    def __init__(self, limit: int, *, urgent_reserve: int | None = None) -> None:
        if limit < 1:
            raise ValueError("a limiter needs room for at least one holder")
        reserve = limit // 10 if urgent_reserve is None else urgent_reserve
        if not 0 <= reserve < limit:
            raise ValueError("the urgent reserve leaves no place for the others")
        self.limit = limit
        self.normal_limit = limit - reserve
        self.in_use = 0
        # The urgent waiters' keys, then everyone else's.
        self._lanes: tuple[_Lane, _Lane] = (_Lane(), _Lane())
        self._waiters = 0

    @property
    def waiting(self) -> int:
        return self._waiters

    async def acquire(self, key: Hashable, *, urgent: bool = False) -> None:
        lane = self._lanes[0 if urgent else 1]
        # An urgent caller waits only behind other urgent ones; the others behind anyone.
        free = (
            self.in_use < self.limit and not lane.waiting
            if urgent
            else self.in_use < self.normal_limit and not self._waiters
        )
        if free:
            self.in_use += 1
            lane.last_key = key
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        lane.waiting.setdefault(key, deque()).append(future)
        self._waiters += 1
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # the place came with the cancellation: pass it on
            else:
                self._forget(lane, key, future)
            raise

    def release(self) -> None:
        """Give a place back (once per `acquire` that returned)."""
        for lane in self._lanes:
            if lane is self._lanes[1] and self.in_use > self.normal_limit:
                break  # a reserved place: it waits for an urgent caller
            while lane.waiting:
                waiting = lane.waiting
                if len(waiting) > 1 and next(iter(waiting)) == lane.last_key:
                    waiting.move_to_end(lane.last_key)  # another key's turn first
                key, queue = next(iter(waiting.items()))
                future = queue.popleft()
                self._waiters -= 1
                if queue:
                    waiting.move_to_end(key)  # the next waiter of this key queues behind others
                else:
                    del waiting[key]
                if not future.done():
                    future.set_result(None)  # the place moves to it: in_use stays
                    lane.last_key = key
                    return
        self.in_use = max(self.in_use - 1, 0)

    def _forget(self, lane: _Lane, key: Hashable, future: asyncio.Future[None]) -> None:
        queue = lane.waiting.get(key)
        if queue is not None and future in queue:
            queue.remove(future)
            self._waiters -= 1
            if not queue:
                del lane.waiting[key]


@dataclass
class _Lane:
    """One priority of a `FairLimiter`'s waiters: their queues by key, in turn."""

    waiting: OrderedDict[Hashable, deque[asyncio.Future[None]]] = field(default_factory=OrderedDict)
    last_key: Hashable = None  # the key that got a place last


class JobBudget:
    """At most `limit` jobs held at once by a worker, taken a delivery at a time and given back
    one job at a time. A delivery that does not fit waits, in the order the deliveries came (a
    big one at the head is not overtaken by smaller ones behind it, so it never starves).
    Urgent deliveries never wait: they count, but take their jobs even past `limit`.

    A sender takes its jobs before it claims them, so what waits here holds nothing: no ledger
    row, no lease to renew, no task per job. Without it a sender claims everything its
    prefetch brought in (tens of thousands of jobs in a big room's fan-out) and renews their
    leases while they wait for a place at the provider."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("a budget needs room for at least one job")
        self.limit = limit
        self.in_use = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def waiting(self) -> int:
        """Deliveries waiting for their jobs."""
        return len(self._waiters)

    async def acquire(self, jobs: int, *, urgent: bool = False) -> None:
        """Take `jobs`, waiting until they fit; give each back with `release` as it ends."""
        if urgent or (not self._waiters and self.in_use + jobs <= self.limit):
            self.in_use += jobs
            return
        if jobs > self.limit:
            raise ValueError(f"{jobs} jobs never fit a budget of {self.limit}")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (jobs, future)
        self._waiters.append(entry)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(jobs)  # they came with the cancellation: pass them on
            else:
                self._waiters.remove(entry)
                self._wake()  # the next one may fit now that this one left the head
            raise

    def release(self, jobs: int = 1) -> None:
        self.in_use = max(self.in_use - jobs, 0)
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.in_use + self._waiters[0][0] <= self.limit:
            jobs, future = self._waiters.popleft()
            if not future.done():
                self.in_use += jobs
                future.set_result(None)
