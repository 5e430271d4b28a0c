"""Devices per platform (FCM, APNs, Web Push subscriptions behind an endpoint allowlist) and their
lifecycle: refreshed on re-registration, moved to whoever registers them next, pruned when
stale, removed when invalidated; every change published as the user's new snapshot."""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from herald_shared.events import DeviceInvalidated, Platform, WebPushKeys
from herald_shared.topology import DEVICE_INVALIDATED, EXCHANGE
from herald_shared.webpush import DEFAULT_ALLOWED_HOSTS
from message_service import service
from message_service.app import MessageService
from message_service.outbox import session_scope
from message_service.pruning import DevicePruner
from message_service.settings import Settings
from message_service.webpush_keys import decode_base64url, is_p256_public_key
from tests.support.infra import wait_until
from tests.unit.message_service.helpers import (
    Account,
    client_for,
    make_settings,
    register,
    running_app,
    user_updates,
)

FCM_ENDPOINT = "https://fcm.googleapis.com/fcm/send/dXk3Rm9vYmFy:APA91bH-example"
APNS_TOKEN = "3f" * 32


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def browser_keys() -> dict[str, str]:
    """What a browser's PushSubscription.toJSON() holds under `keys`."""
    public = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    )
    return {"p256dh": b64url(public), "auth": b64url(uuid.uuid4().bytes)}


def subscription(endpoint: str = FCM_ENDPOINT, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "platform": "webpush",
        "endpoint": endpoint,
        "expirationTime": None,
        "keys": browser_keys(),
    }
    body.update(overrides)
    return body


async def post_device(
    client: httpx.AsyncClient, headers: dict[str, str], body: dict[str, Any]
) -> httpx.Response:
    return await client.post("/users/me/devices", json=body, headers=headers)


# --- platforms ----------------------------------------------------------------------------------


async def test_a_browser_subscription_is_registered_with_its_keys(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice = await register(client, "alice")
    body = subscription()

    response = await post_device(client, alice.headers, body)

    assert response.status_code == 201, response.text
    assert response.json()["platform"] == "webpush"
    assert FCM_ENDPOINT not in response.text  # the endpoint is a capability: never shown
    listed = await client.get("/users/me/devices", headers=alice.headers)
    assert FCM_ENDPOINT not in listed.text
    [device] = (await user_updates(runtime, alice.id))[-1].devices
    assert device.platform is Platform.WEB_PUSH
    assert device.token == FCM_ENDPOINT
    assert device.web_push_keys == WebPushKeys(**body["keys"])
    assert device.token_updated_at is not None


async def test_apns_tokens_are_64_hex_characters_stored_in_lower_case(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice = await register(client, "alice")

    first = await post_device(
        client, alice.headers, {"platform": "apns", "token": APNS_TOKEN.upper()}
    )
    again = await post_device(client, alice.headers, {"platform": "apns", "token": APNS_TOKEN})

    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["id"] == again.json()["id"]
    [device] = (await user_updates(runtime, alice.id))[-1].devices
    assert (device.platform, device.token, device.web_push_keys) == (
        Platform.APNS,
        APNS_TOKEN,
        None,
    )


def _off_curve_point() -> str:
    return b64url(b"\x04" + b"\x01" * 64)


@pytest.mark.parametrize(
    "body",
    [
        {"platform": "apns", "token": "3f" * 31},
        {"platform": "apns", "token": "zz" * 32},
        {"platform": "apns", "token": "3f" * 32 + "00"},
        {"platform": "webpush", "token": FCM_ENDPOINT},
        {"platform": "webpush", "endpoint": FCM_ENDPOINT},
        subscription(keys={"p256dh": _off_curve_point(), "auth": b64url(bytes(16))}),
        subscription(keys={"p256dh": browser_keys()["p256dh"], "auth": b64url(bytes(8))}),
        subscription(keys={"p256dh": "not base64!", "auth": b64url(bytes(16))}),
        subscription(keys={**browser_keys(), "extra": "x"}),
        subscription(user_id=str(uuid.uuid4())),
        {"platform": "sms", "token": "+15555550100"},
    ],
)
async def test_malformed_devices_are_422(client: httpx.AsyncClient, body: dict[str, Any]) -> None:
    alice = await register(client, "alice")

    response = await post_device(client, alice.headers, body)

    assert response.status_code == 422, response.text


@pytest.mark.parametrize(
    ("endpoint", "reason"),
    [
        ("http://169.254.169.254/latest/meta-data/", "endpoint must be an https URL"),
        ("https://169.254.169.254/latest/meta-data/", "endpoint is not on a known push service"),
        ("https://evil.example/push/1", "endpoint is not on a known push service"),
        ("http://fcm.googleapis.com/fcm/send/x", "endpoint must be an https URL"),
        ("https://fcm.googleapis.com.evil.example/x", "endpoint is not on a known push service"),
        ("https://notify.windows.com/w/?token=x", "endpoint is not on a known push service"),
        ("https://user:pw@fcm.googleapis.com/fcm/send/x", "endpoint must not carry credentials"),
        ("https://fcm.googleapis.com\\@evil.example/x", "endpoint must be a plain https URL"),
        ("http://127.0.0.1:8080/push/1", "endpoint is not on a known push service"),
        ("ftp://fcm.googleapis.com/x", "endpoint must be an https URL"),
    ],
)
async def test_an_endpoint_off_the_allowlist_is_422_with_the_reason(
    client: httpx.AsyncClient, runtime: MessageService, endpoint: str, reason: str
) -> None:
    alice = await register(client, "alice")

    response = await post_device(client, alice.headers, subscription(endpoint))

    assert response.status_code == 422
    assert response.json() == {"detail": reason}
    assert [u.version for u in await user_updates(runtime, alice.id)] == [1]


@pytest.mark.parametrize(
    "endpoint",
    [
        FCM_ENDPOINT,
        "https://updates.push.services.mozilla.com/wpush/v2/gAAAAABk",
        "https://wns2-by3p.notify.windows.com/w/?token=BQYAAAB",
        "https://web.push.apple.com/QGuQyavXutnMH",
    ],
)
async def test_the_real_push_services_are_allowed_by_default(
    client: httpx.AsyncClient, endpoint: str
) -> None:
    alice = await register(client, "alice")

    response = await post_device(client, alice.headers, subscription(endpoint))

    assert response.status_code == 201, response.text


async def test_a_loopback_push_service_is_allowed_only_when_configured(sqlite_url: str) -> None:
    settings = make_settings(
        sqlite_url, webpush_allowed_hosts=(*DEFAULT_ALLOWED_HOSTS, "127.0.0.1")
    )
    async with running_app(settings) as app, client_for(app) as client:
        alice = await register(client, "alice")
        local = await post_device(client, alice.headers, subscription("http://127.0.0.1:9/p/1"))
        public_http = await post_device(
            client, alice.headers, subscription("http://fcm.googleapis.com/fcm/send/x")
        )

    assert local.status_code == 201, local.text
    assert public_http.status_code == 422


def test_settings_read_the_lifecycle_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEVICE_STALE_AFTER_DAYS", "30")
    monkeypatch.setenv("WEBPUSH_ALLOWED_HOSTS", "fcm.googleapis.com, *.Push.Example ,")

    settings = Settings()

    assert settings.device_stale_after_days == 30
    assert settings.webpush_allowed_hosts == ("fcm.googleapis.com", "*.push.example")


def test_defaults_are_sixty_days_and_the_real_push_services(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("DEVICE_STALE_AFTER_DAYS", raising=False)
    monkeypatch.delenv("WEBPUSH_ALLOWED_HOSTS", raising=False)

    settings = Settings()

    assert settings.device_stale_after_days == 60
    assert settings.webpush_allowed_hosts == DEFAULT_ALLOWED_HOSTS


def test_the_p256_check_accepts_real_keys_only() -> None:
    for _ in range(20):
        raw = decode_base64url(browser_keys()["p256dh"])
        assert is_p256_public_key(raw)
        tampered = raw[:-1] + bytes([raw[-1] ^ 1])
        assert not is_p256_public_key(tampered)
    assert not is_p256_public_key(b"\x02" + bytes(64))


# --- refresh and moves --------------------------------------------------------------------------


async def test_registering_again_refreshes_the_time_and_the_keys(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice = await register(client, "alice")
    first = await post_device(client, alice.headers, subscription())
    renewed_keys = browser_keys()

    again = await post_device(client, alice.headers, subscription(keys=renewed_keys))

    assert again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    updates = await user_updates(runtime, alice.id)
    before, after = updates[-2].devices[0], updates[-1].devices[0]
    assert updates[-1].version == updates[-2].version + 1
    assert before.token_updated_at is not None
    assert after.token_updated_at is not None
    assert after.token_updated_at >= before.token_updated_at
    assert after.web_push_keys == WebPushKeys(**renewed_keys)


async def test_a_subscription_registered_by_another_user_moves_to_them(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice = await register(client, "alice")
    bob = await register(client, "bob")
    await post_device(client, alice.headers, subscription())
    bobs_keys = browser_keys()

    moved = await post_device(client, bob.headers, subscription(keys=bobs_keys))

    assert moved.status_code == 201
    assert (await client.get("/users/me/devices", headers=alice.headers)).status_code == 401
    alice_last = (await user_updates(runtime, alice.id))[-1]
    bob_last = (await user_updates(runtime, bob.id))[-1]
    assert (alice_last.version, alice_last.devices) == (3, [])
    [device] = bob_last.devices
    assert (str(device.device_id), device.token) == (moved.json()["id"], FCM_ENDPOINT)
    assert device.web_push_keys == WebPushKeys(**bobs_keys)


async def test_an_apns_token_registered_by_another_user_moves_to_them(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice = await register(client, "alice")
    bob = await register(client, "bob")
    apns = {"platform": "apns", "token": APNS_TOKEN}
    await post_device(client, alice.headers, apns)

    assert (await post_device(client, bob.headers, apns)).status_code == 201

    assert (await user_updates(runtime, alice.id))[-1].devices == []
    assert [d.token for d in (await user_updates(runtime, bob.id))[-1].devices] == [APNS_TOKEN]


async def test_an_invalidated_subscription_is_removed_and_published(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice = await register(client, "alice")
    device_id = (await post_device(client, alice.headers, subscription())).json()["id"]
    event = DeviceInvalidated(user_id=alice.id, device_id=uuid.UUID(device_id), reason="410")

    await runtime.broker.publish(event, exchange=EXCHANGE, routing_key=DEVICE_INVALIDATED)

    assert (await client.get("/users/me/devices", headers=alice.headers)).json() == []
    last = (await user_updates(runtime, alice.id))[-1]
    assert (last.version, last.devices) == (3, [])


# --- pruning ------------------------------------------------------------------------------------


async def register_at(
    runtime: MessageService, account: Account, token: str, at: datetime
) -> uuid.UUID:
    """Register an FCM token as if at `at` (the API always uses the real clock)."""
    async with session_scope(runtime.sessions, runtime.relay.nudge) as session:
        registration = await service.register_device(
            session=session,
            user_id=account.id,
            session_id=account.session_id,
            platform=Platform.FCM,
            token=token,
            max_devices=20,
            now=at,
        )
    return registration.device.id


def pruner_at(runtime: MessageService, now: datetime, *, interval: float = 3600.0) -> DevicePruner:
    return DevicePruner(
        sessions=runtime.sessions,
        nudge=runtime.relay.nudge,
        stale_after=timedelta(days=60),
        interval=interval,
        clock=lambda: now,
    )


def _now() -> datetime:
    """The tests' registrations are stamped from now: the app's own pruner runs at start-up with
    the real clock, and a device stamped months ago could be pruned by it first (a race the
    tests' own pruner, with its injected clock, would then lose)."""
    return datetime.now(UTC)


async def test_devices_not_refreshed_for_the_stale_period_are_pruned(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    start = _now()
    alice = await register(client, "alice")
    bob = await register(client, "bob")
    carol = await register(client, "carol")
    await register_at(runtime, alice, "alice-old", start)
    fresh = await register_at(runtime, alice, "alice-fresh", start + timedelta(days=30))
    await register_at(runtime, bob, "bob-old", start + timedelta(hours=12))
    # Re-registered later: the refresh keeps it.
    await register_at(runtime, carol, "carol-phone", start)
    await register_at(runtime, carol, "carol-phone", start + timedelta(days=40))
    versions = {
        user.id: (await user_updates(runtime, user.id))[-1].version for user in (alice, bob, carol)
    }

    pruned = await pruner_at(runtime, start + timedelta(days=61)).prune_once()

    assert pruned == 2  # alice and bob each lost a device
    alice_last = (await user_updates(runtime, alice.id))[-1]
    bob_last = (await user_updates(runtime, bob.id))[-1]
    assert alice_last.version == versions[alice.id] + 1
    assert [d.device_id for d in alice_last.devices] == [fresh]
    assert (bob_last.version, bob_last.devices) == (versions[bob.id] + 1, [])
    carol_last = (await user_updates(runtime, carol.id))[-1]
    assert carol_last.version == versions[carol.id]  # nothing of carol's was stale
    assert [d.token for d in carol_last.devices] == ["carol-phone"]


async def test_pruning_again_changes_nothing(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    start = _now()
    alice = await register(client, "alice")
    await register_at(runtime, alice, "old", start)
    pruner = pruner_at(runtime, start + timedelta(days=60, seconds=1))

    assert await pruner.prune_once() == 1
    assert await pruner.prune_once() == 0
    assert [u.version for u in await user_updates(runtime, alice.id)] == [1, 2, 3]


async def test_a_device_exactly_at_the_limit_is_kept(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    start = _now()
    alice = await register(client, "alice")
    await register_at(runtime, alice, "edge", start)

    assert await pruner_at(runtime, start + timedelta(days=60)).prune_once() == 0


async def test_the_pruner_runs_periodically_until_stopped(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    start = _now()
    alice = await register(client, "alice")
    now = [start]
    pruner = DevicePruner(
        sessions=runtime.sessions,
        nudge=runtime.relay.nudge,
        stale_after=timedelta(days=60),
        interval=0.05,
        clock=lambda: now[0],
    )

    async def devices_left() -> int:
        return len((await user_updates(runtime, alice.id))[-1].devices)

    async def none_left() -> bool:
        return await devices_left() == 0

    pruner.start()
    try:
        await register_at(runtime, alice, "old", start)
        assert await devices_left() == 1
        now[0] = start + timedelta(days=90)  # the next pass finds it stale
        await wait_until(none_left, timeout=30)
    finally:
        await pruner.stop()
    assert not pruner.running


async def test_the_app_starts_and_stops_its_pruner(runtime: MessageService) -> None:
    assert runtime.pruner.running
    assert runtime.pruner.stale_after == timedelta(days=60)
