"""The stale-device pruner: a periodic task that removes devices whose client stopped
registering its token (`DEVICE_STALE_AFTER_DAYS`).

Apps register their push token on every start, browsers their subscription on every visit, so a
token not seen again for weeks belongs to an app that was uninstalled or a browser profile that
is gone; providers do not always say so (FCM keeps accepting tokens of inactive devices for a
while). Each removal publishes the user's new snapshot, so the router stops fanning out to it.
Several replicas may prune at once: each batch locks its users first, and a device already gone
is simply not deleted twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from herald_shared.events import utc_now
from herald_shared.retry import describe_error
from message_service import service
from message_service.outbox import Nudge, session_scope

logger = logging.getLogger("message_service.pruning")

Clock = Callable[[], datetime]


class DevicePruner:
    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        nudge: Nudge,
        stale_after: timedelta,
        interval: float,
        clock: Clock = utc_now,
    ) -> None:
        self._sessions = sessions
        self._nudge = nudge
        self.stale_after = stale_after
        self._interval = interval
        self._clock = clock
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def prune_once(self) -> int:
        """One pass; how many users lost a device."""
        async with session_scope(self._sessions, self._nudge) as session:
            affected = await service.prune_stale_devices(
                session=session, now=self._clock(), stale_after=self.stale_after
            )
        if affected:
            logger.info("message_service.devices.pruned users=%d", affected)
        return affected

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        if self.running:
            return
        self._stopping.clear()
        self._task = asyncio.create_task(self.run(), name="message-service-device-pruner")

    async def stop(self, timeout: float = 5.0) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping.set()
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def run(self) -> None:
        """Prune now, then every `interval`; no exception ends it, only `stop()` does."""
        while not self._stopping.is_set():
            try:
                await self.prune_once()
            except Exception as exc:  # a database outage: try again next time
                logger.error("message_service.devices.prune_failed error=%s", describe_error(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=self._interval)
