"""The APNs adapter against the fake APNs server, which speaks the real protocol: HTTP/2, the
ES256 provider token (signature and claims verified), the headers and payload limits, and every
APNs row of the provider error → action table."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from herald_shared.events import PushRequested, Trigger
from push_sender.providers import ApnsConfigurationError, ApnsProvider, ProviderAnswer, Verdict
from push_sender.providers.apns import (
    MAX_PAYLOAD_BYTES,
    PROVIDER_TOKEN_MAX_AGE,
    build_payload,
    classify,
    encode,
    load_signing_key,
)
from push_sender.settings import ApnsSettings
from tests.fakes.apns import FakeApns, device_token
from tests.support.processes import free_port
from tests.unit.push_sender.support import push_job, recall_job

TOKEN = device_token()


class Clock:
    """The wall clock, shifted by `offset` seconds: lets a test age the provider token without
    waiting, while the fake keeps checking ages against the real time."""

    def __init__(self, offset: float = 0.0) -> None:
        self.offset = offset

    def __call__(self) -> float:
        return time.time() + self.offset


def apns_job(**overrides: Any) -> PushRequested:
    values: dict[str, Any] = {"platform": "apns", "token": TOKEN}
    values.update(overrides)
    return push_job(**values)


@pytest.fixture
async def make_provider(
    apns: FakeApns, apns_key: Path
) -> AsyncIterator[Callable[..., ApnsProvider]]:
    providers: list[ApnsProvider] = []

    def make(*, clock: Callable[[], float] | None = None, **overrides: Any) -> ApnsProvider:
        values: dict[str, Any] = {
            "key_file": apns_key,
            "key_id": apns.key_id,
            "team_id": apns.team_id,
            "topic": apns.topic,
            "base_url": apns.base_url,
            # A bound, not a figure: on CI's busy machine a send once came back without the
            # fake having accepted it, most likely past the 2 s it had then (the send's answer
            # is asserted now, so a repeat will say). The timeout's own test sets 0.3 s.
            "timeout": 10.0,
        }
        values.update(overrides)
        settings = ApnsSettings(**values)
        if clock is None:
            provider = ApnsProvider.from_settings(settings, max_connections=4)
        else:
            assert settings.key_file is not None
            assert settings.key_id is not None
            assert settings.team_id is not None
            assert settings.topic is not None
            provider = ApnsProvider(
                key=load_signing_key(settings.key_file),
                key_id=settings.key_id,
                team_id=settings.team_id,
                topic=settings.topic,
                base_url=settings.base_url,
                timeout=settings.timeout,
                clock=clock,
            )
        providers.append(provider)
        return provider

    yield make
    for provider in providers:
        await provider.aclose()


@pytest.fixture
def provider(make_provider: Callable[..., ApnsProvider]) -> ApnsProvider:
    return make_provider()


# -- accepted: protocol, headers, payload -----------------------------------------------------


async def test_an_accepted_push_goes_over_http2_with_a_signed_provider_token(
    provider: ApnsProvider, apns: FakeApns
) -> None:
    job = apns_job()

    answer = await provider.send(job)

    assert answer == ProviderAnswer.accepted()
    assert apns.http_versions == ["2"]
    [(headers, _)] = apns.accepted
    assert headers[":path"] == f"/3/device/{TOKEN}"
    # The fake verified the signature with the key's public half; here: what it carries.
    scheme, _, provider_token = headers["authorization"].partition(" ")
    assert scheme == "bearer"
    header = jwt.get_unverified_header(provider_token)
    assert (header["alg"], header["kid"]) == ("ES256", apns.key_id)
    claims = jwt.decode(provider_token, options={"verify_signature": False})
    assert claims["iss"] == apns.team_id
    assert abs(claims["iat"] - time.time()) < 60
    assert set(claims) == {"iss", "iat"}


@pytest.mark.parametrize(
    ("trigger", "priority", "sound"),
    [
        (Trigger.DIRECT, "10", {"sound": "default"}),
        (Trigger.MENTION, "10", {"sound": "default"}),
        (Trigger.ROOM_MENTION, "5", {}),
        (Trigger.MESSAGE, "5", {}),
    ],
)
async def test_the_headers_and_payload(
    provider: ApnsProvider, apns: FakeApns, trigger: Trigger, priority: str, sound: dict[str, str]
) -> None:
    job = apns_job(trigger=trigger)

    assert await provider.send(job) == ProviderAnswer.accepted()

    [(headers, payload)] = apns.accepted
    notification_id = str(job.notification_id)
    assert headers["apns-topic"] == apns.topic
    assert headers["apns-push-type"] == "alert"
    assert headers["apns-priority"] == priority
    assert headers["apns-collapse-id"] == notification_id
    assert headers["apns-id"] == notification_id
    expires_in = int(headers["apns-expiration"]) - time.time()
    assert 23 * 3600 < expires_in <= 24 * 3600
    assert payload == {
        "aps": {
            "alert": {"title": job.title, "body": job.body},
            "thread-id": str(job.room_id),
            "mutable-content": 1,
            **sound,
        },
        "notification_id": notification_id,
        "message_id": str(job.message_id),
        "room_id": str(job.room_id),
    }


async def test_the_badge_is_the_recipients_unread_count(
    provider: ApnsProvider, apns: FakeApns
) -> None:
    job = apns_job(badge=12)

    assert await provider.send(job) == ProviderAnswer.accepted()

    [(headers, payload)] = apns.accepted
    assert headers["apns-push-type"] == "alert"
    assert payload["aps"]["badge"] == 12
    assert payload["aps"]["alert"] == {"title": job.title, "body": job.body}


@pytest.mark.parametrize(("badge", "custom_badge"), [(0, {"badge": 0}), (None, {})])
async def test_a_recall_is_a_background_push(
    provider: ApnsProvider, apns: FakeApns, badge: int | None, custom_badge: dict[str, int]
) -> None:
    job = recall_job(rooms=2, notifications=3, badge=badge, platform="apns", token=TOKEN)
    assert job.recall is not None

    # The fake refuses a background push of priority 10 or with an alert, sound or badge in aps.
    assert await provider.send(job) == ProviderAnswer.accepted()

    [(headers, payload)] = apns.accepted
    assert headers["apns-push-type"] == "background"
    assert headers["apns-priority"] == "5"
    assert "apns-collapse-id" not in headers
    assert headers["apns-id"] == str(job.notification_id)
    assert headers["apns-topic"] == apns.topic
    assert payload == {
        "aps": {"content-available": 1},
        "type": "recall",
        "room_ids": [str(room) for room in job.recall.room_ids],
        "notification_ids": [str(n) for n in job.recall.notification_ids],
        **custom_badge,
    }


async def test_a_redelivered_push_has_the_same_collapse_id(
    provider: ApnsProvider, apns: FakeApns
) -> None:
    job = apns_job()

    await provider.send(job)
    await provider.send(job)  # the same job, delivered again
    await provider.send(apns_job())  # another notification

    ids = [(h["apns-collapse-id"], h["apns-id"]) for h, _ in apns.accepted]
    assert ids[0] == ids[1] == (str(job.notification_id),) * 2
    assert ids[2][0] != ids[0][0]


def test_a_device_token_cannot_change_the_path(provider: ApnsProvider, apns: FakeApns) -> None:
    assert (
        provider.device_url("../../x?y=1#z") == f"{apns.base_url}/3/device/..%2F..%2Fx%3Fy%3D1%23z"
    )


# -- the provider token ------------------------------------------------------------------------


async def test_one_provider_token_serves_many_sends(provider: ApnsProvider, apns: FakeApns) -> None:
    answers = await asyncio.gather(*(provider.send(apns_job()) for _ in range(10)))
    answers.append(await provider.send(apns_job()))

    assert {answer.verdict for answer in answers} == {Verdict.ACCEPTED}
    assert len(apns.accepted) == 11
    # APNs refuses a new token more than once per 20 minutes: one for all of them.
    assert len(apns.provider_tokens) == 1


async def test_the_provider_token_is_replaced_before_it_is_an_hour_old(
    make_provider: Callable[..., ApnsProvider], apns: FakeApns
) -> None:
    clock = Clock(offset=-55 * 60)  # the first token is made 55 real minutes ago
    provider = make_provider(clock=clock)
    assert (await provider.send(apns_job())).verdict is Verdict.ACCEPTED

    clock.offset += PROVIDER_TOKEN_MAX_AGE - 60  # 49 minutes later: still the same token
    assert (await provider.send(apns_job())).verdict is Verdict.ACCEPTED
    assert len(apns.provider_tokens) == 1

    clock.offset = 0.0  # 55 minutes later: replaced before APNs would call it expired
    assert (await provider.send(apns_job())).verdict is Verdict.ACCEPTED
    assert len(apns.provider_tokens) == 2
    assert apns.requests == 3  # never an ExpiredProviderToken on the way
    claims = jwt.decode(apns.provider_tokens[-1], options={"verify_signature": False})
    assert abs(claims["iat"] - time.time()) < 60


async def test_an_expired_provider_token_is_replaced_and_the_push_sent_again_at_once(
    provider: ApnsProvider, apns: FakeApns
) -> None:
    await provider.send(apns_job())
    apns.expire_provider_token()

    answer = await provider.send(apns_job())

    assert answer == ProviderAnswer.accepted()
    assert apns.requests == 3  # accepted, 403 ExpiredProviderToken, accepted with the new token
    assert len(apns.provider_tokens) == 2
    assert len(apns.accepted) == 2


async def test_concurrent_sends_on_an_expired_token_make_one_new_token(
    provider: ApnsProvider, apns: FakeApns
) -> None:
    await provider.send(apns_job())
    apns.expire_provider_token()

    answers = await asyncio.gather(*(provider.send(apns_job()) for _ in range(5)))

    assert {answer.verdict for answer in answers} == {Verdict.ACCEPTED}
    assert len(apns.provider_tokens) == 2


async def test_a_token_expired_again_after_the_refresh_is_a_configuration_problem(
    provider: ApnsProvider, apns: FakeApns
) -> None:
    # A new token also "expired": our clock is wrong. One retry, no more.
    apns.fail(TOKEN, 403, "ExpiredProviderToken")

    answer = await provider.send(apns_job())

    assert answer == ProviderAnswer(Verdict.MISCONFIGURED, "apns 403 ExpiredProviderToken")
    assert apns.requests == 2
    assert len(apns.provider_tokens) == 2


async def test_a_key_apns_does_not_know_is_a_configuration_problem(
    make_provider: Callable[..., ApnsProvider], apns: FakeApns, tmp_path: Path
) -> None:
    # Another key under the same key id: the signature does not verify.
    other = FakeApns().write_key(tmp_path / "other.p8")
    provider = make_provider(key_file=other)

    answer = await provider.send(apns_job())

    assert answer == ProviderAnswer(Verdict.MISCONFIGURED, "apns 403 InvalidProviderToken")
    assert apns.requests == 1  # a new token from the same key would not help
    assert apns.accepted == []


async def test_a_wrong_team_is_a_configuration_problem(
    make_provider: Callable[..., ApnsProvider], apns: FakeApns
) -> None:
    answer = await make_provider(team_id="WRONGTEAM1").send(apns_job())

    assert answer == ProviderAnswer(Verdict.MISCONFIGURED, "apns 403 InvalidProviderToken")


async def test_a_topic_of_another_team_is_a_configuration_problem(
    make_provider: Callable[..., ApnsProvider], apns: FakeApns
) -> None:
    answer = await make_provider(topic="com.example.someone-else").send(apns_job())

    assert answer == ProviderAnswer(Verdict.MISCONFIGURED, "apns 400 TopicDisallowed")


# -- every row of the table --------------------------------------------------------------------


async def test_a_malformed_device_token_is_rejected_not_dead(
    provider: ApnsProvider, apns: FakeApns
) -> None:
    # The fake's own check, not a script: what APNs answers to a token that is not 32 bytes.
    # Rejected, not a dead token: APNs gives every token this answer when APNS_BASE_URL is the
    # other environment (sandbox tokens sent to production, or the reverse).
    answer = await provider.send(apns_job(token="c0ffee"))

    assert answer == ProviderAnswer(Verdict.REJECTED, "apns 400 BadDeviceToken")


async def test_a_topic_of_another_app_of_the_team_is_rejected_not_a_dead_token(
    make_provider: Callable[..., ApnsProvider], apns: FakeApns
) -> None:
    # The key signs for every app of the team, so APNs takes the topic and says each token is
    # not for it: every device would be deleted if this were a dead token.
    provider = make_provider(topic="chat.herald.other")

    answer = await provider.send(apns_job())

    assert answer == ProviderAnswer(Verdict.REJECTED, "apns 400 DeviceTokenNotForTopic")
    assert apns.accepted == []


@pytest.mark.parametrize(
    ("status", "reason", "options", "expected"),
    [
        (
            400,
            "BadDeviceToken",
            {},
            ProviderAnswer(Verdict.REJECTED, "apns 400 BadDeviceToken"),
        ),
        (
            400,
            "DeviceTokenNotForTopic",
            {},
            ProviderAnswer(Verdict.REJECTED, "apns 400 DeviceTokenNotForTopic"),
        ),
        (
            403,
            "InvalidProviderToken",
            {},
            ProviderAnswer(Verdict.MISCONFIGURED, "apns 403 InvalidProviderToken"),
        ),
        (
            403,
            "MissingProviderToken",
            {},
            ProviderAnswer(Verdict.MISCONFIGURED, "apns 403 MissingProviderToken"),
        ),
        (
            403,
            "BadCertificate",
            {},
            ProviderAnswer(Verdict.MISCONFIGURED, "apns 403 BadCertificate"),
        ),
        (400, "BadTopic", {}, ProviderAnswer(Verdict.MISCONFIGURED, "apns 400 BadTopic")),
        (400, "MissingTopic", {}, ProviderAnswer(Verdict.MISCONFIGURED, "apns 400 MissingTopic")),
        (
            400,
            "TopicDisallowed",
            {},
            ProviderAnswer(Verdict.MISCONFIGURED, "apns 400 TopicDisallowed"),
        ),
        (404, "BadPath", {}, ProviderAnswer(Verdict.MISCONFIGURED, "apns 404 BadPath")),
        (413, "PayloadTooLarge", {}, ProviderAnswer(Verdict.REJECTED, "apns 413 PayloadTooLarge")),
        (400, "BadCollapseId", {}, ProviderAnswer(Verdict.REJECTED, "apns 400 BadCollapseId")),
        (400, "BadPriority", {}, ProviderAnswer(Verdict.REJECTED, "apns 400 BadPriority")),
        (
            400,
            "BadExpirationDate",
            {},
            ProviderAnswer(Verdict.REJECTED, "apns 400 BadExpirationDate"),
        ),
        (
            429,
            "TooManyRequests",
            {"retry_after": 7},
            ProviderAnswer(Verdict.TRANSIENT, "apns 429 TooManyRequests", 7.0),
        ),
        (
            429,
            "TooManyProviderTokenUpdates",
            {},
            ProviderAnswer(Verdict.TRANSIENT, "apns 429 TooManyProviderTokenUpdates"),
        ),
        (
            500,
            "InternalServerError",
            {},
            ProviderAnswer(Verdict.TRANSIENT, "apns 500 InternalServerError"),
        ),
        (
            503,
            "ServiceUnavailable",
            {},
            ProviderAnswer(Verdict.TRANSIENT, "apns 503 ServiceUnavailable"),
        ),
        (
            503,
            "ServiceUnavailable",
            {"retry_after": 30},
            ProviderAnswer(Verdict.TRANSIENT, "apns 503 ServiceUnavailable", 30.0),
        ),
        (503, "Shutdown", {}, ProviderAnswer(Verdict.TRANSIENT, "apns 503 Shutdown")),
    ],
)
async def test_provider_answers(
    provider: ApnsProvider,
    apns: FakeApns,
    status: int,
    reason: str,
    options: dict[str, Any],
    expected: ProviderAnswer,
) -> None:
    apns.fail(TOKEN, status, reason, times=1, **options)

    answer = await provider.send(apns_job())

    assert answer == expected
    assert TOKEN not in answer.reason
    assert apns.accepted == []
    assert apns.requests == 1  # only ExpiredProviderToken is retried here
    # The script was used once: the next send goes through.
    assert (await provider.send(apns_job())).verdict is Verdict.ACCEPTED


def ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


@pytest.mark.parametrize(
    ("registered", "expected"),
    [
        # We do not know when the device registered the token: APNs' word stands.
        (None, ProviderAnswer(Verdict.TOKEN_INVALID, "apns 410 Unregistered")),
        # Registered before APNs saw it die: dead.
        (timedelta(hours=-1), ProviderAnswer(Verdict.TOKEN_INVALID, "apns 410 Unregistered")),
        # Registered again after APNs' timestamp (the app was reinstalled, the token came back):
        # keep the device; this push is refused and not retried.
        (timedelta(hours=1), ProviderAnswer(Verdict.REJECTED, "apns 410 Unregistered stale")),
    ],
)
async def test_410_unregistered_and_its_timestamp(
    provider: ApnsProvider,
    apns: FakeApns,
    registered: timedelta | None,
    expected: ProviderAnswer,
) -> None:
    unregistered_at = datetime.now(UTC) - timedelta(days=1)
    apns.fail(TOKEN, 410, "Unregistered", times=1, timestamp=ms(unregistered_at))
    token_updated_at = None if registered is None else unregistered_at + registered

    answer = await provider.send(apns_job(token_updated_at=token_updated_at))

    assert answer == expected


def test_a_410_without_a_timestamp_is_a_dead_token() -> None:
    answer = classify(
        410,
        {"reason": "Unregistered"},
        httpx.Headers(),
        token_updated_at=datetime.now(UTC),
    )

    assert answer == ProviderAnswer(Verdict.TOKEN_INVALID, "apns 410 Unregistered")


@pytest.mark.parametrize(
    ("status", "reason", "verdict"),
    [
        # What a wrong APNS_BASE_URL or APNS_TOPIC gives every token: never a dead token.
        (400, "BadDeviceToken", Verdict.REJECTED),
        (400, "DeviceTokenNotForTopic", Verdict.REJECTED),
        # Only ever about one device: dead.
        (410, "Unregistered", Verdict.TOKEN_INVALID),
        (410, "ExpiredToken", Verdict.TOKEN_INVALID),
    ],
)
def test_only_a_410_says_the_token_is_dead(status: int, reason: str, verdict: Verdict) -> None:
    answer = classify(status, {"reason": reason}, httpx.Headers(), token_updated_at=None)

    assert answer == ProviderAnswer(verdict, f"apns {status} {reason}")


@pytest.mark.parametrize(
    ("status", "payload", "expected"),
    [
        (502, None, ProviderAnswer.transient("apns 502")),  # an HTML page from a proxy
        (
            400,
            {"reason": "<script>alert(1)</script>"},
            ProviderAnswer(Verdict.REJECTED, "apns 400"),
        ),
        (
            405,
            {"reason": "MethodNotAllowed"},
            ProviderAnswer(Verdict.REJECTED, "apns 405 MethodNotAllowed"),
        ),
        (302, None, ProviderAnswer.transient("apns unexpected status 302")),
    ],
)
def test_odd_answers(status: int, payload: Any, expected: ProviderAnswer) -> None:
    assert classify(status, payload, httpx.Headers(), token_updated_at=None) == expected


async def test_a_timeout_is_transient(
    make_provider: Callable[..., ApnsProvider], apns: FakeApns
) -> None:
    provider = make_provider(timeout=0.3)
    apns.stall(TOKEN, 3.0, times=1)

    assert await provider.send(apns_job()) == ProviderAnswer.transient("apns timeout")


async def test_a_refused_connection_is_transient(
    make_provider: Callable[..., ApnsProvider],
) -> None:
    provider = make_provider(base_url=f"http://127.0.0.1:{free_port()}")

    answer = await provider.send(apns_job())

    assert answer == ProviderAnswer.transient("apns connection failed (ConnectError)")


# -- payload size ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        "é" * 3000,  # 2 bytes each
        "a" + "😀" * 2000,  # 4 bytes each, after an odd offset
        "漢字" * 1500,  # 3 bytes each
        '"\n\\' * 2000,  # each escaped in JSON: 2 bytes per character
    ],
)
def test_a_long_body_is_cut_on_a_character_boundary_to_fit(body: str) -> None:
    job = apns_job(body=body)

    encoded = build_payload(job)

    assert len(encoded) <= MAX_PAYLOAD_BYTES
    payload = json.loads(encoded.decode("utf-8"))  # strict UTF-8
    sent = payload["aps"]["alert"]["body"]
    assert sent.endswith("…")
    kept = sent[: -len("…")]
    assert body.startswith(kept)
    # As long as fits: the cut (before trailing whitespace is dropped) plus one more character
    # would not.
    cut = len(kept) + len(body[len(kept) :]) - len(body[len(kept) :].lstrip())
    payload["aps"]["alert"]["body"] = body[: cut + 1] + "…"
    assert encode(payload) != encoded
    assert len(encode(payload)) > MAX_PAYLOAD_BYTES


def test_the_badge_stays_when_the_body_is_cut() -> None:
    encoded = build_payload(apns_job(body="é" * 3000, badge=2**31 - 1))

    assert len(encoded) <= MAX_PAYLOAD_BYTES
    payload = json.loads(encoded)
    assert payload["aps"]["badge"] == 2**31 - 1
    assert payload["aps"]["alert"]["body"].endswith("…")


def test_a_body_that_fits_is_left_alone() -> None:
    job = apns_job(body="ü" * 1000)

    assert json.loads(build_payload(job))["aps"]["alert"]["body"] == job.body


def test_an_oversized_title_is_cut_too() -> None:
    job = apns_job(title="T" * 5000, body="hello")

    payload = json.loads(build_payload(job))

    assert len(build_payload(job)) <= MAX_PAYLOAD_BYTES
    assert payload["aps"]["alert"]["body"] == ""
    assert payload["aps"]["alert"]["title"].endswith("…")


async def test_apns_accepts_the_shortened_push(provider: ApnsProvider, apns: FakeApns) -> None:
    answer = await provider.send(apns_job(body="ß" * 10_000))

    assert answer == ProviderAnswer.accepted()
    [(headers, payload)] = apns.accepted
    assert int(headers["content-length"]) <= MAX_PAYLOAD_BYTES
    assert payload["aps"]["alert"]["body"].endswith("ß…")


# -- configuration -----------------------------------------------------------------------------


def pem(key: Any, *, password: bytes | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    data: bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    return data


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot be read"),
        (b"-----BEGIN PRIVATE KEY-----\nSECRET\n-----END PRIVATE KEY-----\n", "not a PEM"),
        (
            pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)),
            "not a P-256 key",
        ),
        (pem(ec.generate_private_key(ec.SECP384R1())), "not a P-256 key"),
        (pem(ec.generate_private_key(ec.SECP256R1()), password=b"pw"), "encrypted"),
    ],
)
def test_an_unusable_key_stops_the_start_without_showing_it(
    tmp_path: Path, content: bytes | None, message: str
) -> None:
    path = tmp_path / "AuthKey.p8"
    if content is not None:
        path.write_bytes(content)
    settings = ApnsSettings(
        key_file=path, key_id="ABCDE12345", team_id="TEAM123456", topic="chat.herald.ios"
    )

    with pytest.raises(ApnsConfigurationError, match=message) as raised:
        ApnsProvider.from_settings(settings, max_connections=1)

    assert "SECRET" not in str(raised.value)
    assert "PRIVATE" not in str(raised.value)
    assert raised.value.__cause__ is None


def test_missing_settings_are_named() -> None:
    with pytest.raises(ApnsConfigurationError, match="APNS_KEY_FILE, APNS_TEAM_ID"):
        ApnsProvider.from_settings(ApnsSettings(key_id="ABCDE12345", topic="chat.herald.ios"))


def test_settings_come_from_apns_variables(monkeypatch: pytest.MonkeyPatch, apns_key: Path) -> None:
    monkeypatch.setenv("APNS_KEY_FILE", str(apns_key))
    monkeypatch.setenv("APNS_KEY_ID", "ABCDE12345")
    monkeypatch.setenv("APNS_TEAM_ID", "TEAM123456")
    monkeypatch.setenv("APNS_TOPIC", "chat.herald.ios")

    settings = ApnsSettings()

    assert (settings.key_file, settings.key_id, settings.team_id, settings.topic) == (
        apns_key,
        "ABCDE12345",
        "TEAM123456",
        "chat.herald.ios",
    )
    assert settings.base_url == "https://api.push.apple.com"


@pytest.mark.parametrize(
    "values",
    [
        {"base_url": "http://api.push.apple.com"},  # clear text off this machine
        {"key_id": "abc"},
        {"team_id": "TEAM 12345"},
        {"topic": "chat.herald.ios/../x"},
        {"timeout": 0},
    ],
)
def test_bad_settings_are_refused(values: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="validation error"):
        ApnsSettings(**values)
