"""A background task that does one pass of some work now and then every `interval`, until
stopped: the device pruner's and the router's schedule dispatcher's loop.

No exception ends it: a failed pass (a database or broker outage) is logged, without the
exception's text (`describe_error`), and the next pass tries again. `wake(after)` brings the
next pass forward (work known to be due sooner than the next interval). `stop()` ends it
between passes, waiting up to a timeout for the pass in flight before cancelling it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from herald_shared.retry import describe_error


class PeriodicTask:
    def __init__(
        self,
        work: Callable[[], Awaitable[object]],
        *,
        interval: float,
        name: str,
        logger: logging.Logger,
        failure: str,
    ) -> None:
        """`failure`: the log event of a failed pass (e.g. "router.schedule.dispatch_failed")."""
        self._work = work
        self._interval = interval
        self._name = name
        self._logger = logger
        self._failure = failure
        self._stopping = asyncio.Event()
        # Set: the next pass starts now (by `wake`, or by `stop` to end the wait).
        self._nudged = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        if self.running:
            return
        self._stopping.clear()
        self._task = asyncio.create_task(self.run(), name=self._name)

    def wake(self, after: float = 0.0) -> None:
        """A pass `after` seconds from now, if the interval would bring one later (a pass in
        flight then is followed by another at once). A no-op when not running."""
        if not self.running:
            return
        asyncio.get_running_loop().call_later(max(after, 0.0), self._nudged.set)

    async def stop(self, timeout: float = 5.0) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping.set()
        self._nudged.set()
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def run(self) -> None:
        while not self._stopping.is_set():
            self._nudged.clear()
            try:
                await self._work()
            except Exception as exc:
                self._logger.error("%s error=%s", self._failure, describe_error(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._nudged.wait(), timeout=self._interval)
