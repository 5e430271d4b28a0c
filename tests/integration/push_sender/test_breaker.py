"""A provider's circuit breaker on the real broker: while FCM is down, a job waits in the
delayed-retry path as a deferral (no attempt spent), then the probe after the cool-down delivers
it."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from faststream import TestApp

from herald_shared.broker import RabbitSettings
from herald_shared.events import PushRequested
from herald_shared.ledger import DeliveryStatus
from herald_shared.topology import EXCHANGE, PUSH_SEND
from push_sender.app import PushService, build_service
from push_sender.settings import BreakerSettings
from tests.fakes.fcm import FakeFcm
from tests.support.infra import wait_until
from tests.unit.push_sender.support import DEVICE_TOKEN, fcm_settings, push_job


@pytest.fixture
async def service(
    pg_url: str, rabbit_url: str, fcm: FakeFcm, credentials: Path, tmp_path: Path
) -> AsyncIterator[PushService]:
    settings = fcm_settings(
        tmp_path,
        pg_url,
        credentials=credentials,
        base_url=fcm.base_url,
        rabbitmq=RabbitSettings(url=rabbit_url, retry_delays=(0.2, 0.4, 0.8), prefetch=10),
        breaker=BreakerSettings(failures=2, cool_down=2.0, max_cool_down=2.0),
    )
    service = build_service(settings)
    async with TestApp(service.app):
        yield service


async def publish(service: PushService, job: PushRequested) -> None:
    await service.broker.publish(
        job, exchange=EXCHANGE, routing_key=PUSH_SEND, persist=True, message_id=str(job.event_id)
    )


def pushes(service: PushService, outcome: str) -> float:
    labels = {"provider": "fcm", "outcome": outcome}
    return service.registry.get_sample_value("herald_pushes_total", labels) or 0.0


async def test_jobs_wait_without_spending_attempts_while_the_breaker_is_open(
    service: PushService, fcm: FakeFcm, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    fcm.fail(DEVICE_TOKEN, 503, "UNAVAILABLE", times=2)
    opener, waiting = push_job(), push_job()

    await publish(service, opener)  # fails twice (two attempts): the breaker opens

    async def opened() -> bool:
        return pushes(service, "retry") >= 2

    await wait_until(opened, timeout=20)
    await publish(service, waiting)

    async def delivered() -> bool:
        return pushes(service, "delivered") >= 2

    await wait_until(delivered, timeout=30)
    assert pushes(service, "breaker_open") >= 1
    assert fcm.send_requests == 4  # two failures, the probe, the other job: nothing more
    assert pushes(service, "retry") == 2  # the opener's two failures: no attempt spent since
    ledger = service.sender.ledger
    entry = await ledger.get(waiting.notification_id)
    assert entry is not None
    assert entry.status is DeliveryStatus.DELIVERED
    # One attempt: a claim the breaker refused (it came back while the half-open breaker's probe
    # was out) is handed back unsent and its attempt taken back; the retry middleware spent
    # none either, as the deferrals below show.
    assert entry.attempts == 1
    messages = [r.getMessage() for r in caplog.records if r.name == "herald.retry"]
    mine = [m for m in messages if f"message_id={waiting.event_id}" in m]
    assert mine
    assert all("herald.message.deferred" in m for m in mine)
    assert "deferrals=1" in mine[0]
