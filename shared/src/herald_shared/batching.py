"""Micro-batching: many concurrent callers, one piece of work for all of them.

A consumer holds up to `RABBITMQ_PREFETCH` deliveries at once, each handled by its own task. Done
one by one, each pays a database round trip, a statement and a publish of its own; done
together, a hundred deliveries cost about what one does. `MicroBatcher.submit` hands an item to
the batcher and waits for the result of the batch that took it; the batcher starts a batch as
soon as it has room for one, with everything submitted by then (up to `max_size`), so batches
stay small (one item, no added latency) while the work keeps up, and grow by themselves when it
does not: the busier the process, the cheaper each item.

Each caller still gets its own result, so a delivery is still acked (or retried, or
dead-lettered) on its own, and only after the batch that took it has finished: ack after commit,
as before. A caller that is cancelled (its channel closed) stops waiting, but its item stays in
the batch: the work is done once and recorded, and the redelivered copy finds it done.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

logger = logging.getLogger("herald.batching")

In = TypeVar("In")
Out = TypeVar("Out")


# How long a batch that could start at once waits for company, by default (`BATCH_LINGER`): at
# 1,000 notifications/s on a fast machine the p99 from 201 to push was within 250 ms in 4 runs
# of 4 with 25 ms, 3 of 4 with 10 and 1 of 4 with 2, and each step cut the CPU per notification;
# 50 ms and 100 ms did not pay (docs/performance.md). Urgent items never wait.
DEFAULT_LINGER = 0.025


def _new_future() -> asyncio.Future[Any]:
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    # A caller that stopped waiting never reads its result; nor should asyncio complain of it.
    future.add_done_callback(lambda done: done.cancelled() or done.exception())
    return future


@dataclass
class _Pending(Generic[In, Out]):
    item: In
    size: int
    future: asyncio.Future[Out] = field(default_factory=_new_future)


class MicroBatcher(Generic[In, Out]):
    """Runs `process` on batches of submitted items; `process` returns one result per item, in
    order (an exception fails every item of its batch).

    * `max_size`: the most a batch holds, counted with `size(item)` (e.g. the jobs a delivery
      carries, so that a batch's statements stay bounded however the items are cut);
    * `max_concurrent`: batches in progress at once (more than one lets a batch wait for its
      I/O while the next is built);
    * `linger`: seconds a batch waits for company when it could start at once: a little latency
      for fewer, larger batches at moderate rates (never for an urgent item);
    * `lone_items_linger`: whether an item that came alone (`linger` or more after the one
      before) lingers too. Off where items come one by one and their spacing says how busy
      the pipeline is (the router's chat messages): at a moderate rate a batch that waited
      after a pause would rarely find company, and every wait is latency a user sees. On where
      items come one per upstream batch (the senders' job events) or in bursts (settling,
      reports): their spacing stays the same as the load grows, and at saturation they would
      lose the company that saves their CPU. There, the one who knows that the pipeline is
      quiet can say so item by item (`submit(..., linger=False)`).
    """

    def __init__(
        self,
        process: Callable[[list[In]], Awaitable[Sequence[Out]]],
        *,
        name: str,
        max_size: int,
        max_concurrent: int = 1,
        linger: float = 0.0,
        lone_items_linger: bool = True,
        size: Callable[[In], int] = lambda _: 1,
    ) -> None:
        if max_size < 1 or max_concurrent < 1 or linger < 0:
            raise ValueError("a batcher needs max_size >= 1, max_concurrent >= 1, linger >= 0")
        self._process = process
        self.name = name
        self.max_size = max_size
        self.max_concurrent = max_concurrent
        self.linger = linger
        self.lone_items_linger = lone_items_linger
        self._size = size
        self._pending: deque[_Pending[In, Out]] = deque()
        self._urgent = 0  # how many of the first pending items are urgent
        self._pending_size = 0
        self._running: set[asyncio.Task[None]] = set()
        # The batch of urgent items only, started beyond `max_concurrent` (see `submit`).
        self._urgent_batch: asyncio.Task[None] | None = None
        self._wake: asyncio.TimerHandle | asyncio.Handle | None = None
        self._last_arrival = -math.inf  # the event loop's time of the latest `submit`
        # The latest item does not wait for company: it came alone (`lone_items_linger` off) or
        # was submitted with `linger=False`.
        self._start_soon = False

    @property
    def in_progress(self) -> int:
        """Batches running now."""
        return len(self._running)

    @property
    def waiting(self) -> int:
        """Items submitted and not yet taken by a batch."""
        return len(self._pending)

    async def submit(self, item: In, *, urgent: bool = False, linger: bool = True) -> Out:
        """The result of `item`, once the batch that took it has finished. An `urgent` item goes
        into the next batch, ahead of the others waiting (behind earlier urgent ones); and when
        every batch place is taken, the urgent items waiting start a batch of their own at once,
        beyond `max_concurrent` (one such batch at a time), so that they never wait for a batch
        of the others to finish: a direct message is not held up by a room of a thousand. An
        item with `linger` False starts a batch as soon as there is room for one, with what
        waits then, rather than waiting for company; it keeps its place in the line."""
        pending: _Pending[In, Out] = _Pending(item, max(1, self._size(item)))
        now = asyncio.get_running_loop().time()
        alone = now - self._last_arrival >= self.linger
        self._last_arrival = now
        self._start_soon = not linger or (alone and not self.lone_items_linger)
        if urgent:
            self._pending.insert(self._urgent, pending)
            self._urgent += 1
        else:
            self._pending.append(pending)
        self._pending_size += pending.size
        self._schedule()
        # Shielded: a caller that stops waiting leaves its item in the batch.
        return await asyncio.shield(pending.future)

    async def drain(self) -> None:
        """Wait until every item submitted so far has been processed (at shutdown)."""
        while self._pending or self._running:
            if self._running:
                await asyncio.wait(set(self._running))
            else:
                self._start_batches()
                await asyncio.sleep(0)

    def _schedule(self) -> None:
        if len(self._running) >= self.max_concurrent:
            if self._urgent and self._urgent_batch is None:
                self._urgent_batch = self._start(self._take(urgent_only=True))
            return  # a batch that ends starts the next one
        if self._pending_size >= self.max_size:
            self._cancel_wake()
            self._start_batches()
            return
        # An urgent item does not linger, nor one that should start soon.
        lingers = bool(self.linger) and not self._urgent and not self._start_soon
        if self._wake is None or (not lingers and isinstance(self._wake, asyncio.TimerHandle)):
            # Not at once: the deliveries that arrived with this one are being dispatched in the
            # same turn of the event loop, and should join it.
            self._cancel_wake()
            loop = asyncio.get_running_loop()
            if lingers:
                self._wake = loop.call_later(self.linger, self._woken)
            else:
                self._wake = loop.call_soon(self._woken)

    def _woken(self) -> None:
        self._wake = None
        self._start_batches()

    def _cancel_wake(self) -> None:
        if self._wake is not None:
            self._wake.cancel()
            self._wake = None

    def _start_batches(self) -> None:
        while self._pending and len(self._running) < self.max_concurrent:
            self._start(self._take(urgent_only=False))

    def _take(self, *, urgent_only: bool) -> list[_Pending[In, Out]]:
        """The next batch's items, from the front (where the urgent ones wait)."""
        batch: list[_Pending[In, Out]] = []
        taken = 0
        while (
            self._pending
            and (not batch or taken + self._pending[0].size <= self.max_size)
            and (self._urgent or not urgent_only)
        ):
            pending = self._pending.popleft()
            self._urgent = max(self._urgent - 1, 0)
            taken += pending.size
            batch.append(pending)
        self._pending_size -= taken
        return batch

    def _start(self, batch: list[_Pending[In, Out]]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(self._run(batch), name=self.name)
        self._running.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        if task is self._urgent_batch:
            self._urgent_batch = None
        if self._pending:
            self._schedule()

    async def _run(self, batch: list[_Pending[In, Out]]) -> None:
        try:
            results = await self._process([pending.item for pending in batch])
            if len(results) != len(batch):
                raise RuntimeError(
                    f"{self.name}: {len(results)} results for a batch of {len(batch)}"
                )
        except BaseException as exc:
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for pending, result in zip(batch, results, strict=True):
            if not pending.future.done():
                pending.future.set_result(result)
