"""SMTP connection reuse: many e-mails over few connections, and when a connection is replaced.

The fake server counts the sessions clients open (`FakeSmtp.connections`) and the NOOPs it gets.
Idle time is driven by a hand-moved clock, so no test sleeps.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator

import pytest

from email_sender.app import build_service
from email_sender.backends import SmtpBackend
from email_sender.channel import EmailChannel
from email_sender.rendering import EmailRenderer
from email_sender.settings import EmailBackendKind, Settings, SmtpConfig
from herald_shared.broker import RabbitSettings
from herald_shared.retry import DeferredError, RetryableError
from tests.fakes.smtp import FakeSmtp
from tests.support.infra import wait_until
from tests.unit.email_sender import support
from tests.unit.email_sender.support import email_job

BOB = "bob@example.test"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def renderer() -> EmailRenderer:
    return support.renderer()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def backend(smtp: FakeSmtp, clock: Clock) -> AsyncIterator[SmtpBackend]:
    backend = SmtpBackend(
        SmtpConfig(
            host=smtp.host,
            port=smtp.port,
            timeout=5,
            pool_size=3,
            max_messages_per_connection=100,
            max_idle=60,
            noop_after_idle=5,
        ),
        clock=clock,
    )
    yield backend
    await backend.close()


async def all_closed(smtp: FakeSmtp) -> bool:
    return smtp.open_connections == 0


async def send(backend: SmtpBackend, renderer: EmailRenderer, address: str = BOB) -> None:
    job = email_job(notification_id=uuid.uuid4(), to_address=address)
    await backend.send(renderer.render(job), notification_id=job.notification_id)


async def test_many_emails_at_once_share_a_few_connections(
    smtp: FakeSmtp, backend: SmtpBackend, renderer: EmailRenderer
) -> None:
    await asyncio.gather(*(send(backend, renderer) for _ in range(60)))

    assert len(smtp.received) == 60
    assert 1 <= smtp.connections <= 3  # the pool size, not one per e-mail
    assert backend.pool.opened == smtp.connections


async def test_emails_one_after_another_use_one_connection(
    smtp: FakeSmtp, backend: SmtpBackend, renderer: EmailRenderer
) -> None:
    for _ in range(10):
        await send(backend, renderer)

    assert len(smtp.received) == 10
    assert smtp.connections == 1


async def test_a_connection_is_replaced_after_its_message_quota(
    smtp: FakeSmtp, renderer: EmailRenderer
) -> None:
    backend = SmtpBackend(
        SmtpConfig(host=smtp.host, port=smtp.port, timeout=5, max_messages_per_connection=2)
    )
    for _ in range(5):
        await send(backend, renderer)
    await backend.close()

    assert len(smtp.received) == 5
    assert smtp.connections == 3  # 2 + 2 + 1
    await wait_until(lambda: all_closed(smtp), timeout=5)


async def test_a_connection_idle_a_while_is_checked_with_noop_and_reused(
    smtp: FakeSmtp, backend: SmtpBackend, renderer: EmailRenderer, clock: Clock
) -> None:
    await send(backend, renderer)
    clock.now += 4
    await send(backend, renderer)
    assert smtp.noops == 0  # recently used: trusted without a round trip

    clock.now += 10
    await send(backend, renderer)

    assert smtp.noops == 1
    assert smtp.connections == 1
    assert len(smtp.received) == 3


async def test_a_connection_idle_too_long_is_replaced_without_noop(
    smtp: FakeSmtp, backend: SmtpBackend, renderer: EmailRenderer, clock: Clock
) -> None:
    await send(backend, renderer)
    clock.now += 61

    await send(backend, renderer)

    assert smtp.noops == 0
    assert smtp.connections == 2
    assert len(smtp.received) == 2


async def test_a_stale_connection_that_fails_noop_is_replaced(
    smtp: FakeSmtp,
    backend: SmtpBackend,
    renderer: EmailRenderer,
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="email_sender.smtp")
    await send(backend, renderer)
    (connection,) = backend.pool._idle
    # The server's side of the session is gone but the client has not noticed: the NOOP finds it.
    transport = connection.transport
    assert isinstance(transport, asyncio.ReadTransport)
    transport.pause_reading()
    smtp.close_connections()
    await wait_until(lambda: all_closed(smtp), timeout=5)
    transport.resume_reading()
    clock.now += 10

    await send(backend, renderer)

    assert "email.smtp.stale_connection" in caplog.text
    assert smtp.connections == 2
    assert len(smtp.received) == 2


async def test_a_connection_the_server_dropped_while_idle_costs_no_attempt(
    smtp: FakeSmtp, backend: SmtpBackend, renderer: EmailRenderer
) -> None:
    await send(backend, renderer)
    smtp.close_connections()
    await wait_until(lambda: all_closed(smtp), timeout=5)

    await send(backend, renderer)  # no error: a new connection, not a failed attempt

    assert smtp.connections == 2
    assert len(smtp.received) == 2


async def test_a_connection_is_kept_after_a_refusal_but_not_after_421(
    smtp: FakeSmtp, backend: SmtpBackend, renderer: EmailRenderer
) -> None:
    smtp.reply("eve@example.test", 550, "5.1.1 no such user", times=1)
    smtp.reply("dan@example.test", 421, "4.7.0 closing", times=1)

    with pytest.raises(Exception, match="smtp 550"):
        await send(backend, renderer, "eve@example.test")
    await send(backend, renderer)
    assert smtp.connections == 1  # a 5xx ends the transaction (RSET), not the session

    with pytest.raises(RetryableError, match="smtp 421"):
        await send(backend, renderer, "dan@example.test")
    await send(backend, renderer)
    assert smtp.connections == 2  # a 421 closes the session
    assert len(smtp.received) == 2


async def test_a_connection_lost_mid_data_is_a_451_and_not_reused(
    smtp: FakeSmtp, backend: SmtpBackend, renderer: EmailRenderer
) -> None:
    await send(backend, renderer)
    smtp.drop(BOB, times=1)

    with pytest.raises(RetryableError) as raised:
        await send(backend, renderer)  # on the kept connection: DATA began, so no silent resend

    assert raised.value.reason == "smtp 451 connection lost during DATA"
    await send(backend, renderer)
    assert smtp.connections == 2
    assert len(smtp.received) == 2


async def test_waiting_for_a_free_connection_past_the_deadline_is_deferred(
    smtp: FakeSmtp, renderer: EmailRenderer
) -> None:
    backend = SmtpBackend(SmtpConfig(host=smtp.host, port=smtp.port, timeout=0.2, pool_size=1))
    async with backend.pool.slot():  # the only connection, busy
        with pytest.raises(DeferredError, match="smtp connections busy"):
            await send(backend, renderer)
    await backend.close()
    assert smtp.received == []


async def test_close_says_goodbye_to_idle_connections(
    smtp: FakeSmtp, backend: SmtpBackend, renderer: EmailRenderer
) -> None:
    await asyncio.gather(*(send(backend, renderer) for _ in range(6)))
    assert smtp.open_connections >= 1

    await backend.close()

    await wait_until(lambda: all_closed(smtp), timeout=5)


def test_the_pool_size_is_the_e_mails_in_flight_whatever_the_prefetch() -> None:
    """A delivery carries many e-mails: the sends beyond the pool wait for a connection (before
    their deadline starts), so the pool no longer follows the prefetch."""
    assert Settings().smtp.pool_size == 3
    settings = Settings(
        smtp_pool_size=10,
        rabbitmq=RabbitSettings(prefetch=4),
        email_backend=EmailBackendKind.SMTP,
        unsubscribe_secret=support.UNSUBSCRIBE_SECRET,
    )
    assert settings.smtp.pool_size == 10
    assert Settings(smtp_pool_size=2, rabbitmq=RabbitSettings(prefetch=4)).smtp.pool_size == 2

    channel = build_service(settings).sender.spec
    assert isinstance(channel, EmailChannel)
    assert channel.gate.limiter.limit == 10
