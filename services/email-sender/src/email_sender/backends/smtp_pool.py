"""A small pool of persistent SMTP connections, reused across e-mails.

A handshake (TCP, EHLO, STARTTLS, AUTH) costs several round trips; under load most of a send was
spent there. The pool keeps up to `pool_size` sessions open and hands the most recently used one
to the next e-mail. A session is not reused when:

* it is no longer connected (the server closed it, or an error closed it);
* it has carried `max_messages_per_connection` messages (servers cap messages per session);
* it has been idle `max_idle` seconds or more (servers drop idle sessions; rather than find out
  half-way through an e-mail, it is closed and a new one opened);
* it has been idle `noop_after_idle` seconds or more and does not answer a NOOP.

No retries and no error classification here: that is the backend's (`smtp.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Literal

import aiosmtplib
from aiosmtplib.typing import Default

from email_sender.settings import SmtpConfig, SmtpTls

logger = logging.getLogger("email_sender.smtp")


class PooledConnection(aiosmtplib.SMTP):
    """One SMTP session of the pool. `data_started` tells whether the DATA of the message being
    sent has begun: a connection lost before it sent nothing, one lost after it may have."""

    def __init__(self, config: SmtpConfig, *, now: float) -> None:
        super().__init__(
            hostname=config.host,
            port=config.port,
            username=config.username,
            password=(config.password.get_secret_value() if config.password is not None else None),
            use_tls=config.tls is SmtpTls.TLS,
            # STARTTLS exactly when asked for: required then, never attempted otherwise.
            start_tls=config.tls is SmtpTls.STARTTLS,
            timeout=config.timeout,
        )
        self.last_used = now
        self.messages = 0
        self.data_started = False

    async def data(
        self,
        message: str | bytes,
        /,
        *,
        timeout: float | Literal[Default.token] | None = Default.token,
    ) -> aiosmtplib.SMTPResponse:
        self.data_started = True
        return await super().data(message, timeout=timeout)


class SmtpPool:
    """Hands out at most `config.pool_size` connections at a time (`slot`, then `checkout` and
    `checkin`). `opened` counts connections opened since start (a metric and a test probe)."""

    def __init__(self, config: SmtpConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.opened = 0
        self._slots = asyncio.Semaphore(config.pool_size)
        self._idle: list[PooledConnection] = []

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """The right to use one connection; waits while all are in use."""
        async with self._slots:
            yield

    async def checkout(self) -> tuple[PooledConnection, bool]:
        """A usable connection (call within `slot`), and whether it was reused."""
        while self._idle:
            connection = self._idle.pop()  # the most recently used: the least likely stale
            if await self._still_usable(connection):
                connection.data_started = False
                return connection, True
        return await self.open(), False

    async def open(self) -> PooledConnection:
        connection = PooledConnection(self.config, now=self.clock())
        try:
            await connection.connect()
        except BaseException:
            connection.close()
            raise
        self.opened += 1
        return connection

    async def checkin(self, connection: PooledConnection, *, reusable: bool) -> None:
        """Give a connection back after a send; `reusable` is False when its state is unknown."""
        connection.last_used = self.clock()
        if not reusable or not connection.is_connected:
            connection.close()
        elif connection.messages >= self.config.max_messages_per_connection:
            await _quit(connection)
        else:
            self._idle.append(connection)

    async def close(self) -> None:
        """Say goodbye to every idle connection (at shutdown)."""
        idle, self._idle = self._idle, []
        await asyncio.gather(*(_quit(connection) for connection in idle))

    async def _still_usable(self, connection: PooledConnection) -> bool:
        idle = self.clock() - connection.last_used
        if (
            not connection.is_connected
            or idle >= self.config.max_idle
            or connection.messages >= self.config.max_messages_per_connection
        ):
            connection.close()
            return False
        if idle >= self.config.noop_after_idle:
            try:
                await connection.noop()
            except (aiosmtplib.SMTPException, OSError):
                logger.info("email.smtp.stale_connection")
                connection.close()
                return False
        return True


async def _quit(connection: PooledConnection) -> None:
    """A polite QUIT, bounded: the connection is closed whatever the server does."""
    try:
        await connection.quit(timeout=min(connection.timeout or 5.0, 5.0))
    except (aiosmtplib.SMTPException, OSError):
        pass
    finally:
        connection.close()
