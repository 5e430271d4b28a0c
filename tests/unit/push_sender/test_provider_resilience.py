"""Provider per platform, bulkheads and circuit breakers, wired in the service: the local FCM
server (its real protocol) goes down while a second provider keeps delivering; jobs for the down
provider wait without being sent, claimed or spending an attempt; one probe after the cool-down
brings it back."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
from faststream import TestApp
from faststream.rabbit import TestRabbitBroker

from herald_shared.events import DeliveryBatchReported, Platform, PushRequested
from herald_shared.ledger import DeliveryStatus
from herald_shared.retry import DeferredError, PermanentError, RetryableError
from push_sender.app import PushService, build_service
from push_sender.providers import FcmProvider, LogProvider, ProviderAnswer, make_providers
from push_sender.settings import BreakerSettings, MaxInFlightSettings, PushProviderKind
from tests.fakes.fcm import FakeFcm
from tests.unit.push_sender.support import (
    DEVICE_TOKEN,
    RecordingProvider,
    fcm_settings,
    push_job,
    push_jobs,
    send,
    unit_settings,
)

COOL_DOWN = 30.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class ApnsRecorder(RecordingProvider):
    """Stands in for the APNs provider: a second, healthy provider."""

    name = "apns"


@pytest.fixture
async def stack() -> AsyncIterator[AsyncExitStack]:
    async with AsyncExitStack() as stack:
        yield stack


async def start(stack: AsyncExitStack, service: PushService) -> PushService:
    await stack.enter_async_context(TestRabbitBroker(service.broker))
    await stack.enter_async_context(TestApp(service.app))
    return service


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def two_providers(
    sqlite_url: str,
    tmp_path: Path,
    fcm: FakeFcm,
    credentials: Path,
    clock: FakeClock,
    stack: AsyncExitStack,
) -> PushService:
    """FCM (the local server) for Android, a recorder for iOS; breakers open after 3 failures."""
    settings = fcm_settings(
        tmp_path,
        sqlite_url,
        credentials=credentials,
        base_url=fcm.base_url,
        timeout=0.5,
        breaker=BreakerSettings(failures=3, cool_down=COOL_DOWN, max_cool_down=300),
    )
    providers = {**make_providers(settings), Platform.APNS: ApnsRecorder()}
    return await start(stack, build_service(settings, providers=providers, breaker_clock=clock))


def gauge(service: PushService, provider: str) -> float | None:
    return service.registry.get_sample_value("herald_push_breaker_state", {"provider": provider})


def pushes(service: PushService, provider: str, outcome: str) -> float:
    labels = {"provider": provider, "outcome": outcome}
    return service.registry.get_sample_value("herald_pushes_total", labels) or 0.0


def android() -> PushRequested:
    return push_job(platform=Platform.FCM, token=DEVICE_TOKEN)


def iphone() -> PushRequested:
    return push_job(platform=Platform.APNS, token="ab" * 32)


async def test_each_platform_has_its_provider(two_providers: PushService, fcm: FakeFcm) -> None:
    apns = two_providers.providers.provider_for(Platform.APNS)
    assert isinstance(apns, ApnsRecorder)
    assert isinstance(two_providers.providers.provider_for(Platform.FCM), FcmProvider)

    await send(two_providers.deps, android())
    await send(two_providers.deps, iphone())

    assert fcm.send_requests == 1
    assert [job.platform for job in apns.sent] == [Platform.APNS]


async def test_one_provider_down_while_the_other_keeps_delivering(
    two_providers: PushService, fcm: FakeFcm, clock: FakeClock
) -> None:
    deps = two_providers.deps
    apns = two_providers.providers.provider_for(Platform.APNS)
    assert isinstance(apns, RecordingProvider)
    # FCM answers 503 to every request: 3 sends open the breaker, then its first probe fails.
    fcm.fail(DEVICE_TOKEN, 503, "UNAVAILABLE", times=4)
    assert gauge(two_providers, "fcm") == 0

    for _ in range(3):
        with pytest.raises(RetryableError, match="fcm 503 UNAVAILABLE"):
            await send(deps, android())
        await send(deps, iphone())
    assert fcm.send_requests == 3
    assert gauge(two_providers, "fcm") == 2
    assert gauge(two_providers, "apns") == 0

    # While it is open: FCM jobs wait, unsent and unclaimed; APNs jobs go on.
    clock.now += 10
    waiting = [android() for _ in range(5)]
    for job in waiting:
        with pytest.raises(DeferredError, match="fcm circuit open") as deferred:
            await send(deps, job)
        assert deferred.value.retry_after == pytest.approx(COOL_DOWN - 10)
        assert await deps.sender.ledger.get(job.notification_id) is None  # nothing leased
        await send(deps, iphone())
    assert fcm.send_requests == 3
    assert len(apns.sent) == 8
    assert pushes(two_providers, "fcm", "breaker_open") == 5
    assert pushes(two_providers, "apns", "delivered") == 8
    readiness = two_providers.providers.describe()
    assert readiness["providers"]["fcm"] == {"state": "open", "in_flight": 0, "retry_in": 20.0}
    assert readiness["providers"]["apns"]["state"] == "closed"
    assert readiness["degraded"] == ["fcm"]

    # After the cool-down one probe goes through; FCM is still down: open again, for longer.
    clock.now += 20
    with pytest.raises(RetryableError):
        await send(deps, waiting[0])
    assert fcm.send_requests == 4
    with pytest.raises(DeferredError) as deferred:
        await send(deps, waiting[1])
    assert deferred.value.retry_after == pytest.approx(2 * COOL_DOWN)

    # FCM is back: the next probe closes the breaker, and every waiting job is delivered once.
    clock.now += 2 * COOL_DOWN
    for job in waiting:
        await send(deps, job)
    assert gauge(two_providers, "fcm") == 0
    assert len(fcm.messages_to(DEVICE_TOKEN)) == 5
    for job in waiting[1:]:  # deferred four times, never claimed: this was their first attempt
        entry = await deps.sender.ledger.get(job.notification_id)
        assert entry is not None
        assert (entry.status, entry.attempts) == (DeliveryStatus.DELIVERED, 1)


async def test_a_configuration_error_opens_the_breaker_at_once_and_burns_no_retry(
    two_providers: PushService, fcm: FakeFcm, caplog: pytest.LogCaptureFixture
) -> None:
    deps = two_providers.deps
    fcm.fail(DEVICE_TOKEN, 403, "PERMISSION_DENIED", times=1)
    job = android()

    with pytest.raises(DeferredError, match="provider configuration") as deferred:
        await send(deps, job)

    assert deferred.value.retry_after == pytest.approx(COOL_DOWN)
    assert gauge(two_providers, "fcm") == 2
    entry = await deps.sender.ledger.get(job.notification_id)
    assert entry is not None
    assert entry.status is DeliveryStatus.RETRYING  # released: nothing stays leased
    [loud] = [r for r in caplog.records if "push.misconfigured" in r.getMessage()]
    assert loud.levelno == logging.ERROR
    assert "FCM_CREDENTIALS_FILE" in loud.getMessage()

    with pytest.raises(DeferredError, match="circuit open"):
        await send(deps, android())
    assert fcm.send_requests == 1
    await send(deps, iphone())


async def test_dead_tokens_and_refused_pushes_never_open_the_breaker(
    two_providers: PushService, fcm: FakeFcm
) -> None:
    fcm.fail(DEVICE_TOKEN, 404, "UNREGISTERED", times=5)
    for _ in range(5):
        await send(two_providers.deps, android())
    fcm.fail(DEVICE_TOKEN, 400, "INVALID_ARGUMENT", times=5)
    for _ in range(5):
        with pytest.raises(PermanentError):
            await send(two_providers.deps, android())

    assert gauge(two_providers, "fcm") == 0
    await send(two_providers.deps, android())
    assert len(fcm.accepted) == 1


async def test_a_full_bulkhead_defers_at_once_and_leaves_room_for_the_others(
    sqlite_url: str, tmp_path: Path, stack: AsyncExitStack
) -> None:
    calling, answer = asyncio.Event(), asyncio.Event()

    class StuckApns(ApnsRecorder):
        async def send(self, job: PushRequested) -> Any:
            self.sent.append(job)
            calling.set()
            await answer.wait()
            return ProviderAnswer.accepted()

    settings = unit_settings(
        tmp_path,
        sqlite_url,
        push_provider=PushProviderKind.LIVE,
        max_in_flight=MaxInFlightSettings(apns=1),
    )
    log = LogProvider(tmp_path / "pushes.jsonl")
    stuck = StuckApns()
    service = await start(
        stack,
        build_service(settings, providers={Platform.FCM: log, Platform.APNS: stuck}),
    )
    first = asyncio.create_task(send(service.deps, iphone()))
    await asyncio.wait_for(calling.wait(), timeout=5)

    second = iphone()
    with pytest.raises(DeferredError, match="apns at its concurrency limit"):
        await send(service.deps, second)
    assert await service.deps.sender.ledger.get(second.notification_id) is None
    await send(service.deps, android())  # FCM does not wait for APNs

    answer.set()
    await asyncio.wait_for(first, timeout=5)
    await send(service.deps, second)
    assert len(stuck.sent) == 2
    assert pushes(service, "apns", "bulkhead_full") == 1


async def test_a_half_open_breaker_lets_one_probe_of_a_batch_through(
    two_providers: PushService, fcm: FakeFcm, clock: FakeClock
) -> None:
    deps = two_providers.deps
    done, probe, *deferred_jobs = batch = push_jobs(4)
    await send(deps, done)  # delivered before the outage
    fcm.fail(DEVICE_TOKEN, 503, "UNAVAILABLE", times=3)
    with pytest.raises(RetryableError, match="fcm 503 UNAVAILABLE"):
        await send(deps, *push_jobs(3))  # three failures at once: the breaker opens
    assert gauge(two_providers, "fcm") == 2

    clock.now += COOL_DOWN
    with pytest.raises(DeferredError, match="fcm circuit open") as deferred:
        await send(deps, *batch)

    # The job delivered before took the probe's turn first, and gave it to the next one.
    assert deferred.value.retry_after == pytest.approx(COOL_DOWN)
    assert [m["message"]["data"]["notification_id"] for m in fcm.accepted] == [
        str(done.notification_id),
        str(probe.notification_id),
    ]
    assert gauge(two_providers, "fcm") == 0  # the probe closed it
    for job in deferred_jobs:  # neither sent nor claimed
        assert await deps.sender.ledger.get(job.notification_id) is None
    assert pushes(two_providers, "fcm", "breaker_open") == 2

    await send(deps, *batch)  # the deferred batch comes back
    assert len(fcm.accepted) == 4
    for job in batch:
        entry = await deps.sender.ledger.get(job.notification_id)
        assert entry is not None
        assert (entry.status, entry.attempts) == (DeliveryStatus.DELIVERED, 1)


async def test_a_batch_larger_than_the_bulkhead_goes_out_in_parts(
    sqlite_url: str, tmp_path: Path, stack: AsyncExitStack
) -> None:
    settings = unit_settings(
        tmp_path,
        sqlite_url,
        push_provider=PushProviderKind.LIVE,
        max_in_flight=MaxInFlightSettings(apns=2),
    )
    apns = ApnsRecorder()
    service = await start(stack, build_service(settings, providers={Platform.APNS: apns}))
    batch = push_jobs(3, platform=Platform.APNS, token="ab" * 32)

    with pytest.raises(DeferredError, match="apns at its concurrency limit"):
        await send(service.deps, *batch)

    assert [job.notification_id for job in apns.sent] == [job.notification_id for job in batch[:2]]
    assert await service.deps.sender.ledger.get(batch[2].notification_id) is None
    assert service.providers.describe()["providers"]["apns"]["in_flight"] == 0  # places back

    # Its retry: the jobs sent before give their places back to the one still waiting.
    await send(service.deps, *batch)
    assert [job.notification_id for job in apns.sent] == [job.notification_id for job in batch]
    assert pushes(service, "apns", "bulkhead_full") == 1


async def test_a_platform_without_a_provider_is_reported_unsupported(
    sqlite_url: str,
    tmp_path: Path,
    fcm: FakeFcm,
    credentials: Path,
    stack: AsyncExitStack,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    settings = fcm_settings(tmp_path, sqlite_url, credentials=credentials, base_url=fcm.base_url)
    service = await start(stack, build_service(settings))
    assert service.providers.live_platforms == (Platform.FCM,)
    assert any(
        "push.providers live=fcm=fcm unsupported=apns, webpush" in r.getMessage()
        for r in caplog.records
    )
    jobs = push_jobs(2, platform=Platform.APNS, token="ab" * 32)

    with pytest.raises(PermanentError, match="unsupported platform apns"):
        await send(service.deps, *jobs)

    [body] = [call.args[0] for call in service.deps.failed.mock.call_args_list]
    report = DeliveryBatchReported.model_validate(body)
    assert [(item.notification_id, item.outcome, item.reason) for item in report.reports] == [
        (job.notification_id, "failed", "unsupported platform apns") for job in jobs
    ]
    # No ledger rows: replayed from the dead-letter queue once APNs is configured, they are sent.
    for job in jobs:
        assert await service.deps.sender.ledger.get(job.notification_id) is None
    assert (
        service.registry.get_sample_value(
            "herald_pushes_total", {"provider": "none", "outcome": "unsupported"}
        )
        == 2
    )
    assert service.providers.describe()["unsupported_platforms"] == ["apns", "webpush"]


async def test_the_log_provider_takes_every_platform(
    sqlite_url: str, tmp_path: Path, stack: AsyncExitStack
) -> None:
    service = await start(stack, build_service(unit_settings(tmp_path, sqlite_url)))
    jobs = [push_job(platform=platform) for platform in Platform]

    for job in jobs:
        await send(service.deps, job)

    log = (tmp_path / "pushes.jsonl").read_text()
    assert all(str(job.notification_id) in log for job in jobs)
    assert len(service.providers.guards) == 1
    assert service.providers.unsupported_platforms == ()
