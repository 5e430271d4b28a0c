"""A local Apple Push Notification service for tests: the HTTP/2 provider API on 127.0.0.1, in its
own thread (hypercorn, HTTP/2 over cleartext with prior knowledge), with scripted failures.

```python
apns = FakeApns()                # topic "chat.herald.ios", a random team id
apns.start()                     # apns.base_url
key = apns.write_key(tmp_path / "AuthKey.p8")       # APNS_KEY_FILE; apns.key_id is its id
apns.fail(TOKEN_B, 503, "ServiceUnavailable", times=2)     # two 503s, then accepted
apns.fail(TOKEN_C, 410, "Unregistered", timestamp=ms)      # dead since `ms` (default: now)
apns.fail(TOKEN_D, 429, "TooManyRequests", retry_after=7, times=1)
apns.stall(TOKEN_E, 2.0, times=1)                   # answers only after 2 s
apns.expire_provider_token()     # every JWT seen so far now gets 403 ExpiredProviderToken
...
apns.accepted                    # [(headers, payload), ...]; headers include ":path"
apns.messages_to(TOKEN_A)        # the same, of one device
apns.http_versions               # the HTTP version of every request ("2")
apns.provider_tokens             # the distinct JWTs seen, in order
apns.stop()
```

It checks what APNs checks, so a client sees what it would see from Apple:

* HTTP/2 only: any other version is answered 505 (Apple's servers offer only h2).
* `authorization: bearer <JWT>`: ES256, signature verified with the public half of a key that
  `write_key` wrote (chosen by the header's `kid`), `iss` = the team id, `iat` at most one hour
  old (else 403 `ExpiredProviderToken`) and not in the future (else 403 `InvalidProviderToken`,
  like a bad signature, an unknown `kid` or a wrong team); 403 `MissingProviderToken` without one.
* `apns-topic`: missing → 400 `MissingTopic`; not one of the team's topics → 400
  `TopicDisallowed`; one of the team's other apps → 400 `DeviceTokenNotForTopic` (the fake's
  devices all belong to `topic`).
* The device token in `/3/device/<token>`: 64 hex digits, else 400 `BadDeviceToken`.
* `apns-push-type` (required, a known type: 400 `InvalidPushType`), `apns-priority` (1, 5 or 10:
  400 `BadPriority`), `apns-expiration` (an integer: 400 `BadExpirationDate`), `apns-collapse-id`
  (≤ 64 bytes: 400 `BadCollapseId`), `apns-id` (a UUID: 400 `BadMessageId`).
* The payload: not empty (400 `PayloadEmpty`), ≤ 4096 bytes (413 `PayloadTooLarge`), and, stricter
  than Apple, a UTF-8 JSON object with an `aps` object (400 `BadPayload`, a fake-only reason).
* A background push (`apns-push-type: background`), as Apple documents it: `apns-priority` 5 (10,
  or none, which means 10, is 400 `BadPriority`) and, stricter than Apple, which documents it but
  does not refuse it, an `aps` with `content-available` 1 and no `alert`, `sound` or `badge` (400
  `BadPayload`).

A success is `200` with an empty body and the `apns-id` echoed (or made up); an error is
`{"reason": "..."}` (plus `"timestamp"` in ms for 410) with an `apns-id` header.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import string
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypercorn.asyncio import serve
from hypercorn.config import Config
from hypercorn.typing import ASGIFramework
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

MAX_PAYLOAD_BYTES = 4096
MAX_COLLAPSE_ID_BYTES = 64
MAX_PROVIDER_TOKEN_AGE = 3600  # seconds
CLOCK_SKEW = 60  # seconds an `iat` may be ahead of the fake's clock
PUSH_TYPES = {"alert", "background", "voip", "complication", "fileprovider", "mdm", "location"}
HEX = set(string.hexdigits)
ID_ALPHABET = string.ascii_uppercase + string.digits


def apple_id() -> str:
    """A key or team identifier as Apple makes them: 10 upper-case letters or digits."""
    return "".join(secrets.choice(ID_ALPHABET) for _ in range(10))


def device_token() -> str:
    """A well-formed APNs device token: 32 random bytes in hex."""
    return secrets.token_hex(32)


@dataclass
class _Script:
    status: int  # 0: stall, then answer normally
    reason: str
    remaining: int | None  # None: for ever
    retry_after: int | None = None
    timestamp: int | None = None
    seconds: float = 0.0


def _error(
    status: int,
    reason: str,
    apns_id: str,
    *,
    timestamp: int | None = None,
    retry_after: int | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {"reason": reason}
    if timestamp is not None:
        body["timestamp"] = timestamp
    headers = {"apns-id": apns_id}
    if retry_after is not None:
        headers["retry-after"] = str(retry_after)
    return JSONResponse(body, status_code=status, headers=headers)


def _silent(aps: dict[str, Any]) -> bool:
    """Whether `aps` is what Apple wants of a background push: it wakes the app and shows, plays
    and badges nothing."""
    return aps.get("content-available") == 1 and not {"alert", "sound", "badge"} & set(aps)


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return len(value) == 36


class FakeApns:
    """The APNs provider API on 127.0.0.1:<free port>; see the module docstring."""

    def __init__(
        self,
        topic: str = "chat.herald.ios",
        *,
        team_id: str | None = None,
        other_team_topics: tuple[str, ...] = ("chat.herald.other",),
    ) -> None:
        self.topic = topic
        self.team_id = team_id or apple_id()
        # Topics of the team's other apps: allowed for the key, but no device of ours is there.
        self.team_topics = {topic, *other_team_topics}
        self.host = "127.0.0.1"
        self.port = 0
        self.base_url = ""
        self.key_id = ""  # of the last key `write_key` made
        self.accepted: list[tuple[dict[str, str], dict[str, Any]]] = []
        self.http_versions: list[str] = []
        self.provider_tokens: list[str] = []
        # Every request that reached the device endpoint, whatever its answer.
        self.requests = 0
        self._lock = threading.Lock()
        self._keys: dict[str, ec.EllipticCurvePublicKey] = {}
        self._expired: set[str] = set()
        self._scripts: dict[str, list[_Script]] = {}
        self._stopping = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._shutdown: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("FakeApns already started")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, 0))
        # Listening before the server runs: a client that connects early waits in the backlog.
        sock.listen(128)
        self.port = sock.getsockname()[1]
        self.base_url = f"http://{self.host}:{self.port}"
        config = Config()
        config.bind = [f"fd://{sock.detach()}"]  # hypercorn owns the socket from here
        config.accesslog = None
        config.errorlog = None  # leave the test process's logging alone
        config.graceful_timeout = 1.0
        ready = threading.Event()
        self._stopping.clear()
        thread = threading.Thread(
            target=self._run, args=(config, ready), name="fake-apns", daemon=True
        )
        self._thread = thread
        thread.start()
        if not ready.wait(10):
            raise RuntimeError("FakeApns did not start")

    def _run(self, config: Config, ready: threading.Event) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._shutdown = asyncio.Event()
            ready.set()
            app = cast(ASGIFramework, self._app())  # Starlette's ASGI types are looser
            await serve(app, config, shutdown_trigger=self._shutdown.wait, mode="asgi")

        asyncio.run(main())

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stopping.set()  # ends stalls at once
        if self._loop is not None and self._shutdown is not None:
            self._loop.call_soon_threadsafe(self._shutdown.set)
        self._thread.join(timeout=10)
        self._thread = self._loop = self._shutdown = None

    def __enter__(self) -> FakeApns:
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

    def write_key(self, path: Path, *, key_id: str | None = None) -> Path:
        """Write a `.p8` file (PKCS#8 PEM, P-256) whose public half the fake then accepts for
        tokens whose `kid` is `key_id` (default: a new one, kept in `self.key_id`)."""
        key = ec.generate_private_key(ec.SECP256R1())
        key_id = key_id or apple_id()
        with self._lock:
            self._keys[key_id] = key.public_key()
            self.key_id = key_id
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return path

    def fail(
        self,
        device_token: str,
        status: int,
        reason: str,
        *,
        times: int | None = None,
        timestamp: int | None = None,
        retry_after: int | None = None,
    ) -> None:
        """Answer well-formed sends to `device_token` with HTTP `status` and `{"reason": reason}`
        (410: plus `timestamp`, ms since the epoch, default the moment of the answer), a
        `Retry-After` header if given; `times` times, or for ever. Scripts of one token apply in
        the order they were added."""
        self._script(device_token, _Script(status, reason, times, retry_after, timestamp))

    def stall(self, device_token: str, seconds: float, *, times: int | None = None) -> None:
        """Hold sends to `device_token` for `seconds` before answering (a slow APNs)."""
        self._script(device_token, _Script(0, "", times, seconds=seconds))

    def expire_provider_token(self) -> None:
        """Every provider token seen so far is answered 403 `ExpiredProviderToken` from now on,
        as if it had aged past the hour."""
        with self._lock:
            self._expired.update(self.provider_tokens)

    def messages_to(self, device_token: str) -> list[tuple[dict[str, str], dict[str, Any]]]:
        path = f"/3/device/{device_token}"
        with self._lock:
            return [(h, p) for h, p in self.accepted if h[":path"] == path]

    def _script(self, device_token: str, script: _Script) -> None:
        if script.remaining is not None and script.remaining < 1:
            raise ValueError("times must be at least 1")
        with self._lock:
            self._scripts.setdefault(device_token, []).append(script)

    def _take(self, device_token: str, *, stall: bool = True) -> _Script | None:
        with self._lock:
            scripts = self._scripts.get(device_token, [])
            if not scripts or (not stall and scripts[0].status == 0):
                return None
            script = scripts[0]
            if script.remaining is not None:
                script.remaining -= 1
                if script.remaining == 0:
                    scripts.pop(0)
            return script

    # -- HTTP ----------------------------------------------------------------------------------

    def _app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/3/device/{token}", self._device, methods=["POST"]),
                Route("/3/device/", self._missing_token, methods=["POST"]),
            ]
        )

    async def _missing_token(self, request: Request) -> Response:
        await request.body()
        return _error(
            400, "MissingDeviceToken", request.headers.get("apns-id") or str(uuid.uuid4())
        )

    async def _device(self, request: Request) -> Response:
        # Read the whole request before answering: hypercorn drops an HTTP/2 connection whose
        # client is still sending DATA on a stream that was already answered.
        body = await request.body()
        version = str(request.scope.get("http_version", ""))
        with self._lock:
            self.requests += 1
            self.http_versions.append(version)
        if version != "2":
            return Response("APNs speaks HTTP/2 only\n", status_code=505)
        headers = request.headers
        apns_id = headers.get("apns-id") or str(uuid.uuid4())
        token = request.path_params["token"]

        problem = self._check_provider_token(headers.get("authorization", ""))
        if problem is not None:
            return _error(403, problem, apns_id)
        topic = headers.get("apns-topic")
        if not topic:
            return _error(400, "MissingTopic", apns_id)
        if topic not in self.team_topics:
            return _error(400, "TopicDisallowed", apns_id)
        if len(token) != 64 or not set(token) <= HEX:
            return _error(400, "BadDeviceToken", apns_id)
        if topic != self.topic:
            return _error(400, "DeviceTokenNotForTopic", apns_id)
        header_problem = self._check_headers(headers.get)
        if header_problem is not None:
            return _error(400, header_problem, apns_id)
        if not body:
            return _error(400, "PayloadEmpty", apns_id)
        if len(body) > MAX_PAYLOAD_BYTES:
            return _error(413, "PayloadTooLarge", apns_id)
        try:
            payload = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            payload = None
        if not isinstance(payload, dict) or not isinstance(payload.get("aps"), dict):
            return _error(400, "BadPayload", apns_id)
        if headers.get("apns-push-type") == "background" and not _silent(payload["aps"]):
            return _error(400, "BadPayload", apns_id)

        script = self._take(token)
        if script is not None and script.status == 0:
            await asyncio.to_thread(self._stopping.wait, script.seconds)
            script = self._take(token, stall=False)
        if script is not None:
            timestamp = script.timestamp
            if script.status == 410 and timestamp is None:
                timestamp = int(time.time() * 1000)
            return _error(
                script.status,
                script.reason,
                apns_id,
                timestamp=timestamp,
                retry_after=script.retry_after,
            )
        recorded = {name: value for name, value in headers.items()}
        recorded[":path"] = request.url.path
        with self._lock:
            self.accepted.append((recorded, payload))
        return Response(status_code=200, headers={"apns-id": apns_id})

    @staticmethod
    def _check_headers(get: Any) -> str | None:
        push_type = get("apns-push-type")
        if push_type not in PUSH_TYPES:
            return "InvalidPushType"
        priority = get("apns-priority", "10")
        if priority not in {"1", "5", "10"}:
            return "BadPriority"
        if push_type == "background" and priority != "5":
            return "BadPriority"
        expiration = get("apns-expiration")
        if expiration is not None and not expiration.isdigit():
            return "BadExpirationDate"
        collapse_id = get("apns-collapse-id")
        if collapse_id is not None and len(collapse_id.encode()) > MAX_COLLAPSE_ID_BYTES:
            return "BadCollapseId"
        apns_id = get("apns-id")
        if apns_id is not None and not _is_uuid(apns_id):
            return "BadMessageId"
        return None

    def _check_provider_token(self, authorization: str) -> str | None:
        """None when the provider token is good, else the APNs reason for refusing it."""
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return "MissingProviderToken"
        with self._lock:
            if token not in self.provider_tokens:
                self.provider_tokens.append(token)
            expired = token in self._expired
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return "InvalidProviderToken"
        key_id = header.get("kid")
        with self._lock:
            public_key = self._keys.get(key_id) if isinstance(key_id, str) else None
        if header.get("alg") != "ES256" or public_key is None:
            return "InvalidProviderToken"
        try:
            claims = jwt.decode(
                token,
                public_key,
                algorithms=["ES256"],
                issuer=self.team_id,
                leeway=CLOCK_SKEW,
                options={"require": ["iss", "iat"]},
            )
        except jwt.PyJWTError:
            return "InvalidProviderToken"
        issued_at = claims["iat"]
        if not isinstance(issued_at, int):
            return "InvalidProviderToken"
        if expired or time.time() - issued_at > MAX_PROVIDER_TOKEN_AGE:
            return "ExpiredProviderToken"
        return None
