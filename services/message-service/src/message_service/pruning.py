"""Periodic sweeps that remove devices: the stale-device pruner (`DEVICE_STALE_AFTER_DAYS`) and
the end of expired sessions (`SESSION_TTL`).

Apps register their push token on every start, browsers their subscription on every visit, so a
token not seen again for weeks belongs to an app that was uninstalled or a browser profile that
is gone; providers do not always say so (FCM keeps accepting tokens of inactive devices for a
while). A session not used for `SESSION_TTL` has expired: its token is refused already, and the
sweep removes it with the devices registered under it. Each removal publishes the user's new
snapshot, so the router stops fanning out to them. Several replicas may sweep at once: each
batch locks its users first, and a device already gone is simply not deleted twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from herald_shared.events import utc_now
from herald_shared.periodic import PeriodicTask
from message_service import service
from message_service.outbox import Nudge, session_scope

logger = logging.getLogger("message_service.pruning")

Clock = Callable[[], datetime]


class _Sweep:
    """One pass (`prune_once`) now, then every `interval`, in the background, until `stop()`; a
    failed pass (a database outage) is logged and tried again next time."""

    task_name: str
    failure: str  # the log line of a failed pass

    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        nudge: Nudge,
        interval: float,
        clock: Clock = utc_now,
    ) -> None:
        self._sessions = sessions
        self._nudge = nudge
        self._clock = clock
        self._loop = PeriodicTask(
            self.prune_once,
            interval=interval,
            name=self.task_name,
            logger=logger,
            failure=self.failure,
        )

    async def prune_once(self) -> int:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        return self._loop.running

    def start(self) -> None:
        self._loop.start()

    async def stop(self, timeout: float = 5.0) -> None:
        await self._loop.stop(timeout)


class DevicePruner(_Sweep):
    task_name = "message-service-device-pruner"
    failure = "message_service.devices.prune_failed"

    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        nudge: Nudge,
        stale_after: timedelta,
        interval: float,
        clock: Clock = utc_now,
    ) -> None:
        super().__init__(sessions=sessions, nudge=nudge, interval=interval, clock=clock)
        self.stale_after = stale_after

    async def prune_once(self) -> int:
        """One pass; how many users lost a device."""
        async with session_scope(self._sessions, self._nudge) as session:
            affected = await service.prune_stale_devices(
                session=session, now=self._clock(), stale_after=self.stale_after
            )
        if affected:
            logger.info("message_service.devices.pruned users=%d", affected)
        return affected


class SessionSweeper(_Sweep):
    task_name = "message-service-session-sweeper"
    failure = "message_service.sessions.sweep_failed"

    async def prune_once(self) -> int:
        """One pass; how many sessions ended."""
        async with session_scope(self._sessions, self._nudge) as session:
            ended = await service.end_expired_sessions(session=session, now=self._clock())
        if ended:
            logger.info("message_service.sessions.expired sessions=%d", ended)
        return ended
