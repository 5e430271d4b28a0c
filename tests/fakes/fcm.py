"""A local Firebase Cloud Messaging server for tests: FCM HTTP v1 plus Google's OAuth2 token
endpoint, on 127.0.0.1, in its own thread, with scripted failures.

```python
fcm = FakeFcm()                  # project "herald-test"
fcm.start()                      # fcm.base_url, fcm.token_uri
credentials = fcm.write_credentials(tmp_path / "sa.json")   # FCM_CREDENTIALS_FILE
fcm.fail("token-b", 503, "UNAVAILABLE", times=2)            # two 503s for token-b, then accepted
fcm.fail("token-c", 404, "UNREGISTERED")                    # token-c is dead for ever
fcm.fail("token-d", 429, "QUOTA_EXCEEDED", retry_after=7, times=1)
fcm.fail("token-e", 400, "INVALID_ARGUMENT", field="message.token")  # malformed token
fcm.stall("token-f", 2.0, times=1)                          # answers only after 2 s
fcm.revoke_tokens()                                         # issued access tokens now get 401
...
fcm.accepted                     # every accepted request body: [{"message": {...}}, ...]
fcm.messages_to("token-a")       # the same, of one device
fcm.token_requests, fcm.send_requests
fcm.stop()
```

It speaks the real protocol, so a client sees what it would see from Google:

* `POST /token` takes the JWT-bearer grant (form-encoded `grant_type`, `assertion`), verifies the
  assertion's RS256 signature with the public key of the credentials it wrote (chosen by the
  JWT's `kid`), and its claims: `iss` (that key's client_email), `aud` (== `token_uri`), `scope`
  (firebase.messaging), `iat`/`exp` (not expired, at most one hour); it answers
  `{"access_token", "expires_in", "token_type": "Bearer"}` or an OAuth2 error (400
  `invalid_grant`, `invalid_scope`, `unsupported_grant_type`…).
* `POST /v1/projects/{project}/messages:send` wants `Authorization: Bearer <issued token>` (401
  `UNAUTHENTICATED` otherwise), the fake's project (403 `PERMISSION_DENIED` otherwise) and a
  well-formed message (400 `INVALID_ARGUMENT` with a `google.rpc.BadRequest` field violation
  otherwise; a data message, without `notification`, is well-formed); it answers
  `{"name": "projects/{p}/messages/<id>"}` or the scripted FCM v1 error.

Used by unit, integration and end-to-end tests; in the latter the push-sender runs as a separate
process and reaches it over TCP.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fakes.served import ServedApp

SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
BAD_REQUEST_TYPE = "type.googleapis.com/google.rpc.BadRequest"
MAX_ASSERTION_LIFETIME = 3600
MAX_PAYLOAD_BYTES = 4096

# google.rpc canonical codes by HTTP status, as FCM uses them.
CANONICAL_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ALREADY_EXISTS",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
MESSAGES = {
    "UNREGISTERED": "Requested entity was not found.",
    "QUOTA_EXCEEDED": "Quota exceeded for quota metric 'Send requests'.",
    "UNAVAILABLE": "The service is currently unavailable.",
    "INTERNAL": "Internal error encountered.",
    "SENDER_ID_MISMATCH": "SenderId mismatch",
    "THIRD_PARTY_AUTH_ERROR": "Auth error from APNS or Web Push Service",
}
MESSAGE_FIELDS = {
    "name",
    "data",
    "notification",
    "android",
    "webpush",
    "apns",
    "fcm_options",
    "token",
    "topic",
    "condition",
}
NOTIFICATION_FIELDS = {"title", "body", "image"}
ANDROID_FIELDS = {
    "collapse_key",
    "priority",
    "ttl",
    "restricted_package_name",
    "data",
    "notification",
    "fcm_options",
    "direct_boot_ok",
}
APNS_FIELDS = {"headers", "payload", "fcm_options"}


@dataclass
class _Script:
    status: int  # 0: stall, then answer normally
    error_code: str
    remaining: int | None  # None: for ever
    retry_after: int | None = None
    field: str | None = None
    seconds: float = 0.0


@dataclass(frozen=True)
class _ServiceAccount:
    client_email: str
    public_key: rsa.RSAPublicKey


def _fcm_error(
    status: int,
    error_code: str | None,
    message: str,
    *,
    violations: Sequence[tuple[str, str]] = (),
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    details: list[dict[str, Any]] = []
    if error_code:
        details.append({"@type": FCM_ERROR_TYPE, "errorCode": error_code})
    if violations:
        details.append(
            {
                "@type": BAD_REQUEST_TYPE,
                "fieldViolations": [
                    {"field": field, "description": description}
                    for field, description in violations
                ],
            }
        )
    error: dict[str, Any] = {
        "code": status,
        "message": message,
        "status": CANONICAL_STATUS.get(status, "UNKNOWN"),
    }
    if details:
        error["details"] = details
    return JSONResponse({"error": error}, status_code=status, headers=headers)


def _oauth_error(error: str, description: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": error, "error_description": description}, status_code=status)


def _string_map(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    )


def _count(value: Any) -> bool:
    """An int32 that is not negative, as FCM wants `notification_count`."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**31


def message_violations(body: Any) -> list[tuple[str, str]]:
    """What real FCM would refuse in a `messages:send` body, as (field, description) pairs."""
    if not isinstance(body, dict) or not isinstance(body.get("message"), dict):
        return [("message", "A message is required.")]
    unknown = set(body) - {"message", "validate_only"}
    violations = [
        (name, f'Invalid JSON payload received. Unknown name "{name}"') for name in unknown
    ]
    message = body["message"]
    violations += [
        (f"message.{name}", f'Invalid JSON payload received. Unknown name "{name}"')
        for name in sorted(set(message) - MESSAGE_FIELDS)
    ]
    targets = [name for name in ("token", "topic", "condition") if name in message]
    if len(targets) != 1:
        violations.append(("message", "Exactly one of token, topic or condition is required."))
    if "token" in message and (not isinstance(message["token"], str) or not message["token"]):
        violations.append(("message.token", "The registration token is not a valid FCM token."))
    if "data" in message and not _string_map(message["data"]):
        violations.append(("message.data", "Data values must be strings."))
    notification = message.get("notification")
    if notification is not None and (
        not isinstance(notification, dict)
        or set(notification) - NOTIFICATION_FIELDS
        or not _string_map(notification)
    ):
        violations.append(("message.notification", "Invalid notification."))
    android = message.get("android")
    if android is not None:
        if not isinstance(android, dict) or set(android) - ANDROID_FIELDS:
            violations.append(("message.android", "Invalid android config."))
        else:
            if "collapse_key" in android and not isinstance(android["collapse_key"], str):
                violations.append(("message.android.collapse_key", "Must be a string."))
            shown = android.get("notification", {})
            if not isinstance(shown, dict):
                violations.append(("message.android.notification", "Invalid notification."))
            elif "notification_count" in shown and not _count(shown["notification_count"]):
                violations.append(
                    ("message.android.notification.notification_count", "Invalid value.")
                )
    apns = message.get("apns")
    if apns is not None:
        if not isinstance(apns, dict) or set(apns) - APNS_FIELDS:
            violations.append(("message.apns", "Invalid apns config."))
        elif "headers" in apns:
            headers = apns["headers"]
            if not _string_map(headers):
                violations.append(("message.apns.headers", "Header values must be strings."))
            elif len(headers.get("apns-collapse-id", "").encode()) > 64:
                violations.append(("message.apns.headers", "apns-collapse-id exceeds 64 bytes."))
    payload = {"notification": notification, "data": message.get("data")}
    if not violations and len(json.dumps(payload).encode()) > MAX_PAYLOAD_BYTES:
        violations.append(("message", "Message is too big."))
    return violations


class FakeFcm:
    """FCM HTTP v1 and its token endpoint on 127.0.0.1:<free port>; see the module docstring."""

    def __init__(self, project_id: str = "herald-test", *, token_lifetime: int = 3600) -> None:
        self.project_id = project_id
        self.token_lifetime = token_lifetime
        self.host = "127.0.0.1"
        self.port = 0
        self.base_url = ""
        self.token_uri = ""
        # Every accepted request body ({"message": {...}}), in order, and when it was accepted
        # (wall clock, seconds since the epoch), at the same index.
        self.accepted: list[dict[str, Any]] = []
        self.accepted_at: list[float] = []
        self.token_requests = 0
        # Every messages:send request that reached the endpoint, whatever its answer.
        self.send_requests = 0
        self._lock = threading.Lock()
        self._accounts: dict[str, _ServiceAccount] = {}  # by private_key_id
        self._issued: dict[str, float] = {}  # access token → expiry (monotonic)
        self._scripts: dict[str, list[_Script]] = {}
        self._ids = itertools.count(1)
        self._stopping = threading.Event()
        self._served: ServedApp | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        if self._served is not None:
            raise RuntimeError("FakeFcm already started")
        self._stopping.clear()
        self._served = ServedApp(self._app(), "fake-fcm", host=self.host)
        self.port = self._served.port
        self.base_url = self._served.base_url
        self.token_uri = f"{self.base_url}/token"

    def stop(self) -> None:
        if self._served is None:
            return
        self._stopping.set()  # ends stalls at once
        self._served.stop()
        self._served = None

    def __enter__(self) -> FakeFcm:
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

    def write_credentials(
        self, path: Path, *, client_email: str | None = None, token_uri: str | None = None
    ) -> Path:
        """Write a service-account JSON file with a fresh RSA key whose public half the token
        endpoint then accepts. Call after `start()` (the file names the token endpoint)."""
        if not self.token_uri:
            raise RuntimeError("start FakeFcm before writing credentials")
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        key_id = secrets.token_hex(20)
        email = client_email or f"push-sender@{self.project_id}.iam.gserviceaccount.com"
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        with self._lock:
            self._accounts[key_id] = _ServiceAccount(email, key.public_key())
        document = {
            "type": "service_account",
            "project_id": self.project_id,
            "private_key_id": key_id,
            "private_key": pem,
            "client_email": email,
            "client_id": str(secrets.randbelow(10**20)),
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": token_uri or self.token_uri,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(document, indent=2))
        return path

    def fail(
        self,
        device_token: str,
        status: int,
        error_code: str,
        *,
        times: int | None = None,
        retry_after: int | None = None,
        field: str | None = None,
    ) -> None:
        """Answer sends to `device_token` with an FCM v1 error: HTTP `status`, `FcmError.errorCode`
        `error_code` (empty: no FcmError detail), a `Retry-After` header if given, a BadRequest
        field violation on `field` if given; `times` times, or for ever. Scripts of one token
        apply in the order they were added."""
        self._script(device_token, _Script(status, error_code, times, retry_after, field))

    def stall(self, device_token: str, seconds: float, *, times: int | None = None) -> None:
        """Hold sends to `device_token` for `seconds` before answering (a slow provider)."""
        self._script(device_token, _Script(0, "", times, seconds=seconds))

    def revoke_tokens(self) -> None:
        """Every access token issued so far is refused from now on (401)."""
        with self._lock:
            self._issued.clear()

    def messages_to(self, device_token: str) -> list[dict[str, Any]]:
        with self._lock:
            return [m for m in self.accepted if m["message"].get("token") == device_token]

    def forget(self) -> None:
        """Drop what was accepted so far (a test's setup: what follows is the test's own)."""
        with self._lock:
            self.accepted.clear()
            self.accepted_at.clear()

    def _script(self, device_token: str, script: _Script) -> None:
        if script.remaining is not None and script.remaining < 1:
            raise ValueError("times must be at least 1")
        with self._lock:
            self._scripts.setdefault(device_token, []).append(script)

    def _take(self, device_token: str, *, stall: bool = True) -> _Script | None:
        """The next script of `device_token` (consumed), or None; with `stall=False` a stall
        that comes next is left for the next request."""
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
                Route("/token", self._token, methods=["POST"]),
                Route("/v1/projects/{project}/messages:send", self._send, methods=["POST"]),
            ]
        )

    async def _token(self, request: Request) -> Response:
        with self._lock:
            self.token_requests += 1
        if not request.headers.get("content-type", "").startswith(
            "application/x-www-form-urlencoded"
        ):
            return _oauth_error("invalid_request", "Expected a form-encoded body.")
        form = parse_qs((await request.body()).decode())
        if form.get("grant_type") != [JWT_BEARER_GRANT]:
            return _oauth_error("unsupported_grant_type", "Invalid grant_type.")
        assertion = form.get("assertion", [""])[0]
        problem = self._check_assertion(assertion)
        if problem is not None:
            return problem
        token = f"ya29.fake-{secrets.token_urlsafe(24)}"
        with self._lock:
            self._issued[token] = time.monotonic() + self.token_lifetime
        return JSONResponse(
            {"access_token": token, "expires_in": self.token_lifetime, "token_type": "Bearer"}
        )

    def _check_assertion(self, assertion: str) -> Response | None:
        try:
            key_id = jwt.get_unverified_header(assertion).get("kid")
        except jwt.PyJWTError:
            return _oauth_error("invalid_grant", "Invalid JWT.")
        with self._lock:
            account = self._accounts.get(key_id) if isinstance(key_id, str) else None
        if account is None:
            return _oauth_error("invalid_grant", "Invalid JWT Signature.")
        try:
            claims = jwt.decode(
                assertion,
                account.public_key,
                algorithms=["RS256"],
                audience=self.token_uri,
                issuer=account.client_email,
                options={"require": ["iss", "aud", "iat", "exp"]},
            )
        except jwt.InvalidSignatureError:
            return _oauth_error("invalid_grant", "Invalid JWT Signature.")
        except jwt.PyJWTError as exc:
            return _oauth_error("invalid_grant", f"Invalid JWT: {type(exc).__name__}.")
        if SCOPE not in str(claims.get("scope", "")).split():
            return _oauth_error("invalid_scope", "Invalid OAuth scope or ID token audience.")
        if int(claims["exp"]) - int(claims["iat"]) > MAX_ASSERTION_LIFETIME:
            return _oauth_error("invalid_grant", "Invalid JWT: exp too far in the future.")
        return None

    def _authorised(self, request: Request) -> bool:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        with self._lock:
            expiry = self._issued.get(token)
        return expiry is not None and time.monotonic() < expiry

    async def _send(self, request: Request) -> Response:
        with self._lock:
            self.send_requests += 1
        if not self._authorised(request):
            return _fcm_error(
                401,
                None,
                "Request had invalid authentication credentials. Expected OAuth 2 access token.",
            )
        project = request.path_params["project"]
        if project != self.project_id:
            return _fcm_error(
                403, None, f"Permission 'cloudmessaging.messages.create' denied on {project}"
            )
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _fcm_error(400, None, "Invalid JSON payload received.")
        violations = message_violations(body)
        if violations:
            token_problem = any(field == "message.token" for field, _ in violations)
            return _fcm_error(
                400,
                "INVALID_ARGUMENT",
                "The registration token is not a valid FCM registration token"
                if token_problem
                else "Request contains an invalid argument.",
                violations=violations,
            )
        token = body["message"].get("token", "")
        script = self._take(token)
        if script is not None and script.status == 0:
            await self._sleep(script.seconds)
            script = self._take(token, stall=False)
        if script is not None:
            return self._scripted(script)
        name = f"projects/{self.project_id}/messages/{next(self._ids)}"
        if not body.get("validate_only"):
            with self._lock:
                self.accepted.append(body)
                self.accepted_at.append(time.time())
        return JSONResponse({"name": name})

    def _scripted(self, script: _Script) -> Response:
        headers = (
            {"retry-after": str(script.retry_after)} if script.retry_after is not None else None
        )
        violations: list[tuple[str, str]] = []
        message = MESSAGES.get(script.error_code, "Request contains an invalid argument.")
        if script.field is not None:
            violations.append((script.field, "Invalid value."))
            if script.field == "message.token":
                message = "The registration token is not a valid FCM registration token"
        return _fcm_error(
            script.status,
            script.error_code or None,
            message,
            violations=violations,
            headers=headers,
        )

    async def _sleep(self, seconds: float) -> None:
        # A thread-safe wait that `stop()` cuts short.
        await asyncio.to_thread(self._stopping.wait, seconds)
