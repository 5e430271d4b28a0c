"""Web Push: a browser's push subscription, reached through its push service.

* Delivery (RFC 8030): `POST <subscription endpoint>` with `TTL`, `Urgency: high` for a DM
  or a mention (`normal` for the rest) and `Topic` derived from the notification id, so a push sent
  twice replaces the first one while it waits at the push service.
* Payload encryption (RFC 8291, `Content-Encoding: aes128gcm` of RFC 8188): ECDH between a fresh
  P-256 key of ours and the subscription's `p256dh`, HKDF with its `auth` secret, one record
  with the 0x02 padding delimiter, behind the 86-byte header salt | rs | idlen | keyid. The JSON
  payload (`type` "notification", title, body, ids, and the recipient's unread count as `badge`
  when the router sent it) is shortened, body first and on a character boundary, so that the
  whole body fits the 4096 bytes every push service accepts.
* A recall (`job.recall`) carries `type` "recall" and ids instead, at `Urgency: high`: the
  service worker closes the notifications they name and sets the badge (see `recall_payload`).
* Authentication (RFC 8292, VAPID): `Authorization: vapid t=<ES256 JWT>, k=<our public key>`; the
  JWT's `aud` is the endpoint's origin, `exp` at most 24 hours away, `sub` our contact. One JWT
  per origin is reused until it is half-way to expiry.
* The endpoint is a URL a client gave us: it is checked against the allowlist of push-service
  hosts (`WEBPUSH_ALLOWED_HOSTS`; the rule is `herald_shared.webpush`, which message-service
  applies too) before any request, redirects are never followed, and no reason ever quotes it
  (an endpoint is a capability: whoever has it can push to that browser).
* Answers are classified, never retried here (see `classify`).

Nothing here logs or stores an endpoint, a key, a JWT or the push text.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from herald_shared.events import PushRecall, PushRequested, WebPushKeys
from herald_shared.text import truncate_to_size
from herald_shared.webpush import endpoint_problem
from push_sender.providers.base import ProviderAnswer, Verdict
from push_sender.providers.fcm import parse_retry_after
from push_sender.providers.recall import fit_recall
from push_sender.settings import WebPushSettings

# What every push service must accept as a message body (RFC 8030 §7.2, RFC 8291 §4).
MAX_BODY_BYTES = 4096
SALT_BYTES = 16
AUTH_SECRET_BYTES = 16
PUBLIC_KEY_BYTES = 65  # an uncompressed P-256 point
TAG_BYTES = 16
# salt (16) | rs (4) | idlen (1) | keyid: our public key (65)
HEADER_BYTES = SALT_BYTES + 4 + 1 + PUBLIC_KEY_BYTES
# The plaintext of our single record: the body less header, padding delimiter and tag.
MAX_PLAINTEXT_BYTES = MAX_BODY_BYTES - HEADER_BYTES - 1 - TAG_BYTES
RECORD_SIZE = 4096
PADDING_DELIMITER = b"\x02"  # the last (here: only) record
KEY_INFO = b"WebPush: info\x00"
CEK_INFO = b"Content-Encoding: aes128gcm\x00"
NONCE_INFO = b"Content-Encoding: nonce\x00"
# RFC 8292: a push service refuses a JWT that expires more than 24 hours from now.
VAPID_LIFETIME = 12 * 3600
VAPID_MAX_LIFETIME = 24 * 3600
# Origins whose VAPID JWT is kept (the allowlist names only a few push services).
VAPID_CACHE_SIZE = 64
TOPIC_MAX_CHARS = 32
REASON_LIMIT = 200

Clock = Callable[[], float]


class WebPushConfigurationError(ValueError):
    """`WEBPUSH_*` is missing or unusable (raised at start-up, never with the key's content)."""


class SubscriptionKeysInvalid(ValueError):
    """The subscription's `p256dh` or `auth` cannot be used (never says what they are)."""


# --- encoding helpers ---------------------------------------------------------------------------


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def b64url_decode(text: str) -> bytes:
    """base64url with or without padding; anything else is a ValueError."""
    stripped = text.strip().rstrip("=")
    try:
        return base64.b64decode(
            stripped + "=" * (-len(stripped) % 4), altchars=b"-_", validate=True
        )
    except (binascii.Error, ValueError):
        raise ValueError("not base64url") from None


def public_key_bytes(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


# --- the endpoint --------------------------------------------------------------------------------


def origin_of(endpoint: str) -> str:
    """`scheme://host[:port]`, the VAPID audience (RFC 8292 §2: the push resource's origin)."""
    url = httpx.URL(endpoint)
    default_port = {"https": 443, "http": 80}.get(url.scheme)
    port = f":{url.port}" if url.port is not None and url.port != default_port else ""
    host = url.raw_host.decode("ascii")
    host = f"[{host}]" if ":" in host else host  # an IPv6 literal
    return f"{url.scheme}://{host}{port}"


# --- keys ---------------------------------------------------------------------------------------


def load_vapid_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The VAPID key from a PEM file or from the raw key in base64url; the error says what is
    wrong, never what is in it."""
    try:
        data = path.read_bytes().strip()
    except OSError as exc:
        raise WebPushConfigurationError(
            f"WEBPUSH_VAPID_PRIVATE_KEY_FILE cannot be read ({type(exc).__name__})"
        ) from None
    if data.startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (TypeError, ValueError):
            raise WebPushConfigurationError(
                "WEBPUSH_VAPID_PRIVATE_KEY_FILE is not an unencrypted PEM private key"
            ) from None
    else:
        try:
            raw = b64url_decode(data.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raw = b""
        if len(raw) != 32:
            raise WebPushConfigurationError(
                "WEBPUSH_VAPID_PRIVATE_KEY_FILE is neither PEM nor a 32-byte base64url key"
            )
        try:
            key = ec.derive_private_key(int.from_bytes(raw, "big"), ec.SECP256R1())
        except ValueError:
            raise WebPushConfigurationError(
                "WEBPUSH_VAPID_PRIVATE_KEY_FILE is not a valid P-256 key"
            ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise WebPushConfigurationError(
            "WEBPUSH_VAPID_PRIVATE_KEY_FILE is not a P-256 key (VAPID signs with ES256)"
        )
    return key


def subscription_keys(keys: WebPushKeys) -> tuple[ec.EllipticCurvePublicKey, bytes, bytes]:
    """The browser's public key (and its 65 bytes) and the 16-byte auth secret."""
    try:
        ua_public = b64url_decode(keys.p256dh)
        auth_secret = b64url_decode(keys.auth)
    except ValueError:
        raise SubscriptionKeysInvalid("subscription keys are not base64url") from None
    if len(ua_public) != PUBLIC_KEY_BYTES or len(auth_secret) != AUTH_SECRET_BYTES:
        raise SubscriptionKeysInvalid("subscription keys have the wrong length")
    try:
        ua_key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), ua_public)
    except ValueError:
        raise SubscriptionKeysInvalid("p256dh is not a P-256 point") from None
    return ua_key, ua_public, auth_secret


# --- RFC 8291 -----------------------------------------------------------------------------------


def _hkdf(secret: bytes, *, salt: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(secret)


def encrypt(
    plaintext: bytes,
    keys: WebPushKeys,
    *,
    salt: bytes | None = None,
    sender_key: ec.EllipticCurvePrivateKey | None = None,
) -> bytes:
    """The aes128gcm message body for one subscription (RFC 8291 §3.4, RFC 8188 §2).

    `salt` and `sender_key` are fresh for every message; tests pass fixed ones to reproduce the
    RFC's example.
    """
    if len(plaintext) > MAX_PLAINTEXT_BYTES:
        raise ValueError("plaintext too long for one record")
    ua_key, ua_public, auth_secret = subscription_keys(keys)
    sender_key = sender_key or ec.generate_private_key(ec.SECP256R1())
    salt = salt if salt is not None else os.urandom(SALT_BYTES)
    as_public = public_key_bytes(sender_key.public_key())
    ecdh_secret = sender_key.exchange(ec.ECDH(), ua_key)
    ikm = _hkdf(ecdh_secret, salt=auth_secret, info=KEY_INFO + ua_public + as_public, length=32)
    cek = _hkdf(ikm, salt=salt, info=CEK_INFO, length=16)
    nonce = _hkdf(ikm, salt=salt, info=NONCE_INFO, length=12)
    ciphertext = AESGCM(cek).encrypt(nonce, plaintext + PADDING_DELIMITER, None)
    header = salt + RECORD_SIZE.to_bytes(4, "big") + bytes([len(as_public)]) + as_public
    return header + ciphertext


# --- payload and headers ------------------------------------------------------------------------


def encode(payload: dict[str, Any]) -> bytes:
    # UTF-8 rather than \\u escapes: a non-ASCII character costs 2-4 bytes instead of 6-12.
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


def _payload(job: PushRequested, *, title: str, body: str) -> dict[str, Any]:
    return {
        # Lets the service worker tell a notification to show from a recall ("recall").
        "type": "notification",
        "title": title,
        "body": body,
        "message_id": str(job.message_id),
        "room_id": str(job.room_id),
        "notification_id": str(job.notification_id),
        # For `navigator.setAppBadge`.
        **({} if job.badge is None else {"badge": job.badge}),
    }


def recall_payload(job: PushRequested, recall: PushRecall) -> dict[str, Any]:
    """A recall's JSON: the service worker closes the notifications shown whose tag is one of
    `room_ids` (it shows a room's under the room's id) or whose `data.notification_id` is one of
    `notification_ids`, and sets the app's badge to `badge` when there is one. As many ids as fit
    `MAX_PLAINTEXT_BYTES` (`fit_recall`)."""
    badge = {} if job.badge is None else {"badge": job.badge}

    def payload(rooms: list[str], ids: list[str]) -> dict[str, Any]:
        return {"type": "recall", "room_ids": rooms, "notification_ids": ids, **badge}

    rooms, ids = fit_recall(
        recall, lambda rooms, ids: len(encode(payload(rooms, ids))) <= MAX_PLAINTEXT_BYTES
    )
    return payload(rooms, ids)


def build_payload(job: PushRequested) -> bytes:
    """The JSON the service worker receives, at most `MAX_PLAINTEXT_BYTES`: the body gives way
    first (with an ellipsis, on a character boundary), then the title. A recall's:
    `recall_payload`."""
    if job.recall is not None:
        return encode(recall_payload(job, job.recall))

    def size(title: str, body: str) -> int:
        return len(encode(_payload(job, title=title, body=body)))

    title, body = job.title, job.body
    if size(title, body) > MAX_PLAINTEXT_BYTES:
        body = truncate_to_size(
            body, MAX_PLAINTEXT_BYTES, size=lambda candidate: size(title, candidate)
        )
        if size(title, body) > MAX_PLAINTEXT_BYTES:
            body = ""
            title = truncate_to_size(
                title, MAX_PLAINTEXT_BYTES, size=lambda candidate: size(candidate, "")
            )
    return encode(_payload(job, title=title, body=body))


def topic(job: PushRequested) -> str:
    """RFC 8030 `Topic` (at most 32 base64url characters): the notification id's 16 bytes, 22
    characters. A push with the same topic replaces one still waiting at the push service."""
    return b64url_encode(job.notification_id.bytes)  # always 22 <= TOPIC_MAX_CHARS


# --- answers ------------------------------------------------------------------------------------


def classify(status_code: int, headers: httpx.Headers) -> ProviderAnswer:
    """One push service answer → what to do (docs/providers.md, "Web Push"):

    * 201 Created (202 Accepted with `Prefer: respond-async`), any 2xx → accepted;
    * 404 Not Found, 410 Gone → the subscription expired or was unsubscribed: the device is dead;
    * 401 Unauthorized, 403 Forbidden → VAPID refused for this subscription: this push is
      refused for good (see below);
    * 429 and 5xx → transient, honouring `Retry-After`;
    * 400, 413 (payload too large) and any other 4xx → this push is refused for good.

    401 and 403 are taken as answers about one subscription, not as our configuration (which
    opens the breaker at once and holds every browser's pushes). RFC 8292 §4.2 answers 403 when
    our key is not the one the subscription was created with (an applicationServerKey the client
    chose: anyone can register such a subscription), and Mozilla's autopush answers that same
    mismatch with 401 (errno 109), as it does every VAPID refusal; so a 401 is in reach of any
    user too. What of ours a 401 could otherwise mean is checked before any send (the key at
    start-up, the `sub` by the settings), or is our clock (`exp`) off by half a day or more. Nor
    is the subscription dead: were our key the wrong one, every subscription would get this
    answer, and invalidating would delete every browser (as FCM's 404 without `UNREGISTERED`).
    So only this push fails (rejected, dead-lettered: should it be every push, the dead-letter
    alert says so).
    """
    reason = f"webpush {status_code}"
    if 200 <= status_code < 300:
        return ProviderAnswer.accepted()
    if status_code in {404, 410}:
        return ProviderAnswer(Verdict.TOKEN_INVALID, reason)
    if status_code in {401, 403}:
        return ProviderAnswer(Verdict.REJECTED, reason)
    if status_code == 429 or status_code >= 500:
        return ProviderAnswer.transient(reason, parse_retry_after(headers.get("retry-after")))
    if 300 <= status_code < 400:
        # Redirects are never followed: a push service does not send them, anyone else may
        # want to send us somewhere the allowlist would refuse.
        return ProviderAnswer(Verdict.REJECTED, f"{reason} redirect not followed")
    if 400 <= status_code < 500:
        return ProviderAnswer(Verdict.REJECTED, reason)
    return ProviderAnswer.transient(f"webpush unexpected status {status_code}")


class VapidTokens:
    """The VAPID JWT of each push-service origin, reused until half its lifetime has passed.
    Making one needs no I/O, so no lock."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, *, subject: str, clock: Clock) -> None:
        self._key = key
        self.subject = subject
        self.public_key = b64url_encode(public_key_bytes(key.public_key()))
        self._clock = clock
        self._tokens: dict[str, tuple[str, float]] = {}  # origin → (JWT, expiry)

    def authorization(self, origin: str) -> str:
        return f"vapid t={self.token(origin)}, k={self.public_key}"

    def token(self, origin: str) -> str:
        now = self._clock()
        cached = self._tokens.get(origin)
        if cached is not None and cached[1] - now > VAPID_LIFETIME / 2:
            return cached[0]
        expiry = int(now) + VAPID_LIFETIME
        token = jwt.encode(
            {"aud": origin, "exp": expiry, "sub": self.subject},
            self._key,
            algorithm="ES256",
            headers={"typ": "JWT"},
        )
        if len(self._tokens) >= VAPID_CACHE_SIZE:
            self._tokens.clear()
        self._tokens[origin] = (token, float(expiry))
        return token


class WebPushProvider:
    """Sends through one shared `httpx.AsyncClient` (closed by `aclose`)."""

    name = "webpush"

    def __init__(
        self,
        *,
        key: ec.EllipticCurvePrivateKey,
        subject: str,
        allowed_hosts: Iterable[str],
        ttl: int,
        timeout: float,
        max_connections: int = 100,
        clock: Clock = time.time,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.allowed_hosts = tuple(allowed_hosts)
        self.ttl = ttl
        # One POST: the backstop for one whole send, enforced, since the ledger's lease is based
        # on it.
        self.deadline = timeout + 1.0
        self.vapid = VapidTokens(key, subject=subject, clock=clock)
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            headers={"user-agent": "herald-push-sender"},
            follow_redirects=False,
            transport=transport,
        )

    @classmethod
    def from_settings(
        cls, settings: WebPushSettings, *, max_connections: int = 100
    ) -> WebPushProvider:
        if settings.vapid_private_key_file is None or settings.vapid_subject is None:
            raise WebPushConfigurationError(
                "WEBPUSH_VAPID_PRIVATE_KEY_FILE and WEBPUSH_VAPID_SUBJECT must be set"
            )
        return cls(
            key=load_vapid_key(settings.vapid_private_key_file),
            subject=settings.vapid_subject,
            allowed_hosts=settings.allowed_hosts,
            ttl=settings.ttl,
            timeout=settings.timeout,
            max_connections=max_connections,
        )

    def headers(self, job: PushRequested, endpoint: str) -> dict[str, str]:
        return {
            "authorization": self.vapid.authorization(origin_of(endpoint)),
            "ttl": str(self.ttl),
            # high for a DM or a mention; normal lets a device on battery wait (RFC 8030 5.3).
            # A recall is high too: what it takes away may have come at high, and it is worth
            # something only if it comes before the user looks at the screen; it shows nothing
            # and is small, so it costs the device little.
            "urgency": "high" if job.urgent else "normal",
            "topic": topic(job),
            "content-encoding": "aes128gcm",
            "content-type": "application/octet-stream",
        }

    async def send(self, job: PushRequested) -> ProviderAnswer:
        endpoint = job.token
        # Again before every POST, whatever message-service accepted: the allowlist may have
        # changed since, and a job is a message anyone with access to the broker could write.
        problem = endpoint_problem(endpoint, self.allowed_hosts)
        if problem is not None:
            return ProviderAnswer(Verdict.REJECTED, f"webpush {problem}")
        if job.web_push_keys is None:
            return ProviderAnswer(Verdict.REJECTED, "webpush subscription keys missing")
        try:
            body = encrypt(build_payload(job), job.web_push_keys)
        except SubscriptionKeysInvalid as exc:
            return ProviderAnswer(Verdict.REJECTED, f"webpush {exc}")
        try:
            async with asyncio.timeout(self.deadline):
                response = await self._client.post(
                    endpoint, content=body, headers=self.headers(job, endpoint)
                )
        except (TimeoutError, httpx.TimeoutException):
            return ProviderAnswer.transient("webpush timeout")
        except httpx.HTTPError as exc:
            return ProviderAnswer.transient(f"webpush connection failed ({type(exc).__name__})")
        answer = classify(response.status_code, response.headers)
        return ProviderAnswer(answer.verdict, answer.reason[:REASON_LIMIT], answer.retry_after)

    async def aclose(self) -> None:
        await self._client.aclose()
