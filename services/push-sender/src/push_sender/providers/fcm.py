"""Firebase Cloud Messaging, HTTP v1 API.

* Authentication: an OAuth2 access token bought with the JWT-bearer grant (RFC 7523): an RS256
  JWT signed with the service account's private key (iss = client_email, scope = firebase
  messaging, aud = the file's `token_uri`) is POSTed to `token_uri`; the token is cached until
  shortly before it expires, and refreshed once when FCM answers 401.
* Sending: `POST {base}/v1/projects/{project}/messages:send` with one message per device token.
  On Android a room has one notification (`notification.tag` and `collapse_key` are the room),
  which its next push, or a repeat, replaces; on iOS the room is the thread (`aps.thread-id`)
  and `apns-collapse-id` the notification id, so a push sent twice replaces the first one. A DM
  or a mention (`Trigger.urgent`) is sent at high priority with a sound, anything else at
  normal priority, silently;
  title and body shortened, at character boundaries, to fit FCM's 4096-byte payload limit. The
  recipient's unread count, when the router sent it, is iOS' badge (`aps.badge`); on Android
  the room's notification shows the room's own (`notification_count`): a launcher adds up the
  counts of the notifications on screen, one per room, which makes the total again.
* A recall (`job.recall`) is a data message instead, with nothing to show: the app itself takes
  the notifications of its rooms, and those it names, off the screen (see `recall_message`).
* Answers are classified, never retried here (see `classify`).
* Transport: one pool of kept-alive HTTP/1.1 connections (`http1.Http1Client`) for the token
  endpoint and FCM: push-sender makes one request per push, so the client's cost per request is
  much of push-sender's CPU under load. No redirect is followed, no proxy or netrc is read from
  the environment, and no answer body is read beyond `BODY_LIMIT`.

Nothing here logs or stores a device token, an access token, the assertion or the push text.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jwt
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from herald_shared.events import PushRecall, PushRequested, utc_now
from herald_shared.text import fit_title_and_body
from push_sender.providers.base import ProviderAnswer, Verdict
from push_sender.providers.http1 import Http1Client, HttpError
from push_sender.providers.recall import fit_recall
from push_sender.settings import FcmSettings, check_secure_url

logger = logging.getLogger("push_sender.fcm")

SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"  # noqa: S105 - a URL
ASSERTION_LIFETIME = 3600  # seconds; Google accepts at most one hour
# A cached access token is replaced this long before it expires (at most half its lifetime).
REFRESH_MARGIN = 300.0
FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
BAD_REQUEST_TYPE = "type.googleapis.com/google.rpc.BadRequest"
TOKEN_FIELD = "message.token"  # noqa: S105 - a field name
REASON_LIMIT = 200
# FCM's limit on a message's payload (notification and data).
PAYLOAD_LIMIT = 4096
# The most of an answer's body that is read: FCM's and Google's OAuth2 answers are a few hundred
# bytes, and a misbehaving or hostile endpoint must not make us buffer more. A longer body counts
# as no JSON body; its rest is never read, and its connection is closed instead of reused.
BODY_LIMIT = 64 * 1024
USER_AGENT = "herald-push-sender"


class FcmConfigurationError(ValueError):
    """The credentials file is missing or unusable (raised at start-up, never with its content)."""


class ServiceAccount(BaseModel):
    """The fields of a Google service-account JSON file that the JWT-bearer grant needs."""

    # Inputs are hidden from errors: the file holds a private key.
    model_config = ConfigDict(frozen=True, extra="ignore", hide_input_in_errors=True)

    type: str = "service_account"
    project_id: str
    private_key_id: str = ""
    private_key: str = Field(repr=False)
    client_email: str
    token_uri: str = GOOGLE_TOKEN_URI


def load_service_account(path: Path) -> tuple[ServiceAccount, RSAPrivateKey]:
    """Read and check the credentials file; the error says what is wrong, never what is in it."""
    try:
        account = ServiceAccount.model_validate_json(path.read_bytes())
    except OSError as exc:
        raise FcmConfigurationError(
            f"FCM_CREDENTIALS_FILE cannot be read ({type(exc).__name__})"
        ) from None
    except ValidationError as exc:
        fields = ", ".join(
            ".".join(str(part) for part in error["loc"]) or "<file>"
            for error in exc.errors(include_input=False, include_url=False)
        )
        raise FcmConfigurationError(
            f"FCM_CREDENTIALS_FILE is not a service-account JSON file (check: {fields})"
        ) from None
    if account.type != "service_account":
        raise FcmConfigurationError("FCM_CREDENTIALS_FILE is not a service-account key")
    try:
        check_secure_url(account.token_uri, what="the credentials' token_uri")
    except ValueError as exc:
        raise FcmConfigurationError(str(exc)) from None
    try:
        key = load_pem_private_key(account.private_key.encode(), password=None)
    except (ValueError, TypeError):
        raise FcmConfigurationError("FCM_CREDENTIALS_FILE's private_key is not a PEM key") from None
    if not isinstance(key, RSAPrivateKey):
        raise FcmConfigurationError("FCM_CREDENTIALS_FILE's private_key is not an RSA key")
    return account, key


def json_text_size(text: str) -> int:
    """Bytes of `text` inside a JSON string, escaped to ASCII: never less than its UTF-8 size
    (an escape is 6 or 12 bytes for 2 to 4), so a payload that fits this way fits either way."""
    return len(json.dumps(text)) - 2


def build_message(job: PushRequested) -> dict[str, Any]:
    """The `messages:send` request body for one job."""
    if job.recall is not None:
        return recall_message(job, job.recall)
    collapse_id = str(job.notification_id)
    data = {
        "notification_id": str(job.notification_id),
        "message_id": str(job.message_id),
        "room_id": str(job.room_id),
    }
    urgent = job.trigger.urgent
    room = str(job.room_id)
    aps: dict[str, Any] = {"thread-id": room}  # iOS groups a thread's: one room, one group
    if urgent:
        aps["sound"] = "default"
    android_notification: dict[str, Any] = {"tag": room}
    if job.badge is not None:
        aps["badge"] = job.badge
    if job.room_unread is not None:
        android_notification["notification_count"] = job.room_unread
    # What an iPhone receives through FCM is `aps` and the data keys together, within APNs'
    # 4096 bytes too: `aps` counts against the text's budget as well.
    overhead = len(
        json.dumps({"notification": {"title": "", "body": ""}, "data": data, "aps": aps})
    )
    title, body = fit_title_and_body(
        job.title, job.body, budget=PAYLOAD_LIMIT - overhead, size=json_text_size
    )
    return {
        "message": {
            "token": job.token,
            "notification": {"title": title, "body": body},
            "data": data,
            "android": {
                # HIGH wakes the device now (a DM, a mention); NORMAL waits for its next window.
                "priority": "HIGH" if urgent else "NORMAL",
                # One notification per room, replaced by the room's next one (and by a repeat of
                # itself); offline, FCM keeps only a room's latest.
                "collapse_key": room,
                "notification": android_notification,
            },
            "apns": {
                "headers": {
                    "apns-collapse-id": collapse_id,
                    "apns-priority": "10" if urgent else "5",
                },
                "payload": {"aps": aps},
            },
        }
    }


def recall_message(job: PushRequested, recall: PushRecall) -> dict[str, Any]:
    """A recall's request body: a data message, which FCM hands to the app instead of showing
    anything, so that the app takes the rooms' notifications (their tag is the room) and the
    named ones off the screen and sets its badge. FCM's data values are strings: the ids are
    comma-separated.

    * Android: priority HIGH, so that it arrives now and not at the device's next window (a
      notification of a room read elsewhere is wrong as long as it stays); no `collapse_key`,
      so that it never takes the place of a room's notification still waiting at FCM.
    * iOS (the data keys arrive as custom keys next to `aps`): a background push, which Apple
      wants with `apns-priority` 5 and an `aps` of `content-available` alone (no alert, sound or
      badge: the app sets the badge from the `badge` key); no collapse id, which is for
      notifications shown.
    """
    badge = {} if job.badge is None else {"badge": str(job.badge)}
    aps = {"content-available": 1}

    def data(rooms: list[str], ids: list[str]) -> dict[str, str]:
        return {
            "type": "recall",
            "room_ids": ",".join(rooms),
            "notification_ids": ",".join(ids),
            **badge,
        }

    def fits(rooms: list[str], ids: list[str]) -> bool:
        return len(json.dumps({"data": data(rooms, ids), "aps": aps})) <= PAYLOAD_LIMIT

    rooms, ids = fit_recall(recall, fits)
    return {
        "message": {
            "token": job.token,
            "data": data(rooms, ids),
            "android": {"priority": "HIGH"},
            "apns": {
                "headers": {"apns-push-type": "background", "apns-priority": "5"},
                "payload": {"aps": aps},
            },
        }
    }


def parse_retry_after(value: str | None) -> float | None:
    """`Retry-After` as seconds: either delay-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        seconds = (when - utc_now()).total_seconds()
    return max(seconds, 0.0) if seconds == seconds else None  # NaN is no answer


@dataclass(frozen=True)
class FcmError:
    """The parts of an FCM v1 error body push-sender acts on (all optional: a proxy or a load
    balancer may answer with anything)."""

    status: str = ""  # google.rpc canonical code name, e.g. NOT_FOUND
    error_code: str = ""  # FcmError.errorCode, e.g. UNREGISTERED
    token_field: bool = False  # a BadRequest field violation names message.token

    @classmethod
    def parse(cls, payload: Any) -> FcmError:
        error = payload.get("error") if isinstance(payload, dict) else None
        if not isinstance(error, dict):
            return cls()
        status = error.get("status")
        error_code = ""
        token_field = False
        details = error.get("details")
        for detail in details if isinstance(details, list) else []:
            if not isinstance(detail, dict):
                continue
            if detail.get("@type") == FCM_ERROR_TYPE and isinstance(detail.get("errorCode"), str):
                error_code = detail["errorCode"]
            if detail.get("@type") == BAD_REQUEST_TYPE:
                violations = detail.get("fieldViolations")
                token_field = token_field or any(
                    isinstance(violation, dict) and violation.get("field") == TOKEN_FIELD
                    for violation in (violations if isinstance(violations, list) else [])
                )
        message = error.get("message")
        # FCM's documented wording for a malformed token, when no field violation says it.
        if isinstance(message, str) and "registration token" in message.lower():
            token_field = True
        return cls(
            status=_code_word(status),
            error_code=_code_word(error_code),
            token_field=token_field,
        )


def _code_word(value: Any) -> str:
    """An upper-case code such as UNREGISTERED, or nothing (never free text in a reason)."""
    if isinstance(value, str) and value.replace("_", "").isalnum() and len(value) <= 40:
        return value.upper()
    return ""


def classify(status_code: int, payload: Any, headers: Mapping[str, str]) -> ProviderAnswer:
    """One FCM answer (`headers` with lower-case names) → what to do
    (docs/providers.md, "FCM"):

    * 2xx → accepted;
    * `UNREGISTERED` (404), or 400 `INVALID_ARGUMENT` about `message.token` → the token is dead;
    * `SENDER_ID_MISMATCH` (403) → this push is refused for good (see below);
    * 429, 5xx → transient, honouring `Retry-After`;
    * 401, 403, and a 404 that is not `UNREGISTERED` (wrong project or base URL) → our
      configuration: transient, so jobs wait for a fix instead of burning, and loud;
    * any other 4xx → this push is refused for good.

    A 404 without `UNREGISTERED` never invalidates a device: a wrong `FCM_BASE_URL` or project
    would otherwise delete every device of every user.

    `SENDER_ID_MISMATCH` is an answer about one registration token: it belongs to another
    Firebase project. It must not be our configuration (misconfigured opens the breaker at once):
    anyone could register a token of their own project and stop every push of every user, again
    at each of the job's deferrals. Nor is the token dead: a wrong `FCM_PROJECT_ID` would give
    every token this answer, and invalidating would delete every device, as above. So only this
    push fails (rejected, dead-lettered: should it be every push, the dead-letter alert says so).
    """
    if 200 <= status_code < 300:
        return ProviderAnswer.accepted()
    error = FcmError.parse(payload)
    code = error.error_code or error.status
    reason = f"fcm {status_code} {code}".strip()
    retry_after = parse_retry_after(headers.get("retry-after"))
    if error.error_code == "UNREGISTERED":
        return ProviderAnswer(Verdict.TOKEN_INVALID, reason)
    if status_code == 400 and error.token_field:
        return ProviderAnswer(Verdict.TOKEN_INVALID, f"{reason} token")
    if error.error_code == "SENDER_ID_MISMATCH":
        return ProviderAnswer(Verdict.REJECTED, reason)
    if status_code == 429 or status_code >= 500:
        return ProviderAnswer.transient(reason, retry_after)
    if status_code in {401, 403, 404}:
        return ProviderAnswer(Verdict.MISCONFIGURED, reason, retry_after)
    if 400 <= status_code < 500:
        return ProviderAnswer(Verdict.REJECTED, reason)
    return ProviderAnswer.transient(f"fcm unexpected status {status_code}")


@dataclass(frozen=True)
class HttpReply:
    """An answer as far as it was read, its connection already back in the pool (or closed)."""

    status: int
    headers: Mapping[str, str]  # names in lower case
    payload: Any  # the JSON body; None when it is empty, not JSON or longer than BODY_LIMIT


class HttpClient:
    """The one connection pool of a provider, for the token endpoint and FCM alike."""

    def __init__(self, *, timeout: float, max_connections: int) -> None:
        self._http = Http1Client(
            timeout=timeout,
            max_connections=max_connections,
            body_limit=BODY_LIMIT,
            user_agent=USER_AGENT,
        )

    async def post(
        self, url: str, *, data: bytes | Mapping[str, str], headers: Mapping[str, str]
    ) -> HttpReply:
        """POST `data` (bytes as they are, a mapping as a form); raises `TimeoutError` or
        `HttpError` when no whole answer came."""
        response = await self._http.post(url, data=data, headers=headers)
        payload = None if response.truncated else json_or_none(response.body)
        return HttpReply(response.status, response.headers, payload)

    async def aclose(self) -> None:
        await self._http.aclose()


def json_or_none(body: bytes) -> Any:
    """The JSON document of an answer's body, or None when it is empty or not JSON."""
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def json_bytes(document: Any) -> bytes:
    """`document` as compact UTF-8 JSON (what httpx sent before: no spaces, no escapes)."""
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


class TokenUnavailable(Exception):
    """No access token could be had; `answer` says whether waiting or an operator will fix it."""

    def __init__(self, answer: ProviderAnswer) -> None:
        super().__init__(answer.reason)
        self.answer = answer


class AccessTokens:
    """The OAuth2 access token of one service account: fetched on first use, shared by all
    concurrent sends, replaced shortly before it expires or when FCM refuses it."""

    def __init__(self, account: ServiceAccount, key: RSAPrivateKey, client: HttpClient) -> None:
        self.account = account
        self._key = key
        self._client = client
        self._lock = asyncio.Lock()
        self._token: str | None = None
        self._refresh_at = 0.0

    async def get(self) -> str:
        token = self._token
        if token is not None and time.monotonic() < self._refresh_at:
            return token
        return await self._fetch(stale=token, why="age" if token is not None else "first")

    async def refresh(self, stale: str) -> str:
        """A new token, unless another send has already replaced `stale`."""
        return await self._fetch(stale=stale, why="refused")

    async def _fetch(self, *, stale: str | None, why: str) -> str:
        async with self._lock:
            # Whoever waited on the lock finds the token the first one fetched.
            if self._token is not None and self._token != stale:
                return self._token
            token, lifetime = await self._request()
            self._token = token
            self._refresh_at = time.monotonic() + lifetime - min(REFRESH_MARGIN, lifetime / 2)
            logger.info("fcm.access_token_fetched why=%s expires_in=%d", why, lifetime)
            return token

    def assertion(self) -> str:
        now = int(time.time())
        claims = {
            "iss": self.account.client_email,
            "scope": SCOPE,
            "aud": self.account.token_uri,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME,
        }
        headers = {"kid": self.account.private_key_id} if self.account.private_key_id else None
        return jwt.encode(claims, self._key, algorithm="RS256", headers=headers)

    async def _request(self) -> tuple[str, float]:
        form = {"grant_type": JWT_BEARER_GRANT, "assertion": self.assertion()}
        try:
            reply = await self._client.post(
                self.account.token_uri, data=form, headers={"accept": "application/json"}
            )
        except TimeoutError:
            raise TokenUnavailable(ProviderAnswer.transient("oauth timeout")) from None
        except HttpError as exc:
            raise TokenUnavailable(
                ProviderAnswer.transient(f"oauth connection failed ({type(exc).__name__})")
            ) from None
        if reply.status != 200:
            error = reply.payload.get("error") if isinstance(reply.payload, dict) else None
            reason = f"oauth {reply.status} {_oauth_code(error)}".strip()
            if reply.status == 429 or reply.status >= 500:
                retry_after = parse_retry_after(reply.headers.get("retry-after"))
                raise TokenUnavailable(ProviderAnswer.transient(reason, retry_after))
            # invalid_grant (a revoked key, a clock far off), invalid_client, invalid_scope…
            raise TokenUnavailable(ProviderAnswer(Verdict.MISCONFIGURED, reason))
        try:
            answer = _TokenResponse.model_validate(reply.payload)
        except ValidationError:
            raise TokenUnavailable(ProviderAnswer.transient("oauth malformed answer")) from None
        return answer.access_token, float(answer.expires_in)


class _TokenResponse(BaseModel):
    model_config = ConfigDict(extra="ignore", hide_input_in_errors=True)

    access_token: str = Field(min_length=1, repr=False)
    expires_in: int = Field(default=3600, gt=0)
    token_type: str = "Bearer"  # noqa: S105 - a token type


def _oauth_code(error: Any) -> str:
    if isinstance(error, str) and error.replace("_", "").isalnum() and len(error) <= 40:
        return error
    return ""


class FcmProvider:
    """Sends through one connection pool (see `HttpClient`; closed by `aclose`)."""

    name = "fcm"

    def __init__(
        self,
        *,
        account: ServiceAccount,
        key: RSAPrivateKey,
        project_id: str | None = None,
        base_url: str,
        timeout: float,
        max_connections: int = 100,
    ) -> None:
        self.project_id = project_id or account.project_id
        project = quote(self.project_id, safe=":")
        self.send_url = f"{base_url.rstrip('/')}/v1/projects/{project}/messages:send"
        # Token, send, token again after a 401, send again: the backstop for one whole send.
        self.deadline = 4 * timeout
        self._client = HttpClient(timeout=timeout, max_connections=max_connections)
        self.tokens = AccessTokens(account, key, self._client)

    @classmethod
    def from_settings(cls, settings: FcmSettings, *, max_connections: int = 100) -> FcmProvider:
        if settings.credentials_file is None:
            raise FcmConfigurationError("FCM_CREDENTIALS_FILE is not set")
        account, key = load_service_account(settings.credentials_file)
        return cls(
            account=account,
            key=key,
            project_id=settings.project_id,
            base_url=settings.base_url,
            timeout=settings.timeout,
            max_connections=max_connections,
        )

    async def send(self, job: PushRequested) -> ProviderAnswer:
        body = json_bytes(build_message(job))
        try:
            token = await self.tokens.get()
            reply = await self._post(body, token)
            if reply.status == 401:
                # An access token revoked or expired early: one fresh token, one more try.
                token = await self.tokens.refresh(stale=token)
                reply = await self._post(body, token)
        except TokenUnavailable as exc:
            return exc.answer
        except TimeoutError:
            return ProviderAnswer.transient("fcm timeout")
        except HttpError as exc:
            return ProviderAnswer.transient(f"fcm connection failed ({type(exc).__name__})")
        answer = classify(reply.status, reply.payload, reply.headers)
        return ProviderAnswer(answer.verdict, answer.reason[:REASON_LIMIT], answer.retry_after)

    async def _post(self, body: bytes, token: str) -> HttpReply:
        return await self._client.post(
            self.send_url,
            data=body,
            headers={"authorization": f"Bearer {token}", "content-type": "application/json"},
        )

    async def aclose(self) -> None:
        await self._client.aclose()
