"""The Web Push adapter against the fake push service, which decrypts every payload with the
subscription's private key (RFC 8291) and verifies the VAPID JWT (RFC 8292): encryption, VAPID,
RFC 8030 headers, every Web Push row of the provider error → action table, the endpoint
allowlist, truncation and the Topic."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import ValidationError

from herald_shared.events import Platform, Trigger, WebPushKeys
from herald_shared.webpush import DEFAULT_ALLOWED_HOSTS
from push_sender.providers import (
    ProviderAnswer,
    Verdict,
    WebPushConfigurationError,
    WebPushProvider,
    make_providers,
)
from push_sender.providers.webpush import (
    MAX_BODY_BYTES,
    b64url_decode,
    b64url_encode,
    classify,
    encrypt,
    load_vapid_key,
    topic,
)
from push_sender.settings import PushProviderKind, Settings, WebPushSettings
from tests.fakes.webpush import FakeWebPush, decrypt
from tests.support.processes import free_port
from tests.unit.push_sender.support import (
    public_key_of,
    recall_job,
    webpush_job,
    write_pem_key,
)

SUBJECT = "mailto:push-admin@herald.test"
LOOPBACK_HOSTS = (*DEFAULT_ALLOWED_HOSTS, "127.0.0.1")


@pytest.fixture
def push() -> Iterator[FakeWebPush]:
    with FakeWebPush() as fake:
        yield fake


@pytest.fixture
def vapid_key(tmp_path: Path) -> tuple[Path, ec.EllipticCurvePrivateKey]:
    path = tmp_path / "vapid.pem"
    return path, write_pem_key(path)


@pytest.fixture
async def make_provider(
    vapid_key: tuple[Path, ec.EllipticCurvePrivateKey],
) -> AsyncIterator[Callable[..., WebPushProvider]]:
    providers: list[WebPushProvider] = []

    def make(**overrides: Any) -> WebPushProvider:
        values: dict[str, Any] = {
            "vapid_private_key_file": vapid_key[0],
            "vapid_subject": SUBJECT,
            "allowed_hosts": LOOPBACK_HOSTS,
            "timeout": 2.0,
        }
        values.update(overrides)
        provider = WebPushProvider.from_settings(WebPushSettings(**values), max_connections=4)
        providers.append(provider)
        return provider

    yield make
    for provider in providers:
        await provider.aclose()


# --- encryption ---------------------------------------------------------------------------------


def test_encryption_reproduces_the_rfc_8291_example() -> None:
    # RFC 8291 Appendix A: fixed sender key and salt, so the whole body is known.
    sender = ec.derive_private_key(
        int.from_bytes(b64url_decode("yfWPiYE-n46HLnH0KqZOF1fJJU3MYrct3AELtAQ-oRw"), "big"),
        ec.SECP256R1(),
    )
    keys = WebPushKeys(
        p256dh="BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4",
        auth="BTBZMqHH6r4Tts7J_aSIgg",
    )

    body = encrypt(
        b"When I grow up, I want to be a watermelon",
        keys,
        salt=b64url_decode("DGv6ra1nlYgDCS1FRnbzlw"),
        sender_key=sender,
    )

    assert b64url_encode(body) == (
        "DGv6ra1nlYgDCS1FRnbzlwAAEABBBP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIgDll6e3vCYLocInmYWAmS"
        "6TlzAC8wEqKK6PBru3jl7A_yl95bQpu6cVPTpK4Mqgkf1CXztLVBSt2Ks3oZwbuwXPXLWyouBWLVWGNWQexSgSxsj_Q"
        "ulcy4a-fN"
    )


def test_each_message_has_its_own_salt_and_sender_key(push: FakeWebPush) -> None:
    browser = push.subscribe()
    keys = WebPushKeys(**browser.keys)

    first, second = encrypt(b"same", keys), encrypt(b"same", keys)

    assert first[:16] != second[:16]  # salt
    assert first[21:86] != second[21:86]  # keyid: the sender's ephemeral public key
    assert len(first) == 86 + len(b"same") + 1 + 16
    for body in (first, second):
        assert decrypt(body, browser.private_key, browser.auth_secret) == b"same"


@pytest.mark.parametrize(
    ("trigger", "urgency"),
    [
        (Trigger.DIRECT, "high"),
        (Trigger.MENTION, "high"),
        (Trigger.ROOM_MENTION, "normal"),
        (Trigger.MESSAGE, "normal"),
    ],
)
async def test_a_push_is_encrypted_for_the_subscription_and_accepted(
    push: FakeWebPush,
    make_provider: Callable[..., WebPushProvider],
    trigger: Trigger,
    urgency: str,
) -> None:
    browser = push.subscribe()
    job = webpush_job(browser, title="Alice in general", body="Lunch at 12? 🍕", trigger=trigger)

    answer = await make_provider().send(job)

    assert answer == ProviderAnswer.accepted()
    [received] = push.received_by(browser)
    assert received.payload == {
        "type": "notification",
        "title": "Alice in general",
        "body": "Lunch at 12? 🍕",
        "message_id": str(job.message_id),
        "room_id": str(job.room_id),
        "notification_id": str(job.notification_id),
    }
    assert received.headers["content-encoding"] == "aes128gcm"
    assert received.headers["content-type"] == "application/octet-stream"
    assert received.headers["ttl"] == "86400"
    assert received.headers["urgency"] == urgency
    assert received.headers["topic"] == topic(job)
    assert push.undecryptable == 0


async def test_the_badge_is_the_recipients_unread_count(
    push: FakeWebPush, make_provider: Callable[..., WebPushProvider]
) -> None:
    browser = push.subscribe()

    answer = await make_provider().send(webpush_job(browser, badge=4))

    assert answer == ProviderAnswer.accepted()
    [received] = push.received_by(browser)
    assert received.payload["type"] == "notification"
    assert received.payload["badge"] == 4


@pytest.mark.parametrize(("badge", "payload_badge"), [(5, {"badge": 5}), (None, {})])
async def test_a_recall_names_what_to_close_at_high_urgency(
    push: FakeWebPush,
    make_provider: Callable[..., WebPushProvider],
    badge: int | None,
    payload_badge: dict[str, int],
) -> None:
    browser = push.subscribe()
    job = recall_job(
        rooms=2,
        notifications=3,
        badge=badge,
        platform=Platform.WEB_PUSH,
        token=browser.endpoint,
        web_push_keys=WebPushKeys(**browser.keys),
    )
    assert job.recall is not None

    answer = await make_provider().send(job)

    assert answer == ProviderAnswer.accepted()
    [received] = push.received_by(browser)
    assert received.payload == {
        "type": "recall",
        "room_ids": [str(room) for room in job.recall.room_ids],
        "notification_ids": [str(n) for n in job.recall.notification_ids],
        **payload_badge,
    }
    assert received.headers["urgency"] == "high"
    assert received.headers["topic"] == topic(job)


async def test_the_ttl_setting_is_sent(
    push: FakeWebPush, make_provider: Callable[..., WebPushProvider]
) -> None:
    browser = push.subscribe()

    answer = await make_provider(ttl=600).send(webpush_job(browser))

    assert answer.verdict is Verdict.ACCEPTED
    assert push.received_by(browser)[0].headers["ttl"] == "600"


# --- VAPID --------------------------------------------------------------------------------------


async def test_vapid_names_the_push_service_origin_and_our_key(
    push: FakeWebPush,
    make_provider: Callable[..., WebPushProvider],
    vapid_key: tuple[Path, ec.EllipticCurvePrivateKey],
) -> None:
    our_key = public_key_of(vapid_key[1])
    # A subscription made with our applicationServerKey: the service refuses any other key.
    browser = push.subscribe(application_server_key=our_key)

    answer = await make_provider().send(webpush_job(browser))

    assert answer.verdict is Verdict.ACCEPTED
    [received] = push.received_by(browser)
    scheme, _, params = received.headers["authorization"].partition(" ")
    fields = dict(part.strip().split("=", 1) for part in params.split(","))
    assert scheme == "vapid"
    assert fields["k"] == our_key
    assert jwt.get_unverified_header(fields["t"])["alg"] == "ES256"
    # The fake verified the signature against k; the claims are as RFC 8292 wants them.
    assert received.claims["aud"] == push.origin
    assert received.claims["sub"] == SUBJECT
    assert time.time() < received.claims["exp"] <= time.time() + 24 * 3600


async def test_a_raw_base64url_vapid_key_works_too(
    push: FakeWebPush, make_provider: Callable[..., WebPushProvider], tmp_path: Path
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    raw = tmp_path / "vapid.txt"
    raw.write_text(b64url_encode(key.private_numbers().private_value.to_bytes(32, "big")) + "\n")
    browser = push.subscribe(application_server_key=public_key_of(key))

    answer = await make_provider(vapid_private_key_file=raw).send(webpush_job(browser))

    assert answer.verdict is Verdict.ACCEPTED


async def test_a_subscription_made_with_another_key_refuses_only_its_push(
    push: FakeWebPush, make_provider: Callable[..., WebPushProvider]
) -> None:
    """RFC 8292's 403: the subscription was created with another applicationServerKey, which the
    client chose. Not our configuration (any user could claim it), nor a dead subscription."""
    other = public_key_of(ec.generate_private_key(ec.SECP256R1()))
    browser = push.subscribe(application_server_key=other)
    provider = make_provider()

    answer = await provider.send(webpush_job(browser))

    assert (answer.verdict, answer.reason) == (Verdict.REJECTED, "webpush 403")
    assert push.refusals == ["vapid: key differs from the subscription's"]
    assert (await provider.send(webpush_job(push.subscribe()))).verdict is Verdict.ACCEPTED


async def test_the_vapid_token_of_an_origin_is_reused(
    push: FakeWebPush, make_provider: Callable[..., WebPushProvider]
) -> None:
    browser = push.subscribe()
    provider = make_provider()

    for _ in range(2):
        assert (await provider.send(webpush_job(browser))).verdict is Verdict.ACCEPTED

    first, second = (r.headers["authorization"] for r in push.received_by(browser))
    assert first == second


def test_the_vapid_token_is_renewed_before_it_expires(
    vapid_key: tuple[Path, ec.EllipticCurvePrivateKey],
) -> None:
    now = [1_000_000.0]
    provider = WebPushProvider(
        key=vapid_key[1],
        subject=SUBJECT,
        allowed_hosts=(),
        ttl=60,
        timeout=1.0,
        clock=lambda: now[0],
    )
    origin = "https://fcm.googleapis.com"
    first = provider.vapid.token(origin)
    now[0] += 5 * 3600
    assert provider.vapid.token(origin) == first
    now[0] += 2 * 3600  # past half of its 12 hours
    renewed = provider.vapid.token(origin)

    assert renewed != first
    claims = jwt.decode(
        renewed,
        vapid_key[1].public_key(),
        algorithms=["ES256"],
        audience=origin,
        options={"verify_exp": False},
    )
    assert claims["exp"] == int(now[0]) + 12 * 3600


# --- the provider table -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "retry_after", "expected"),
    [
        (404, None, ProviderAnswer(Verdict.TOKEN_INVALID, "webpush 404")),
        (410, None, ProviderAnswer(Verdict.TOKEN_INVALID, "webpush 410")),
        (413, None, ProviderAnswer(Verdict.REJECTED, "webpush 413")),
        (400, None, ProviderAnswer(Verdict.REJECTED, "webpush 400")),
        # VAPID refused for this subscription (autopush answers a key mismatch with 401).
        (401, None, ProviderAnswer(Verdict.REJECTED, "webpush 401")),
        (403, None, ProviderAnswer(Verdict.REJECTED, "webpush 403")),
        (429, 7, ProviderAnswer(Verdict.TRANSIENT, "webpush 429", 7.0)),
        (503, 30, ProviderAnswer(Verdict.TRANSIENT, "webpush 503", 30.0)),
        (500, None, ProviderAnswer(Verdict.TRANSIENT, "webpush 500")),
    ],
)
async def test_each_push_service_answer_is_classified(
    push: FakeWebPush,
    make_provider: Callable[..., WebPushProvider],
    status: int,
    retry_after: int | None,
    expected: ProviderAnswer,
) -> None:
    browser = push.subscribe()
    push.fail(browser, status, retry_after=retry_after, times=1)
    provider = make_provider()

    answer = await provider.send(webpush_job(browser))
    after = await provider.send(webpush_job(browser))

    assert answer == expected
    assert browser.endpoint not in answer.reason
    assert after.verdict is Verdict.ACCEPTED  # the script was used up: the request was valid


async def test_an_unsubscribed_browser_is_token_invalid(
    push: FakeWebPush, make_provider: Callable[..., WebPushProvider]
) -> None:
    browser = push.subscribe()
    push.unsubscribe(browser)

    answer = await make_provider().send(webpush_job(browser))

    assert (answer.verdict, answer.reason) == (Verdict.TOKEN_INVALID, "webpush 410")


def test_202_accepted_and_redirects_are_classified() -> None:
    assert classify(202, httpx.Headers()).verdict is Verdict.ACCEPTED
    redirect = classify(307, httpx.Headers({"location": "http://169.254.169.254/"}))
    assert redirect.verdict is Verdict.REJECTED
    assert "169.254" not in redirect.reason
    assert classify(503, httpx.Headers({"retry-after": "soon"})).retry_after is None


async def test_a_slow_push_service_is_transient(
    push: FakeWebPush, make_provider: Callable[..., WebPushProvider]
) -> None:
    browser = push.subscribe()
    push.stall(browser, 5.0, times=1)

    answer = await make_provider(timeout=0.3).send(webpush_job(browser))

    assert (answer.verdict, answer.reason) == (Verdict.TRANSIENT, "webpush timeout")


async def test_an_unreachable_push_service_is_transient(
    make_provider: Callable[..., WebPushProvider], push: FakeWebPush
) -> None:
    browser = push.subscribe()
    closed = f"http://127.0.0.1:{free_port()}/push/{browser.id}"

    answer = await make_provider().send(webpush_job(browser, token=closed))

    assert answer.verdict is Verdict.TRANSIENT
    assert answer.reason.startswith("webpush connection failed")
    assert closed not in answer.reason


# --- the endpoint allowlist ---------------------------------------------------------------------

REFUSED_ENDPOINTS = [
    "http://169.254.169.254/latest/meta-data/",
    "https://169.254.169.254/latest/meta-data/",
    "https://evil.example/push/1",
    "http://fcm.googleapis.com/fcm/send/abc",  # plain http off loopback
    "https://fcm.googleapis.com.evil.example/fcm/send/abc",
    "https://evilfcm.googleapis.com/fcm/send/abc",
    "https://notify.windows.com/w/?token=abc",  # the domain itself is not a host under it
    "https://user:pass@fcm.googleapis.com/fcm/send/abc",
    "http://localhost:8080/push/1",  # loopback, but not on the allowlist
    "ftp://fcm.googleapis.com/x",
    "not a url at all",
]


@pytest.mark.parametrize("endpoint", REFUSED_ENDPOINTS)
async def test_an_endpoint_off_the_allowlist_is_rejected_without_a_request(
    vapid_key: tuple[Path, ec.EllipticCurvePrivateKey], push: FakeWebPush, endpoint: str
) -> None:
    requests: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(201)

    provider = WebPushProvider(
        key=vapid_key[1],
        subject=SUBJECT,
        allowed_hosts=LOOPBACK_HOSTS,
        ttl=60,
        timeout=1.0,
        transport=httpx.MockTransport(record),
    )
    browser = push.subscribe()
    try:
        answer = await provider.send(webpush_job(browser, token=endpoint))
    finally:
        await provider.aclose()

    assert answer.verdict is Verdict.REJECTED
    assert answer.reason.startswith("webpush endpoint")
    assert endpoint not in answer.reason
    assert requests == []


async def test_a_push_without_subscription_keys_is_rejected(
    push: FakeWebPush, make_provider: Callable[..., WebPushProvider]
) -> None:
    browser = push.subscribe()

    missing = await make_provider().send(webpush_job(browser, web_push_keys=None))
    broken = await make_provider().send(
        webpush_job(browser, web_push_keys=WebPushKeys(p256dh="AAAA", auth=browser.keys["auth"]))
    )

    assert (missing.verdict, missing.reason) == (
        Verdict.REJECTED,
        "webpush subscription keys missing",
    )
    assert broken.verdict is Verdict.REJECTED
    assert push.requests == 0


# --- payload ------------------------------------------------------------------------------------


async def test_a_long_body_is_cut_on_a_character_boundary_to_fit_4096_bytes(
    push: FakeWebPush, make_provider: Callable[..., WebPushProvider]
) -> None:
    browser = push.subscribe()
    # Family emoji: several code points joined by ZWJ, each 4 bytes.
    family = "👨\u200d👩\u200d👧\u200d👦"
    job = webpush_job(browser, body=family * 400)

    answer = await make_provider().send(job)

    assert answer.verdict is Verdict.ACCEPTED
    [received] = push.received_by(browser)
    assert received.body_size <= MAX_BODY_BYTES
    body = received.payload["body"]
    assert body.endswith("…")
    assert body[:-1] == family * (len(body[:-1]) // len(family))  # whole emoji only
    assert len(body) > 100  # cut, not emptied
    assert received.payload["title"] == job.title


async def test_the_badge_stays_when_the_body_is_cut(
    push: FakeWebPush, make_provider: Callable[..., WebPushProvider]
) -> None:
    browser = push.subscribe()

    answer = await make_provider().send(webpush_job(browser, body="é" * 3000, badge=2**31 - 1))

    assert answer.verdict is Verdict.ACCEPTED
    [received] = push.received_by(browser)
    assert received.body_size <= MAX_BODY_BYTES
    assert received.payload["badge"] == 2**31 - 1
    assert received.payload["body"].endswith("…")


async def test_an_enormous_title_is_cut_too(
    push: FakeWebPush, make_provider: Callable[..., WebPushProvider]
) -> None:
    browser = push.subscribe()

    answer = await make_provider().send(webpush_job(browser, title="T" * 5000, body="hello"))

    assert answer.verdict is Verdict.ACCEPTED
    [received] = push.received_by(browser)
    assert received.payload["body"] == ""
    assert received.payload["title"].endswith("…")
    assert received.body_size <= MAX_BODY_BYTES


async def test_the_topic_is_stable_per_notification(
    push: FakeWebPush, make_provider: Callable[..., WebPushProvider]
) -> None:
    browser = push.subscribe()
    job = webpush_job(browser)
    other = webpush_job(browser)
    provider = make_provider()

    for each in (job, job, other):
        assert (await provider.send(each)).verdict is Verdict.ACCEPTED

    topics = [r.headers["topic"] for r in push.received_by(browser)]
    assert topics[0] == topics[1] != topics[2]
    assert topics[0] == topic(webpush_job(browser, notification_id=job.notification_id))
    assert len(topics[0]) <= 32
    assert uuid.UUID(bytes=b64url_decode(topics[0])) == job.notification_id


# --- settings and start-up ----------------------------------------------------------------------


def test_settings_read_the_environment(
    monkeypatch: pytest.MonkeyPatch, vapid_key: tuple[Path, ec.EllipticCurvePrivateKey]
) -> None:
    monkeypatch.setenv("WEBPUSH_VAPID_PRIVATE_KEY_FILE", str(vapid_key[0]))
    monkeypatch.setenv("WEBPUSH_VAPID_SUBJECT", "https://herald.test/contact")
    monkeypatch.setenv("WEBPUSH_ALLOWED_HOSTS", "fcm.googleapis.com, *.Example.test ,")
    monkeypatch.setenv("WEBPUSH_TTL", "120")

    settings = WebPushSettings()

    assert settings.allowed_hosts == ("fcm.googleapis.com", "*.example.test")
    assert settings.ttl == 120
    assert Settings(database_url="sqlite:///x.db").webpush == settings


def test_the_default_allowlist_is_the_real_push_services() -> None:
    assert WebPushSettings().allowed_hosts == DEFAULT_ALLOWED_HOSTS
    assert "127.0.0.1" not in DEFAULT_ALLOWED_HOSTS


@pytest.mark.parametrize(
    "values",
    [
        {"vapid_private_key_file": "vapid.pem"},  # no subject
        {"vapid_subject": "admin@herald.test"},  # neither mailto: nor https:
        {"vapid_subject": "http://herald.test"},
        {"ttl": -1},
    ],
)
def test_invalid_settings_are_refused(values: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        WebPushSettings(**values)


def test_unusable_vapid_keys_are_refused_without_their_content(tmp_path: Path) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cases = {
        "missing.pem": None,
        "rsa.pem": rsa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        "short.txt": b"c2VjcmV0LWJ1dC1zaG9ydA",
        "garbage.pem": b"-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n-----END PRIVATE KEY-----\n",
    }
    for name, content in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(WebPushConfigurationError) as caught:
            load_vapid_key(path)
        assert "c2VjcmV0" not in str(caught.value)


async def test_the_live_registry_serves_browsers_once_vapid_is_configured(
    vapid_key: tuple[Path, ec.EllipticCurvePrivateKey],
) -> None:
    settings = Settings(
        database_url="sqlite:///x.db",
        push_provider=PushProviderKind.LIVE,
        webpush=WebPushSettings(vapid_private_key_file=vapid_key[0], vapid_subject=SUBJECT),
    )

    providers = make_providers(settings)
    for provider in providers.values():
        await provider.aclose()

    assert isinstance(providers[Platform.WEB_PUSH], WebPushProvider)
    assert Platform.FCM not in providers
