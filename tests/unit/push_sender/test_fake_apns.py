"""The fake APNs server refuses what Apple would refuse, so the adapter's tests mean something."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from tests.fakes.apns import FakeApns, device_token

TOKEN = device_token()


@pytest.fixture
async def client(apns: FakeApns) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=apns.base_url, http1=False, http2=True, timeout=5
    ) as client:
        yield client


def provider_token(
    apns: FakeApns,
    key_file: Path,
    *,
    key: Any = None,
    kid: str | None = None,
    algorithm: str = "ES256",
    **claims: Any,
) -> str:
    """A provider token for the fake's team, with `claims` overridden, signed with `key` (default:
    the key in `key_file`)."""
    payload = {"iss": apns.team_id, "iat": int(time.time()), **claims}
    return jwt.encode(
        payload,
        key or key_file.read_bytes(),
        algorithm=algorithm,
        headers={"kid": kid or apns.key_id},
    )


def headers(signed: str | None, **overrides: str) -> dict[str, str]:
    values = {
        "apns-topic": "chat.herald.ios",
        "apns-push-type": "alert",
        "apns-priority": "10",
        "apns-id": str(uuid.uuid4()),
    }
    if signed is not None:
        values["authorization"] = f"bearer {signed}"
    values.update(overrides)
    return {name: value for name, value in values.items() if value}


BODY = json.dumps({"aps": {"alert": {"title": "t", "body": "b"}}}).encode()
SILENT = json.dumps({"aps": {"content-available": 1}, "type": "recall"}).encode()


async def push(
    client: httpx.AsyncClient,
    signed: str | None,
    *,
    token: str = TOKEN,
    body: bytes = BODY,
    extra: dict[str, str] | None = None,
) -> httpx.Response:
    return await client.post(
        f"/3/device/{token}", content=body, headers=headers(signed, **(extra or {}))
    )


async def test_a_well_formed_push_is_accepted_over_http2(
    client: httpx.AsyncClient, apns: FakeApns, apns_key: Path
) -> None:
    apns_id = str(uuid.uuid4())

    response = await push(client, provider_token(apns, apns_key), extra={"apns-id": apns_id})

    assert response.status_code == 200
    assert response.http_version == "HTTP/2"
    assert response.headers["apns-id"] == apns_id
    assert response.content == b""
    assert apns.http_versions == ["2"]
    [(recorded, payload)] = apns.accepted
    assert recorded[":path"] == f"/3/device/{TOKEN}"
    assert payload == json.loads(BODY)


async def test_http_1_1_is_refused(apns: FakeApns, apns_key: Path) -> None:
    async with httpx.AsyncClient(base_url=apns.base_url, timeout=5) as http1:
        response = await push(http1, provider_token(apns, apns_key))

    assert response.http_version == "HTTP/1.1"
    assert response.status_code == 505
    assert apns.http_versions == ["1.1"]
    assert apns.accepted == []


async def reason(response: httpx.Response) -> tuple[int, str]:
    return response.status_code, response.json()["reason"]


async def test_a_bad_signature_is_refused(
    client: httpx.AsyncClient, apns: FakeApns, apns_key: Path
) -> None:
    # The right key id and claims, signed by another key.
    forged = provider_token(apns, apns_key, key=ec.generate_private_key(ec.SECP256R1()))

    response = await push(client, forged)

    assert await reason(response) == (403, "InvalidProviderToken")
    assert apns.accepted == []


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"kid": "UNKNOWN123"}, "InvalidProviderToken"),
        ({"iss": "OTHERTEAM1"}, "InvalidProviderToken"),
        ({"iat": int(time.time()) + 3600}, "InvalidProviderToken"),  # from the future
        ({"iat": int(time.time()) - 3601 - 60}, "ExpiredProviderToken"),
        ({"algorithm": "HS256", "key": b"k" * 32}, "InvalidProviderToken"),
    ],
)
async def test_provider_token_claims_are_checked(
    client: httpx.AsyncClient,
    apns: FakeApns,
    apns_key: Path,
    overrides: dict[str, Any],
    expected: str,
) -> None:
    response = await push(client, provider_token(apns, apns_key, **overrides))

    assert await reason(response) == (403, expected)


async def test_a_missing_provider_token_is_refused(client: httpx.AsyncClient) -> None:
    assert await reason(await push(client, None)) == (403, "MissingProviderToken")


async def test_expire_provider_token_expires_the_tokens_seen(
    client: httpx.AsyncClient, apns: FakeApns, apns_key: Path
) -> None:
    old = provider_token(apns, apns_key, iat=int(time.time()) - 10)
    assert (await push(client, old)).status_code == 200

    apns.expire_provider_token()

    assert await reason(await push(client, old)) == (403, "ExpiredProviderToken")
    assert (await push(client, provider_token(apns, apns_key))).status_code == 200


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"token": "c0ffee"}, (400, "BadDeviceToken")),
        ({"token": "g" * 64}, (400, "BadDeviceToken")),
        ({"apns-topic": ""}, (400, "MissingTopic")),
        ({"apns-topic": "com.example.not-ours"}, (400, "TopicDisallowed")),
        ({"apns-topic": "chat.herald.other"}, (400, "DeviceTokenNotForTopic")),
        ({"apns-push-type": ""}, (400, "InvalidPushType")),
        ({"apns-priority": "7"}, (400, "BadPriority")),
        ({"apns-expiration": "tomorrow"}, (400, "BadExpirationDate")),
        ({"apns-collapse-id": "x" * 65}, (400, "BadCollapseId")),
        ({"apns-id": "not-a-uuid"}, (400, "BadMessageId")),
        ({"body": b""}, (400, "PayloadEmpty")),
        ({"body": b'{"no": "aps"}'}, (400, "BadPayload")),
        (
            {"body": json.dumps({"aps": {"alert": "x" * 4090}}).encode()},
            (413, "PayloadTooLarge"),
        ),
        # A background push: priority 5, and an aps that only wakes the app.
        ({"apns-push-type": "background", "body": SILENT}, (400, "BadPriority")),
        (
            {"apns-push-type": "background", "apns-priority": "5", "body": BODY},
            (400, "BadPayload"),
        ),
        (
            {
                "apns-push-type": "background",
                "apns-priority": "5",
                "body": json.dumps({"aps": {"content-available": 1, "badge": 3}}).encode(),
            },
            (400, "BadPayload"),
        ),
    ],
)
async def test_malformed_pushes_are_refused(
    client: httpx.AsyncClient,
    apns: FakeApns,
    apns_key: Path,
    overrides: dict[str, Any],
    expected: tuple[int, str],
) -> None:
    overrides = dict(overrides)  # the parameter is shared by reruns
    token = overrides.pop("token", TOKEN)
    body = overrides.pop("body", BODY)
    response = await push(
        client, provider_token(apns, apns_key), token=token, body=body, extra=overrides
    )

    assert await reason(response) == expected
    assert apns.accepted == []


async def test_a_background_push_is_accepted_and_recorded(
    client: httpx.AsyncClient, apns: FakeApns, apns_key: Path
) -> None:
    extra = {"apns-push-type": "background", "apns-priority": "5"}

    response = await push(client, provider_token(apns, apns_key), body=SILENT, extra=extra)

    assert response.status_code == 200
    [(headers, payload)] = apns.messages_to(TOKEN)
    assert (headers["apns-push-type"], headers["apns-priority"]) == ("background", "5")
    assert payload == json.loads(SILENT)


async def test_a_collapse_id_of_64_bytes_is_fine(
    client: httpx.AsyncClient, apns: FakeApns, apns_key: Path
) -> None:
    response = await push(
        client, provider_token(apns, apns_key), extra={"apns-collapse-id": "x" * 64}
    )

    assert response.status_code == 200


async def test_scripted_failures_carry_a_timestamp_and_retry_after(
    client: httpx.AsyncClient, apns: FakeApns, apns_key: Path
) -> None:
    signed = provider_token(apns, apns_key)
    apns.fail(TOKEN, 410, "Unregistered", times=1)
    apns.fail(TOKEN, 429, "TooManyRequests", times=1, retry_after=9)
    before = int(time.time() * 1000)

    gone = await push(client, signed)
    throttled = await push(client, signed)
    fine = await push(client, signed)

    assert gone.status_code == 410
    assert gone.json()["reason"] == "Unregistered"
    assert before <= gone.json()["timestamp"] <= int(time.time() * 1000)
    assert await reason(throttled) == (429, "TooManyRequests")
    assert throttled.headers["retry-after"] == "9"
    assert fine.status_code == 200
    assert apns.requests == 3
