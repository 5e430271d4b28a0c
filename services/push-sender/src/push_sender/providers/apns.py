"""Apple Push Notification service (APNs), HTTP/2 provider API with token-based authentication.

* Transport: HTTP/2 only (APNs speaks nothing else), one `httpx.AsyncClient` whose connection
  multiplexes concurrent sends; `POST {base}/3/device/{device token}`.
* Authentication: a provider token, an ES256 JWT (`iss` = team id, `iat`, header `kid` = key
  id) signed with the `.p8` key. APNs refuses tokens older than one hour and also refuses new ones
  more often than every 20 minutes (`TooManyProviderTokenUpdates`), so one token is shared by
  every send and replaced when it is 50 minutes old, or once when APNs calls it expired.
* Payload: `aps.alert` with the title and body, `thread-id` = the room (iOS groups a room's
  notifications), a sound and `apns-priority` 10 for a DM or a mention, no sound and priority 5
  for the rest, `apns-collapse-id` = the notification id (a push sent twice replaces the first
  one on the device), the body shortened on a character boundary to fit APNs' 4096 bytes;
  `aps.badge` = the recipient's unread count, when the router sent it.
* A recall (`job.recall`) is a background push instead (see `recall_payload`): it wakes the app,
  which takes the notifications of its rooms (threads), and those it names, off the screen and
  sets the badge itself.
* Answers are classified, never retried here, except one immediate retry with a new provider
  token after `ExpiredProviderToken` (see `classify`).

Nothing here logs or stores a device token, a provider token, the key or the push text.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, EllipticCurvePrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from herald_shared.events import PushRecall, PushRequested
from herald_shared.text import truncate_to_size
from push_sender.providers.base import ProviderAnswer, Verdict
from push_sender.providers.fcm import parse_retry_after
from push_sender.providers.recall import fit_recall
from push_sender.settings import ApnsSettings

logger = logging.getLogger("push_sender.apns")

MAX_PAYLOAD_BYTES = 4096  # APNs' limit for a regular remote notification
MAX_COLLAPSE_ID_BYTES = 64
# A provider token is replaced at this age: APNs refuses it at 60 minutes and refuses a new one
# more than once per 20 minutes, so 50 leaves room for clock skew on both sides.
PROVIDER_TOKEN_MAX_AGE = 50 * 60.0
# How long APNs keeps trying to reach a device that is off: a day-old chat notification still
# tells the user something, an older one hardly does.
EXPIRATION_SECONDS = 24 * 3600
REASON_LIMIT = 200

# Reasons about one device token that a wrong APNS_TOPIC or APNS_BASE_URL also gives every
# token: never a dead token (see `classify`).
NOT_DEAD_TOKEN_REASONS = frozenset({"BadDeviceToken", "DeviceTokenNotForTopic"})
# Reasons that say our topic (APNS_TOPIC) is wrong: every push would fail the same way, so it is
# configuration, not this message (the jobs wait for a fix instead of being dead-lettered).
TOPIC_REASONS = frozenset({"BadTopic", "MissingTopic", "TopicDisallowed"})

Clock = Callable[[], float]


class ApnsConfigurationError(ValueError):
    """`APNS_*` is missing or unusable (raised at start-up, never with the key's content)."""


def load_signing_key(path: Path) -> EllipticCurvePrivateKey:
    """Read and check the `.p8` file; the error says what is wrong, never what is in it."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ApnsConfigurationError(
            f"APNS_KEY_FILE cannot be read ({type(exc).__name__})"
        ) from None
    try:
        key = load_pem_private_key(data, password=None)
    except TypeError:
        raise ApnsConfigurationError("APNS_KEY_FILE is encrypted; Apple's .p8 is not") from None
    except ValueError:
        raise ApnsConfigurationError("APNS_KEY_FILE is not a PEM private key (.p8)") from None
    if not isinstance(key, EllipticCurvePrivateKey) or not isinstance(key.curve, SECP256R1):
        raise ApnsConfigurationError("APNS_KEY_FILE is not a P-256 key (APNs signs with ES256)")
    return key


def collapse_id(job: PushRequested) -> str:
    """The same notification always gets the same id, so a redelivered push replaces the one
    shown instead of repeating it."""
    return str(job.notification_id)  # 36 bytes, within MAX_COLLAPSE_ID_BYTES


def encode(payload: dict[str, Any]) -> bytes:
    # UTF-8 rather than \\u escapes: a non-ASCII character costs 2-4 bytes instead of 6-12.
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


def _payload(job: PushRequested, *, title: str, body: str) -> dict[str, Any]:
    return {
        "aps": {
            "alert": {"title": title, "body": body},
            "thread-id": str(job.room_id),
            # Lets a notification service extension decorate it (avatars, decryption).
            "mutable-content": 1,
            # A DM or a mention makes a sound; the rest arrives silently.
            **({"sound": "default"} if job.trigger.urgent else {}),
            **({} if job.badge is None else {"badge": job.badge}),
        },
        "notification_id": str(job.notification_id),
        "message_id": str(job.message_id),
        "room_id": str(job.room_id),
    }


def recall_payload(job: PushRequested, recall: PushRecall) -> dict[str, Any]:
    """A recall's payload: `aps` holds `content-available` alone, as Apple wants of a background
    push (no alert, sound or badge), and the rest are custom keys at the top level, like a
    notification's ids: the app removes the delivered notifications whose thread is one of
    `room_ids` or whose identifier (the collapse id: the notification id) is one of
    `notification_ids`, and sets its badge to `badge` when there is one. As many ids as fit
    `MAX_PAYLOAD_BYTES` (`fit_recall`)."""
    badge = {} if job.badge is None else {"badge": job.badge}

    def payload(rooms: list[str], ids: list[str]) -> dict[str, Any]:
        return {
            "aps": {"content-available": 1},
            "type": "recall",
            "room_ids": rooms,
            "notification_ids": ids,
            **badge,
        }

    rooms, ids = fit_recall(
        recall, lambda rooms, ids: len(encode(payload(rooms, ids))) <= MAX_PAYLOAD_BYTES
    )
    return payload(rooms, ids)


def build_payload(job: PushRequested) -> bytes:
    """The notification's JSON, at most `MAX_PAYLOAD_BYTES`: the body is shortened first (with an
    ellipsis), then the title if even an empty body does not fit. A recall's: `recall_payload`."""
    if job.recall is not None:
        return encode(recall_payload(job, job.recall))
    title, body = job.title, job.body

    def size(title: str, body: str) -> int:
        return len(encode(_payload(job, title=title, body=body)))

    if size(title, body) > MAX_PAYLOAD_BYTES:
        if size(title, "") <= MAX_PAYLOAD_BYTES:
            body = truncate_to_size(
                body, MAX_PAYLOAD_BYTES, size=lambda candidate: size(title, candidate)
            )
        else:
            body = ""
            title = truncate_to_size(
                title, MAX_PAYLOAD_BYTES, size=lambda candidate: size(candidate, "")
            )
    return encode(_payload(job, title=title, body=body))


def _reason_word(value: Any) -> str:
    """An APNs reason such as BadDeviceToken, or nothing (never free text in our reasons)."""
    if isinstance(value, str) and value.isalnum() and len(value) <= 40:
        return value
    return ""


def _timestamp_ms(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def classify(
    status_code: int,
    payload: Any,
    headers: httpx.Headers,
    *,
    token_updated_at: datetime | None,
) -> ProviderAnswer:
    """One APNs answer → what to do (docs/providers.md, "APNs"):

    * 200 → accepted;
    * 400 `BadDeviceToken` / `DeviceTokenNotForTopic` → this push is refused for good (see
      below);
    * 410 (`Unregistered`, `ExpiredToken`) → the token is dead, unless the device registered it
      again after the moment APNs says it stopped being valid (`timestamp`, ms since the
      epoch): then the registration is newer than APNs' verdict, so the device is kept, and
      this push, which APNs has refused, is refused for good ("stale"), not retried, since
      asking again gets the same answer;
    * 403 (`InvalidProviderToken`, `MissingProviderToken`, `BadCertificate…`, `Forbidden`, and an
      `ExpiredProviderToken` that a fresh token did not cure: our clock), 400 `BadTopic` /
      `MissingTopic` / `TopicDisallowed`, 404 (`BadPath`: a wrong base URL) → our
      configuration: loud, and the jobs wait instead of burning;
    * 429 (`TooManyRequests`, `TooManyProviderTokenUpdates`), 5xx → transient, honouring
      `Retry-After`;
    * 413 `PayloadTooLarge` and any other 4xx (`BadCollapseId`, `BadPriority`, …) → this push is
      refused for good.

    Only a 410 invalidates a device: it is only ever about that one device. `BadDeviceToken`
    and `DeviceTokenNotForTopic` are about one token too, but our configuration gives every
    token the same answer: `APNS_BASE_URL` of the other environment (a sandbox token sent to
    production, or the reverse) gives `BadDeviceToken`, and `APNS_TOPIC` set to another app of
    the team (the key signs for all of them) gives `DeviceTokenNotForTopic`; invalidating would
    delete every iOS device of every user. Nor are they our configuration (misconfigured opens
    the breaker at once): one bad token from one device would stop everybody's pushes. So only
    this push fails (rejected, dead-lettered: should it be every push, the dead-letter alert
    says so), as FCM's `SENDER_ID_MISMATCH`.
    """
    if status_code == 200:
        return ProviderAnswer.accepted()
    body = payload if isinstance(payload, dict) else {}
    apns_reason = _reason_word(body.get("reason"))
    reason = f"apns {status_code} {apns_reason}".strip()
    retry_after = parse_retry_after(headers.get("retry-after"))
    if status_code == 410:
        unregistered_at = _timestamp_ms(body.get("timestamp"))
        if (
            token_updated_at is not None
            and unregistered_at is not None
            and token_updated_at.timestamp() * 1000 >= unregistered_at
        ):
            return ProviderAnswer(Verdict.REJECTED, f"{reason} stale")
        return ProviderAnswer(Verdict.TOKEN_INVALID, reason)
    if status_code == 400 and apns_reason in NOT_DEAD_TOKEN_REASONS:
        return ProviderAnswer(Verdict.REJECTED, reason)
    if status_code == 429 or status_code >= 500:
        return ProviderAnswer.transient(reason, retry_after)
    if status_code in {403, 404} or apns_reason in TOPIC_REASONS:
        return ProviderAnswer(Verdict.MISCONFIGURED, reason, retry_after)
    if 400 <= status_code < 500:
        return ProviderAnswer(Verdict.REJECTED, reason)
    return ProviderAnswer.transient(f"apns unexpected status {status_code}")


class ProviderTokens:
    """The provider token (JWT) of one signing key: made on first use, shared by every send,
    replaced when `PROVIDER_TOKEN_MAX_AGE` old or once when APNs calls it expired.

    Making one needs no I/O, so no lock: nothing can interleave between the check and the
    replacement on the event loop.
    """

    def __init__(
        self, key: EllipticCurvePrivateKey, *, key_id: str, team_id: str, clock: Clock
    ) -> None:
        self._key = key
        self.key_id = key_id
        self.team_id = team_id
        self._clock = clock
        self._token: str | None = None
        self._issued_at = 0.0

    def current(self) -> str:
        token = self._token
        if token is not None and self._clock() - self._issued_at < PROVIDER_TOKEN_MAX_AGE:
            return token
        return self._make(why="age" if token is not None else "first")

    def refresh(self, stale: str) -> str:
        """A new token, unless another send has already replaced `stale`: concurrent sends that
        all got `ExpiredProviderToken` make one new token, not one each."""
        if self._token is not None and self._token != stale:
            return self._token
        return self._make(why="expired")

    def _make(self, *, why: str) -> str:
        issued_at = int(self._clock())
        token = jwt.encode(
            {"iss": self.team_id, "iat": issued_at},
            self._key,
            algorithm="ES256",
            headers={"kid": self.key_id},
        )
        self._token, self._issued_at = token, float(issued_at)
        logger.info("apns.provider_token_made why=%s key_id=%s", why, self.key_id)
        return token


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


class ApnsProvider:
    """Sends through one shared HTTP/2 `httpx.AsyncClient` (closed by `aclose`)."""

    name = "apns"

    def __init__(
        self,
        *,
        key: EllipticCurvePrivateKey,
        key_id: str,
        team_id: str,
        topic: str,
        base_url: str,
        timeout: float,
        max_connections: int = 100,
        clock: Clock = time.time,
    ) -> None:
        self.topic = topic
        self.base_url = base_url.rstrip("/")
        # Send, and send again with a new provider token: the backstop for one whole send,
        # enforced, since the ledger's lease is based on it.
        self.deadline = 2 * timeout + 1.0
        self._clock = clock
        self.tokens = ProviderTokens(key, key_id=key_id, team_id=team_id, clock=clock)
        self._client = httpx.AsyncClient(
            # APNs is HTTP/2 only; with http1 off, an http:// URL (a loopback test server) is
            # spoken to as HTTP/2 with prior knowledge, and https offers only h2 in ALPN.
            http1=False,
            http2=True,
            timeout=httpx.Timeout(timeout),
            # One HTTP/2 connection carries many concurrent streams; Apple asks providers to
            # keep connections open rather than reconnect for each notification.
            limits=httpx.Limits(
                max_connections=max_connections,
                max_keepalive_connections=max_connections,
                keepalive_expiry=300.0,
            ),
            headers={"user-agent": "herald-push-sender"},
            follow_redirects=False,
        )

    @classmethod
    def from_settings(cls, settings: ApnsSettings, *, max_connections: int = 100) -> ApnsProvider:
        key_file, key_id = settings.key_file, settings.key_id
        team_id, topic = settings.team_id, settings.topic
        if key_file is None or key_id is None or team_id is None or topic is None:
            missing = [
                f"APNS_{name.upper()}"
                for name in ("key_file", "key_id", "team_id", "topic")
                if getattr(settings, name) is None
            ]
            raise ApnsConfigurationError(f"{', '.join(missing)} not set")
        return cls(
            key=load_signing_key(key_file),
            key_id=key_id,
            team_id=team_id,
            topic=topic,
            base_url=settings.base_url,
            timeout=settings.timeout,
            max_connections=max_connections,
        )

    def headers(self, job: PushRequested, provider_token: str) -> dict[str, str]:
        kind: dict[str, str]
        if job.recall is not None:
            # A background push: Apple wants priority 5 for it (10 is an error). No collapse id:
            # that is for notifications shown, and a background push shows none.
            kind = {"apns-push-type": "background", "apns-priority": "5"}
        else:
            kind = {
                "apns-push-type": "alert",
                # 10: now (a DM, a mention); 5: when it suits the device's power.
                "apns-priority": "10" if job.trigger.urgent else "5",
                "apns-collapse-id": collapse_id(job),
            }
        return {
            "authorization": f"bearer {provider_token}",
            "apns-topic": self.topic,
            **kind,
            "apns-expiration": str(int(self._clock()) + EXPIRATION_SECONDS),
            # APNs echoes it, so its logs and ours name the push the same way.
            "apns-id": str(job.notification_id),
            "content-type": "application/json",
        }

    def device_url(self, device_token: str) -> str:
        # Quoted: a token is client data and must not be able to change the path.
        return f"{self.base_url}/3/device/{quote(device_token, safe='')}"

    async def send(self, job: PushRequested) -> ProviderAnswer:
        try:
            async with asyncio.timeout(self.deadline):
                response = await self._send(job)
        except (TimeoutError, httpx.TimeoutException):
            return ProviderAnswer.transient("apns timeout")
        except httpx.HTTPError as exc:
            return ProviderAnswer.transient(f"apns connection failed ({type(exc).__name__})")
        answer = classify(
            response.status_code,
            _json_or_none(response),
            response.headers,
            token_updated_at=job.token_updated_at,
        )
        return ProviderAnswer(answer.verdict, answer.reason[:REASON_LIMIT], answer.retry_after)

    async def _send(self, job: PushRequested) -> httpx.Response:
        url, body = self.device_url(job.token), build_payload(job)
        provider_token = self.tokens.current()
        response = await self._client.post(
            url, content=body, headers=self.headers(job, provider_token)
        )
        if response.status_code == 403 and _apns_reason(response) == "ExpiredProviderToken":
            # Our token aged out (a clock step, a suspended process): one new token, one more try.
            provider_token = self.tokens.refresh(stale=provider_token)
            response = await self._client.post(
                url, content=body, headers=self.headers(job, provider_token)
            )
        return response

    async def aclose(self) -> None:
        await self._client.aclose()


def _apns_reason(response: httpx.Response) -> str:
    payload = _json_or_none(response)
    return _reason_word(payload.get("reason")) if isinstance(payload, dict) else ""
