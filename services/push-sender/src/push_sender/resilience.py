"""Bulkheads and circuit breakers: one of each per push provider, so that one provider's trouble
never holds up the others.

Why both, with one consumer per process: in-flight handlers = the channel's prefetch (every
delivery, a batch of up to `MAX_BATCH_SIZE` jobs of one platform, is its own task and sends its
jobs at once), and every handler holds one of those slots until it acks. Without a limit per
provider, a provider that hangs (each send waiting for its deadline) ends up holding every slot,
and FCM batches queue behind stuck APNs batches although FCM is fine.

* The **bulkhead** bounds the sends in flight to one provider (and with it the provider's
  connections). It never makes a job wait for a free place: a job that finds its provider's
  bulkhead full is deferred at once (`DeferredError`, no attempt spent): the rest of its batch is
  sent and the batch comes back for it later, so its prefetch slot is free for the next delivery,
  perhaps for another provider. With its default (the prefetch times `MAX_BATCH_SIZE`) a single
  consumer can never fill it; set it lower per provider to reserve room for the others.
* The **circuit breaker** stops calling a provider that keeps failing: while it is open, jobs
  for that provider are deferred without being sent or claimed, for the rest of the cool-down,
  instead of each one waiting for a timeout and burning an attempt. After the cool-down one
  probe goes through; its answer closes the breaker or opens it again for longer.

Both are plain objects on an injected clock (no I/O, no asyncio): handlers of one process run on
one event loop, so a counter is all a bulkhead needs, and the breaker's decisions are testable
with a table and a fake clock.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum

from push_sender.providers.base import PushProvider, Verdict

logger = logging.getLogger("push_sender.resilience")


class BreakerState(IntEnum):
    """The values of the `herald_push_breaker_state` gauge."""

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


def call_result(verdict: Verdict) -> CallResult:
    match verdict:
        case Verdict.TRANSIENT:
            return CallResult.FAILURE
        case Verdict.MISCONFIGURED:
            return CallResult.MISCONFIGURED
        case Verdict.ACCEPTED | Verdict.TOKEN_INVALID | Verdict.REJECTED:
            return CallResult.SUCCESS


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


class Bulkhead:
    """At most `limit` sends in flight to one provider. `try_enter` never waits (see the module
    docstring for why a job that finds it full is deferred instead)."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("a bulkhead needs room for at least one send")
        self.limit = limit
        self.in_flight = 0

    def try_enter(self) -> bool:
        if self.in_flight >= self.limit:
            return False
        self.in_flight += 1
        return True

    def leave(self) -> None:
        self.in_flight = max(self.in_flight - 1, 0)


class RefusalKind(StrEnum):
    BREAKER_OPEN = "breaker_open"
    BULKHEAD_FULL = "bulkhead_full"


@dataclass(frozen=True)
class Refusal:
    """Why a job may not be sent to its provider now, and when to try again (None: the retry
    mechanism's own delay)."""

    kind: RefusalKind
    reason: str
    retry_after: float | None


@dataclass
class Pass:
    """A place in a provider's bulkhead and the breaker's leave to call; `leave` gives both back
    (once), telling the breaker the call's result if `record` was called."""

    guard: GuardedProvider
    admitted: Admitted
    _recorded: bool = field(default=False, init=False)
    _left: bool = field(default=False, init=False)

    @property
    def probe(self) -> bool:
        return self.admitted.probe

    def record(self, result: CallResult) -> None:
        if self._recorded or self._left:
            return
        self._recorded = True
        self.guard.breaker.record(self.admitted, result)

    def leave(self) -> None:
        if self._left:
            return
        self._left = True
        if not self._recorded:
            self.guard.breaker.abandon(self.admitted)
        self.guard.bulkhead.leave()


@dataclass
class GuardedProvider:
    """One provider behind its own bulkhead and circuit breaker."""

    provider: PushProvider
    bulkhead: Bulkhead
    breaker: CircuitBreaker

    @property
    def name(self) -> str:
        return self.provider.name

    def enter(self) -> Pass | Refusal:
        # The breaker first: while it refuses, a job takes no place in the bulkhead.
        admission = self.breaker.admit()
        if isinstance(admission, Refused):
            return Refusal(
                RefusalKind.BREAKER_OPEN, f"{self.name} circuit open", admission.retry_after
            )
        if not self.bulkhead.try_enter():
            self.breaker.abandon(admission)  # a probe's turn goes to the next job
            return Refusal(RefusalKind.BULKHEAD_FULL, f"{self.name} at its concurrency limit", None)
        return Pass(self, admission)
