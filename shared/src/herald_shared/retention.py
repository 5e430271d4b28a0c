"""Retention: a periodic task that deletes what is older than a service keeps
(`NOTIFICATION_RETENTION_DAYS`), in bounded batches, each its own short transaction, until a
batch comes back short: no long lock, and a table that grew while the task was down is worked
off a batch at a time.

Each service hands it its own deletions (`Prune`: one batch of one table, returning how many
rows went). Several replicas may run it at once: a row is deleted once, whoever gets it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime, timedelta

from herald_shared.events import utc_now
from herald_shared.periodic import PeriodicTask

logger = logging.getLogger("herald.retention")

# One batch of one table: delete up to `batch` rows older than `before`; how many went.
Prune = Callable[[datetime, int], Awaitable[int]]
Clock = Callable[[], datetime]


class RetentionTask:
    def __init__(
        self,
        prunes: Mapping[str, Prune],
        *,
        keep: timedelta,
        interval: float,
        batch: int = 1000,
        name: str,
        clock: Clock = utc_now,
    ) -> None:
        self.keep = keep
        self._prunes = prunes
        self._batch = batch
        self._clock = clock
        self._loop = PeriodicTask(
            self.prune_once,
            interval=interval,
            name=name,
            logger=logger,
            failure="herald.retention.prune_failed",
        )

    async def prune_once(self) -> dict[str, int]:
        """One pass over every table, batch after batch; how many rows each lost."""
        before = self._clock() - self.keep
        deleted: dict[str, int] = {}
        for table, prune in self._prunes.items():
            total = 0
            while (count := await prune(before, self._batch)) > 0:
                total += count
                if count < self._batch:
                    break
            deleted[table] = total
        if any(deleted.values()):
            logger.info(
                "herald.retention.pruned %s",
                " ".join(f"{table}={count}" for table, count in deleted.items()),
            )
        return deleted

    @property
    def running(self) -> bool:
        return self._loop.running

    def start(self) -> None:
        self._loop.start()

    async def stop(self, timeout: float = 5.0) -> None:
        await self._loop.stop(timeout)
