"""A local Web Push service for tests: RFC 8030 push resources on 127.0.0.1, in its own thread,
that decrypt every message (RFC 8291) and verify its VAPID authorisation (RFC 8292), with
scripted failures.

```python
push = FakeWebPush()
push.start()                                  # push.origin == "http://127.0.0.1:<port>"
browser = push.subscribe()                    # a browser's PushSubscription.toJSON()
browser.endpoint, browser.keys                # {"p256dh": ..., "auth": ...}
push.subscribe(application_server_key=k)      # bound to a VAPID key: any other k gets 403
push.fail(browser, 503, times=2)              # two 503s, then accepted
push.fail(browser, 429, retry_after=7, times=1)
push.unsubscribe(browser)                     # 410 Gone from now on
push.stall(browser, 2.0, times=1)             # answers only after 2 s
...
push.received                                 # every accepted push, decrypted
push.requests                                 # every POST that reached a push resource
push.stop()
```

Like a real push service it answers 201 Created with a `Location`, 400 for a message it cannot
take (no `TTL`, a bad `Topic` or `Urgency`, a content encoding other than aes128gcm), 401 for a
missing or invalid VAPID authorisation, 403 when the key is not the one the subscription was
made with, 404 for an unknown subscription, 410 for one that is gone, 413 beyond 4096 bytes.
Unlike a real one, it also decrypts the body with the subscription's private key, which proves
the encryption right: a message it cannot decrypt is refused (400) and counted in `undecryptable`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import itertools
import json
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import jwt
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.fakes.served import ServedApp

MAX_BODY_BYTES = 4096
MAX_JWT_LIFETIME = 24 * 3600
URGENCIES = {"very-low", "low", "normal", "high"}
TOPIC = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
VAPID = re.compile(r"^vapid\s+t=(?P<t>[^,\s]+)\s*,\s*k=(?P<k>[A-Za-z0-9_-]+=*)$", re.IGNORECASE)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def unb64url(text: str) -> bytes:
    text = text.rstrip("=")
    return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)


def _hkdf(secret: bytes, *, salt: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(secret)


def _public_bytes(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


class DecryptionError(ValueError):
    pass


def decrypt(body: bytes, private_key: ec.EllipticCurvePrivateKey, auth_secret: bytes) -> bytes:
    """The user agent's side of RFC 8291 §3.4 / RFC 8188 §2, for a single record."""
    if len(body) < 21:
        raise DecryptionError("body shorter than the aes128gcm header")
    salt, record_size, id_length = body[:16], int.from_bytes(body[16:20], "big"), body[20]
    key_id, ciphertext = body[21 : 21 + id_length], body[21 + id_length :]
    if record_size < 18 or len(ciphertext) > record_size:
        raise DecryptionError("more than one record, or a record size too small")
    try:
        sender = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), key_id)
    except ValueError:
        raise DecryptionError("keyid is not the sender's P-256 public key") from None
    ua_public = _public_bytes(private_key.public_key())
    ikm = _hkdf(
        private_key.exchange(ec.ECDH(), sender),
        salt=auth_secret,
        info=b"WebPush: info\x00" + ua_public + key_id,
        length=32,
    )
    cek = _hkdf(ikm, salt=salt, info=b"Content-Encoding: aes128gcm\x00", length=16)
    nonce = _hkdf(ikm, salt=salt, info=b"Content-Encoding: nonce\x00", length=12)
    try:
        padded = AESGCM(cek).decrypt(nonce, ciphertext, None)
    except InvalidTag:
        raise DecryptionError("authentication tag does not match") from None
    unpadded = padded.rstrip(b"\x00")
    if not unpadded.endswith(b"\x02"):
        raise DecryptionError("the last record lacks the 0x02 padding delimiter")
    return unpadded[:-1]


@dataclass
class Subscription:
    """What a browser holds: its key pair and auth secret; `endpoint` and `keys` are what it
    gives the application server (PushSubscription.toJSON())."""

    id: str
    endpoint: str
    private_key: ec.EllipticCurvePrivateKey = field(repr=False)
    auth_secret: bytes = field(repr=False)
    application_server_key: str | None = None

    @property
    def keys(self) -> dict[str, str]:
        return {
            "p256dh": b64url(_public_bytes(self.private_key.public_key())),
            "auth": b64url(self.auth_secret),
        }

    def to_json(self) -> dict[str, Any]:
        return {"endpoint": self.endpoint, "expirationTime": None, "keys": self.keys}


@dataclass(frozen=True)
class Received:
    """One accepted push: the decrypted payload (JSON-decoded when it is JSON), the request's
    headers (lower-case names) and the verified VAPID claims."""

    subscription_id: str
    plaintext: bytes
    headers: dict[str, str]
    claims: dict[str, Any]
    body_size: int

    @property
    def payload(self) -> Any:
        return json.loads(self.plaintext)


@dataclass
class _Script:
    status: int  # 0: stall, then answer normally
    remaining: int | None  # None: for ever
    retry_after: int | None = None
    seconds: float = 0.0


class FakeWebPush:
    """A push service on 127.0.0.1:<free port>; see the module docstring."""

    def __init__(self) -> None:
        self.host = "127.0.0.1"
        self.port = 0
        self.origin = ""
        self.received: list[Received] = []
        self.requests = 0
        # Why messages were refused (a short code each), e.g. "vapid: exp too far".
        self.refusals: list[str] = []
        self.undecryptable = 0
        self._subscriptions: dict[str, Subscription] = {}
        self._gone: set[str] = set()
        self._scripts: dict[str, list[_Script]] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._served: ServedApp | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        if self._served is not None:
            raise RuntimeError("FakeWebPush already started")
        self._stopping.clear()
        app = Starlette(routes=[Route("/push/{subscription_id}", self._push, methods=["POST"])])
        self._served = ServedApp(app, "fake-webpush", host=self.host)
        self.port = self._served.port
        self.origin = self._served.base_url

    def stop(self) -> None:
        if self._served is None:
            return
        self._stopping.set()  # ends stalls at once
        self._served.stop()
        self._served = None

    def __enter__(self) -> FakeWebPush:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # -- test controls -------------------------------------------------------------------------

    def subscribe(self, *, application_server_key: str | None = None) -> Subscription:
        """A new subscription, as a browser's `pushManager.subscribe()` makes one: its own P-256
        key pair and 16-byte auth secret. Call after `start()` (the endpoint names the port)."""
        if not self.origin:
            raise RuntimeError("start FakeWebPush before subscribing")
        subscription_id = secrets.token_urlsafe(24)
        subscription = Subscription(
            id=subscription_id,
            endpoint=f"{self.origin}/push/{subscription_id}",
            private_key=ec.generate_private_key(ec.SECP256R1()),
            auth_secret=secrets.token_bytes(16),
            application_server_key=application_server_key,
        )
        with self._lock:
            self._subscriptions[subscription_id] = subscription
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        """The browser dropped it: 410 Gone from now on."""
        with self._lock:
            self._gone.add(subscription.id)

    def fail(
        self,
        subscription: Subscription,
        status: int,
        *,
        times: int | None = None,
        retry_after: int | None = None,
    ) -> None:
        """Answer pushes to `subscription` with `status` (and `Retry-After` if given), `times`
        times or for ever, after the message was checked (so it was valid)."""
        self._script(subscription, _Script(status, times, retry_after))

    def stall(
        self, subscription: Subscription, seconds: float, *, times: int | None = None
    ) -> None:
        """Hold pushes to `subscription` for `seconds` before answering (a slow push service)."""
        self._script(subscription, _Script(0, times, seconds=seconds))

    def received_by(self, subscription: Subscription) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.subscription_id == subscription.id]

    def _script(self, subscription: Subscription, script: _Script) -> None:
        if script.remaining is not None and script.remaining < 1:
            raise ValueError("times must be at least 1")
        with self._lock:
            self._scripts.setdefault(subscription.id, []).append(script)

    def _take(self, subscription_id: str, *, stall: bool = True) -> _Script | None:
        with self._lock:
            scripts = self._scripts.get(subscription_id, [])
            if not scripts or (not stall and scripts[0].status == 0):
                return None
            script = scripts[0]
            if script.remaining is not None:
                script.remaining -= 1
                if script.remaining == 0:
                    scripts.pop(0)
            return script

    # -- HTTP ----------------------------------------------------------------------------------

    def _refuse(self, status: int, why: str) -> Response:
        with self._lock:
            self.refusals.append(why)
        return Response(json.dumps({"errno": status, "message": why}), status_code=status)

    async def _push(self, request: Request) -> Response:
        with self._lock:
            self.requests += 1
            subscription = self._subscriptions.get(request.path_params["subscription_id"])
            gone = subscription is not None and subscription.id in self._gone
        if subscription is None:
            return self._refuse(404, "unknown subscription")
        if gone:
            return self._refuse(410, "subscription gone")
        claims_or_refusal = self._check_vapid(request, subscription)
        if isinstance(claims_or_refusal, Response):
            return claims_or_refusal
        headers = {name.lower(): value for name, value in request.headers.items()}
        problem = _header_problem(headers)
        if problem is not None:
            return self._refuse(400, problem)
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            return self._refuse(413, "payload too large")
        try:
            plaintext = decrypt(body, subscription.private_key, subscription.auth_secret)
        except DecryptionError as exc:
            with self._lock:
                self.undecryptable += 1
            return self._refuse(400, f"decryption failed: {exc}")
        script = self._take(subscription.id)
        if script is not None and script.status == 0:
            await asyncio.to_thread(self._stopping.wait, script.seconds)
            script = self._take(subscription.id, stall=False)
        if script is not None:
            extra = {"retry-after": str(script.retry_after)} if script.retry_after else None
            return Response(status_code=script.status, headers=extra)
        with self._lock:
            self.received.append(
                Received(subscription.id, plaintext, headers, claims_or_refusal, len(body))
            )
            message_id = next(self._ids)
        return Response(
            status_code=201, headers={"location": f"{self.origin}/message/{message_id}"}
        )

    def _check_vapid(
        self, request: Request, subscription: Subscription
    ) -> dict[str, Any] | Response:
        match = VAPID.match(request.headers.get("authorization", "").strip())
        if match is None:
            return self._refuse(401, "vapid: missing or malformed authorization")
        try:
            key_bytes = unb64url(match["k"])
            key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), key_bytes)
        except (binascii.Error, ValueError):
            return self._refuse(401, "vapid: k is not a P-256 public key")
        if (
            subscription.application_server_key is not None
            and match["k"].rstrip("=") != subscription.application_server_key
        ):
            return self._refuse(403, "vapid: key differs from the subscription's")
        try:
            claims: dict[str, Any] = jwt.decode(
                match["t"],
                key,
                algorithms=["ES256"],
                audience=self.origin,
                options={"require": ["aud", "exp", "sub"]},
            )
        except jwt.PyJWTError as exc:
            return self._refuse(401, f"vapid: {type(exc).__name__}")
        if int(claims["exp"]) - time.time() > MAX_JWT_LIFETIME:
            return self._refuse(401, "vapid: exp more than 24 hours away")
        subject = claims["sub"]
        if not isinstance(subject, str) or not subject.startswith(("mailto:", "https:")):
            return self._refuse(401, "vapid: sub is not a mailto: or https: URI")
        return claims


def _header_problem(headers: dict[str, str]) -> str | None:
    ttl = headers.get("ttl")
    if ttl is None or not ttl.isdigit():
        return "TTL header missing or not a number"
    if headers.get("content-encoding") != "aes128gcm":
        return "content-encoding is not aes128gcm"
    urgency = headers.get("urgency")
    if urgency is not None and urgency not in URGENCIES:
        return "unknown urgency"
    topic = headers.get("topic")
    if topic is not None and not TOPIC.match(topic):
        return "topic is not at most 32 base64url characters"
    return None
