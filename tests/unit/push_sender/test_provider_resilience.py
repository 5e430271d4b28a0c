"""Provider per platform, concurrency limits and circuit breakers, wired in the service: the local
FCM server (its real protocol) goes down while a second provider keeps delivering; jobs for the
down provider wait without being sent, claimed or spending an attempt; one probe after the
cool-down brings it back. A busy provider makes its jobs wait for a place, never time out or be
deferred for it, while the other providers go on."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from faststream import TestApp
from faststream.rabbit import TestRabbitBroker

from herald_shared.events import (
    DeliveriesReported,
    DeviceInvalidated,
    Platform,
    PushRequested,
)
from herald_shared.ledger import DeliveryStatus
from herald_shared.retry import DeferredError, PermanentError, RetryableError
from herald_shared.topology import DEVICE_INVALIDATED, PUSH_FAILED
from herald_shared.webpush import DEFAULT_ALLOWED_HOSTS
from push_sender.app import PushService, build_service
from push_sender.providers import FcmProvider, LogProvider, ProviderAnswer, make_providers
from push_sender.settings import (
    ApnsSettings,
    BreakerSettings,
    MaxInFlightSettings,
    PushProviderKind,
    WebPushSettings,
)
from push_sender.tables import Failure
from tests.fakes.apns import FakeApns, device_token
from tests.fakes.fcm import FakeFcm
from tests.fakes.webpush import FakeWebPush
from tests.support.infra import wait_until
from tests.unit.push_sender.support import (
    DEVICE_TOKEN,
    RecordingProvider,
    fcm_settings,
    public_key_of,
    push_job,
    push_jobs,
    send,
    unit_settings,
    webpush_job,
    write_pem_key,
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

    await send(two_providers, android())
    await send(two_providers, iphone())

    assert fcm.send_requests == 1
    assert [job.platform for job in apns.sent] == [Platform.APNS]


async def test_one_provider_down_while_the_other_keeps_delivering(
    two_providers: PushService, fcm: FakeFcm, clock: FakeClock
) -> None:
    apns = two_providers.providers.provider_for(Platform.APNS)
    assert isinstance(apns, RecordingProvider)
    # FCM answers 503 to every request: 3 sends open the breaker, then its first probe fails.
    fcm.fail(DEVICE_TOKEN, 503, "UNAVAILABLE", times=4)
    assert gauge(two_providers, "fcm") == 0

    for _ in range(3):
        with pytest.raises(RetryableError, match="fcm 503 UNAVAILABLE"):
            await send(two_providers, android())
        await send(two_providers, iphone())
    assert fcm.send_requests == 3
    assert gauge(two_providers, "fcm") == 2
    assert gauge(two_providers, "apns") == 0

    # While it is open: FCM jobs wait, unsent and unclaimed; APNs jobs go on.
    clock.now += 10
    waiting = [android() for _ in range(5)]
    for job in waiting:
        with pytest.raises(DeferredError, match="fcm circuit open") as deferred:
            await send(two_providers, job)
        assert deferred.value.retry_after == pytest.approx(COOL_DOWN - 10)
        assert await two_providers.sender.ledger.get(job.notification_id) is None  # nothing leased
        await send(two_providers, iphone())
    assert fcm.send_requests == 3
    assert len(apns.sent) == 8
    assert pushes(two_providers, "fcm", "breaker_open") == 5
    assert pushes(two_providers, "apns", "delivered") == 8
    readiness = two_providers.providers.describe()
    assert readiness["providers"]["fcm"] == {
        "state": "open",
        "in_flight": 0,
        "waiting": 0,
        "retry_in": 20.0,
    }
    assert readiness["providers"]["apns"]["state"] == "closed"
    assert readiness["degraded"] == ["fcm"]

    # After the cool-down one probe goes through; FCM is still down: open again, for longer.
    clock.now += 20
    with pytest.raises(RetryableError):
        await send(two_providers, waiting[0])
    assert fcm.send_requests == 4
    with pytest.raises(DeferredError) as deferred:
        await send(two_providers, waiting[1])
    assert deferred.value.retry_after == pytest.approx(2 * COOL_DOWN)

    # FCM is back: the next probe closes the breaker, and every waiting job is delivered once.
    clock.now += 2 * COOL_DOWN
    for job in waiting:
        await send(two_providers, job)
    assert gauge(two_providers, "fcm") == 0
    assert len(fcm.messages_to(DEVICE_TOKEN)) == 5
    for job in waiting[1:]:  # deferred four times, never claimed: this was their first attempt
        entry = await two_providers.sender.ledger.get(job.notification_id)
        assert entry is not None
        assert (entry.status, entry.attempts) == (DeliveryStatus.DELIVERED, 1)


async def test_a_configuration_error_opens_the_breaker_at_once_and_burns_no_retry(
    two_providers: PushService, fcm: FakeFcm, caplog: pytest.LogCaptureFixture
) -> None:
    fcm.fail(DEVICE_TOKEN, 403, "PERMISSION_DENIED", times=1)
    job = android()

    with pytest.raises(DeferredError, match="provider configuration") as deferred:
        await send(two_providers, job)

    assert deferred.value.retry_after == pytest.approx(COOL_DOWN)
    assert gauge(two_providers, "fcm") == 2
    entry = await two_providers.sender.ledger.get(job.notification_id)
    assert entry is not None
    assert entry.status is DeliveryStatus.RETRYING  # released: nothing stays leased
    [loud] = [r for r in caplog.records if "push.misconfigured" in r.getMessage()]
    assert loud.levelno == logging.ERROR
    assert "FCM_CREDENTIALS_FILE" in loud.getMessage()

    with pytest.raises(DeferredError, match="circuit open"):
        await send(two_providers, android())
    assert fcm.send_requests == 1
    await send(two_providers, iphone())


async def test_dead_tokens_and_refused_pushes_never_open_the_breaker(
    two_providers: PushService, fcm: FakeFcm
) -> None:
    fcm.fail(DEVICE_TOKEN, 404, "UNREGISTERED", times=5)
    for _ in range(5):
        await send(two_providers, android())
    fcm.fail(DEVICE_TOKEN, 400, "INVALID_ARGUMENT", times=5)
    for _ in range(5):
        with pytest.raises(PermanentError):
            await send(two_providers, android())

    assert gauge(two_providers, "fcm") == 0
    await send(two_providers, android())
    assert len(fcm.accepted) == 1


def published(service: PushService, routing_key: str) -> list[dict[str, Any]]:
    return [call.args[0] for call in service.publishers[routing_key].mock.call_args_list]


async def assert_refused_for_good(service: PushService, job: PushRequested, reason: str) -> None:
    """`job` failed for good with `reason`: dead-lettered, recorded and reported failed, its
    device kept (nothing on device.invalidated)."""
    with pytest.raises(PermanentError, match=reason):
        await send(service, job)
    entry = await service.sender.ledger.get(job.notification_id)
    assert entry is not None
    assert (entry.status, entry.failure, entry.reason) == (
        DeliveryStatus.FAILED,
        Failure.REJECTED,
        reason,
    )
    reported = [
        (item.notification_id, item.outcome, item.reason)
        for body in published(service, PUSH_FAILED)
        for item in DeliveriesReported.model_validate(body).reports
    ]
    assert (job.notification_id, "failed", reason) in reported
    assert published(service, DEVICE_INVALIDATED) == []


async def test_a_token_of_another_firebase_project_fails_its_push_and_never_opens_the_breaker(
    two_providers: PushService, fcm: FakeFcm
) -> None:
    """A user registers a token of their own Firebase project: FCM answers 403
    SENDER_ID_MISMATCH. That push fails for good; the breaker, and every other device, are
    untouched, and the device is not invalidated (a wrong project setting would give every
    device this answer)."""
    foreign = f"{DEVICE_TOKEN}-of-another-project"
    fcm.fail(foreign, 403, "SENDER_ID_MISMATCH")

    for _ in range(5):  # more than PUSH_BREAKER_FAILURES (3 here)
        job = push_job(platform=Platform.FCM, token=foreign)
        await assert_refused_for_good(two_providers, job, "fcm 403 SENDER_ID_MISMATCH")
        assert gauge(two_providers, "fcm") == 0
        await send(two_providers, android())  # everyone else's pushes still go out

    assert len(fcm.messages_to(DEVICE_TOKEN)) == 5
    assert pushes(two_providers, "fcm", "rejected") == 5
    assert pushes(two_providers, "fcm", "breaker_open") == 0
    assert pushes(two_providers, "fcm", "misconfigured") == 0
    # Replayed from the dead-letter queue: final already, FCM is not asked again.
    await send(two_providers, job)
    assert fcm.send_requests == 10


async def start_apns(
    stack: AsyncExitStack,
    tmp_path: Path,
    sqlite_url: str,
    apns: FakeApns,
    apns_key: Path,
    *,
    topic: str | None = None,
) -> PushService:
    """The live APNs provider against the local APNs server (HTTP/2); breakers open after 3
    failures."""
    settings = unit_settings(
        tmp_path,
        sqlite_url,
        push_provider=PushProviderKind.LIVE,
        apns=ApnsSettings(
            key_file=apns_key,
            key_id=apns.key_id,
            team_id=apns.team_id,
            topic=topic or apns.topic,
            base_url=apns.base_url,
            timeout=10.0,
        ),
        breaker=BreakerSettings(failures=3, cool_down=COOL_DOWN, max_cool_down=300),
    )
    return await start(stack, build_service(settings))


@pytest.mark.parametrize("mistake", ["topic of another app", "base url of the other environment"])
async def test_an_apns_setting_that_fails_every_token_deletes_no_device_and_never_opens_the_breaker(
    sqlite_url: str,
    tmp_path: Path,
    apns: FakeApns,
    apns_key: Path,
    stack: AsyncExitStack,
    mistake: str,
) -> None:
    """APNS_TOPIC naming another app of the team (the key signs for all of them): APNs answers
    400 DeviceTokenNotForTopic for every token (the local server's own check). APNS_BASE_URL of
    the other environment: 400 BadDeviceToken for every token (scripted: the local server has one
    environment). Each push fails for good; no device is invalidated (every iOS device would be
    deleted), and the breaker stays closed."""
    if mistake == "topic of another app":
        service = await start_apns(
            stack, tmp_path, sqlite_url, apns, apns_key, topic="chat.herald.other"
        )
        reason = "apns 400 DeviceTokenNotForTopic"
    else:
        service = await start_apns(stack, tmp_path, sqlite_url, apns, apns_key)
        reason = "apns 400 BadDeviceToken"

    for _ in range(5):  # more than PUSH_BREAKER_FAILURES (3 here)
        token = device_token()
        if reason.endswith("BadDeviceToken"):
            apns.fail(token, 400, "BadDeviceToken")
        job = push_job(platform=Platform.APNS, token=token)
        await assert_refused_for_good(service, job, reason)
        assert gauge(service, "apns") == 0

    assert apns.requests == 5
    assert apns.accepted == []
    assert pushes(service, "apns", "rejected") == 5
    assert pushes(service, "apns", "misconfigured") == 0


async def test_an_unregistered_apns_token_invalidates_its_device(
    sqlite_url: str,
    tmp_path: Path,
    apns: FakeApns,
    apns_key: Path,
    stack: AsyncExitStack,
) -> None:
    """410 Unregistered is only ever about one device: that device is invalidated."""
    service = await start_apns(stack, tmp_path, sqlite_url, apns, apns_key)
    token = device_token()
    apns.fail(token, 410, "Unregistered")
    job = push_job(platform=Platform.APNS, token=token)

    await send(service, job)

    entry = await service.sender.ledger.get(job.notification_id)
    assert entry is not None
    assert (entry.status, entry.failure) == (DeliveryStatus.FAILED, Failure.TOKEN_INVALID)
    [invalidated] = [
        DeviceInvalidated.model_validate(body) for body in published(service, DEVICE_INVALIDATED)
    ]
    assert (invalidated.user_id, invalidated.device_id, invalidated.reason) == (
        job.recipient_id,
        job.device_id,
        "apns 410 Unregistered",
    )
    assert gauge(service, "apns") == 0


@pytest.fixture
def web_push() -> Iterator[FakeWebPush]:
    with FakeWebPush() as fake:
        yield fake


@pytest.fixture
async def browsers(
    sqlite_url: str, tmp_path: Path, web_push: FakeWebPush, stack: AsyncExitStack
) -> PushService:
    """The live Web Push provider against the local push service; breakers open after 3
    failures."""
    key = tmp_path / "vapid.pem"
    write_pem_key(key)
    settings = unit_settings(
        tmp_path,
        sqlite_url,
        push_provider=PushProviderKind.LIVE,
        webpush=WebPushSettings(
            vapid_private_key_file=key,
            vapid_subject="mailto:push-admin@herald.test",
            allowed_hosts=(*DEFAULT_ALLOWED_HOSTS, web_push.host),
            timeout=2.0,
        ),
        breaker=BreakerSettings(failures=3, cool_down=COOL_DOWN, max_cool_down=300),
    )
    return await start(stack, build_service(settings))


@pytest.mark.parametrize("status", [403, 401])
async def test_a_subscription_made_with_another_key_fails_its_push_and_never_opens_the_breaker(
    browsers: PushService, web_push: FakeWebPush, status: int
) -> None:
    """A user registers a subscription made with another application server key: the push
    service refuses our VAPID key for it, with RFC 8292's 403 (or 401, as Mozilla's autopush
    does). That push fails for good; the breaker, and every other browser, are untouched, and
    the subscription is not invalidated (a wrong VAPID key would give every one this answer)."""
    if status == 403:  # the local push service checks the key, as RFC 8292 says
        other_key = ec.generate_private_key(ec.SECP256R1())
        foreign = web_push.subscribe(application_server_key=public_key_of(other_key))
    else:  # autopush's answer to the same mismatch (errno 109), scripted
        foreign = web_push.subscribe()
        web_push.fail(foreign, 401)
    healthy = web_push.subscribe()

    for _ in range(5):  # more than PUSH_BREAKER_FAILURES (3 here)
        job = webpush_job(foreign)
        await assert_refused_for_good(browsers, job, f"webpush {status}")
        assert gauge(browsers, "webpush") == 0
        await send(browsers, webpush_job(healthy))  # everyone else's pushes still go out

    assert len(web_push.received_by(healthy)) == 5
    assert web_push.received_by(foreign) == []
    assert pushes(browsers, "webpush", "rejected") == 5
    assert pushes(browsers, "webpush", "breaker_open") == 0
    if status == 403:
        assert web_push.refusals == ["vapid: key differs from the subscription's"] * 5


async def test_a_busy_provider_makes_its_jobs_wait_for_a_place_while_the_others_go_on(
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
    first = asyncio.create_task(send(service, iphone()))
    await asyncio.wait_for(calling.wait(), timeout=5)

    waiting_job = iphone()
    waiting = asyncio.create_task(send(service, waiting_job))

    async def queued() -> bool:
        return bool(service.providers.describe()["providers"]["apns"]["waiting"] == 1)

    await wait_until(queued)
    # Claimed and waiting for the place (neither deferred nor sent)…
    entry = await service.sender.ledger.get(waiting_job.notification_id)
    assert entry is not None
    assert entry.status is DeliveryStatus.SENDING
    assert len(stuck.sent) == 1
    assert service.providers.describe()["providers"]["apns"]["in_flight"] == 1
    await send(service, android())  # …while FCM does not wait for APNs

    answer.set()
    await asyncio.wait_for(asyncio.gather(first, waiting), timeout=5)
    assert [job.notification_id for job in stuck.sent][1] == waiting_job.notification_id
    assert pushes(service, "apns", "delivered") == 2
    for outcome in ("deferred", "retry", "breaker_open", "in_progress"):
        assert pushes(service, "apns", outcome) == 0
    assert service.providers.describe()["providers"]["apns"] == {
        "state": "closed",
        "in_flight": 0,
        "waiting": 0,
    }


async def test_a_jobs_deadline_starts_once_it_has_its_place(
    sqlite_url: str, tmp_path: Path, stack: AsyncExitStack
) -> None:
    """PUSH_MAX_IN_FLIGHT_FCM=1 and a provider that takes a tenth of its deadline per push:
    the last of twelve pushes waits longer than the deadline in all, yet no push times out, is
    deferred or is sent twice."""

    class SlowFcm(RecordingProvider):
        name = "fcm"
        deadline = 1.0

        def __init__(self) -> None:
            super().__init__()
            self.in_flight = 0
            self.most_in_flight = 0

        async def send(self, job: PushRequested) -> ProviderAnswer:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            try:
                await asyncio.sleep(self.deadline / 10)  # the provider's latency
                return await super().send(job)
            finally:
                self.in_flight -= 1

    settings = unit_settings(
        tmp_path,
        sqlite_url,
        push_provider=PushProviderKind.LIVE,
        max_in_flight=MaxInFlightSettings(fcm=1),
    )
    slow = SlowFcm()
    service = await start(stack, build_service(settings, providers={Platform.FCM: slow}))
    fan_out, direct = push_jobs(11), push_jobs(1)

    await asyncio.wait_for(
        asyncio.gather(send(service, *fan_out), send(service, *direct)), timeout=10
    )

    assert sorted(job.notification_id for job in slow.sent) == sorted(
        job.notification_id for job in (*fan_out, *direct)
    )
    assert slow.most_in_flight == 1
    assert pushes(service, "fcm", "delivered") == 12
    for outcome in ("retry", "deferred", "breaker_open", "in_progress"):
        assert pushes(service, "fcm", outcome) == 0
    for job in (*fan_out, *direct):
        entry = await service.sender.ledger.get(job.notification_id)
        assert entry is not None
        assert (entry.status, entry.attempts) == (DeliveryStatus.DELIVERED, 1)
    # The direct message took its turn among the fan-out's pushes, not after all of them.
    sent = [job.notification_id for job in slow.sent]
    assert sent.index(direct[0].notification_id) <= 2
    assert service.providers.describe()["providers"]["fcm"]["in_flight"] == 0


async def test_a_half_open_breaker_lets_one_probe_of_a_delivery_through(
    two_providers: PushService, fcm: FakeFcm, clock: FakeClock
) -> None:
    done, probe, *deferred_jobs = batch = push_jobs(4)
    await send(two_providers, done)  # delivered before the outage
    fcm.fail(DEVICE_TOKEN, 503, "UNAVAILABLE", times=3)
    with pytest.raises(RetryableError, match="fcm 503 UNAVAILABLE"):
        await send(two_providers, *push_jobs(3))  # three failures at once: the breaker opens
    assert gauge(two_providers, "fcm") == 2

    clock.now += COOL_DOWN
    with pytest.raises(DeferredError, match="fcm circuit open") as deferred:
        await send(two_providers, *batch)

    # The job delivered before is a no-op (it takes no turn); the first job to send is the
    # probe, and the others wait for its answer.
    assert deferred.value.retry_after == pytest.approx(COOL_DOWN)
    assert [m["message"]["data"]["notification_id"] for m in fcm.accepted] == [
        str(done.notification_id),
        str(probe.notification_id),
    ]
    assert gauge(two_providers, "fcm") == 0  # the probe closed it
    for job in deferred_jobs:  # not sent, and handed back at once for the retry
        entry = await two_providers.sender.ledger.get(job.notification_id)
        assert entry is not None
        assert (entry.status, entry.reason) == (DeliveryStatus.RETRYING, "fcm circuit open")
    assert pushes(two_providers, "fcm", "breaker_open") == 2

    await send(two_providers, *batch)  # the deferred delivery comes back
    assert len(fcm.accepted) == 4
    for job in batch:
        entry = await two_providers.sender.ledger.get(job.notification_id)
        assert entry is not None
        assert entry.status is DeliveryStatus.DELIVERED
    assert len(fcm.messages_to(DEVICE_TOKEN)) == 4  # each once


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
        await send(service, *jobs)

    [body] = [call.args[0] for call in service.publishers[PUSH_FAILED].mock.call_args_list]
    report = DeliveriesReported.model_validate(body)
    assert sorted((item.notification_id, item.outcome, item.reason) for item in report.reports) == (
        sorted((job.notification_id, "failed", "unsupported platform apns") for job in jobs)
    )
    # No ledger rows: replayed from the dead-letter queue once APNs is configured, they are sent.
    for job in jobs:
        assert await service.sender.ledger.get(job.notification_id) is None
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
        await send(service, job)

    log = (tmp_path / "pushes.jsonl").read_text()
    assert all(str(job.notification_id) in log for job in jobs)
    assert len(service.providers.gates) == 1
    assert service.providers.unsupported_platforms == ()
