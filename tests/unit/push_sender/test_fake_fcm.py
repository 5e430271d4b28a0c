"""The fake FCM server refuses what Google would refuse, so the adapter's tests mean something."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from tests.fakes.fcm import JWT_BEARER_GRANT, SCOPE, FakeFcm


@pytest.fixture
def account(credentials: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(credentials.read_text())
    return document


@pytest.fixture
async def client(fcm: FakeFcm) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=fcm.base_url, timeout=5) as client:
        yield client


def assertion(account: dict[str, Any], *, key: str | None = None, **claims: Any) -> str:
    """A JWT-bearer assertion for `account`, with `claims` overridden, signed with `key` (default:
    the account's own private key)."""
    now = int(time.time())
    payload = {
        "iss": account["client_email"],
        "scope": SCOPE,
        "aud": account["token_uri"],
        "iat": now,
        "exp": now + 3600,
        **claims,
    }
    return jwt.encode(
        payload,
        key or account["private_key"],
        algorithm="RS256",
        headers={"kid": account["private_key_id"]},
    )


async def token(client: httpx.AsyncClient, signed: str) -> httpx.Response:
    return await client.post("/token", data={"grant_type": JWT_BEARER_GRANT, "assertion": signed})


async def test_a_valid_assertion_buys_a_bearer_token(
    client: httpx.AsyncClient, account: dict[str, Any]
) -> None:
    response = await token(client, assertion(account))

    assert response.status_code == 200
    body = response.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 3600
    assert body["access_token"]


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"aud": "https://oauth2.googleapis.com/token"}, "invalid_grant"),
        ({"iss": "someone@else.iam.gserviceaccount.com"}, "invalid_grant"),
        ({"scope": "https://www.googleapis.com/auth/cloud-platform"}, "invalid_scope"),
        ({"exp": int(time.time()) - 10, "iat": int(time.time()) - 100}, "invalid_grant"),
        ({"exp": int(time.time()) + 7200}, "invalid_grant"),
    ],
)
async def test_bad_claims_are_refused(
    client: httpx.AsyncClient, account: dict[str, Any], overrides: dict[str, Any], error: str
) -> None:
    response = await token(client, assertion(account, **overrides))

    assert response.status_code == 400
    assert response.json()["error"] == error


async def test_a_signature_of_another_key_is_refused(
    client: httpx.AsyncClient, account: dict[str, Any], fcm: FakeFcm, tmp_path: Path
) -> None:
    other = json.loads(fcm.write_credentials(tmp_path / "other.json").read_text())
    forged = assertion(account, key=other["private_key"])  # kid of the first key

    response = await token(client, forged)

    assert (response.status_code, response.json()["error"]) == (400, "invalid_grant")


async def test_only_the_jwt_bearer_grant_is_accepted(
    client: httpx.AsyncClient, account: dict[str, Any]
) -> None:
    response = await client.post(
        "/token", data={"grant_type": "client_credentials", "assertion": assertion(account)}
    )
    assert (response.status_code, response.json()["error"]) == (400, "unsupported_grant_type")


async def test_sends_need_an_issued_token(
    client: httpx.AsyncClient, account: dict[str, Any], fcm: FakeFcm
) -> None:
    body = {"message": {"token": "device", "notification": {"title": "t", "body": "b"}}}
    url = f"/v1/projects/{fcm.project_id}/messages:send"

    anonymous = await client.post(url, json=body)
    forged = await client.post(url, json=body, headers={"authorization": "Bearer ya29.forged"})
    access = (await token(client, assertion(account))).json()["access_token"]
    accepted = await client.post(url, json=body, headers={"authorization": f"Bearer {access}"})

    assert anonymous.status_code == forged.status_code == 401
    assert anonymous.json()["error"]["status"] == "UNAUTHENTICATED"
    assert accepted.status_code == 200
    assert accepted.json()["name"].startswith(f"projects/{fcm.project_id}/messages/")
    assert fcm.accepted == [body]


async def test_malformed_messages_are_refused_like_fcm_does(
    client: httpx.AsyncClient, account: dict[str, Any], fcm: FakeFcm
) -> None:
    access = (await token(client, assertion(account))).json()["access_token"]
    headers = {"authorization": f"Bearer {access}"}
    url = f"/v1/projects/{fcm.project_id}/messages:send"

    unknown = await client.post(url, json={"message": {"token": "d", "colour": 1}}, headers=headers)
    no_target = await client.post(url, json={"message": {"data": {}}}, headers=headers)
    empty_token = await client.post(url, json={"message": {"token": ""}}, headers=headers)

    for response in (unknown, no_target, empty_token):
        assert response.status_code == 400
        assert response.json()["error"]["status"] == "INVALID_ARGUMENT"
    violations = empty_token.json()["error"]["details"][1]["fieldViolations"]
    assert violations[0]["field"] == "message.token"
    assert fcm.accepted == []


async def test_a_data_message_is_accepted_and_a_bad_notification_count_refused(
    client: httpx.AsyncClient, account: dict[str, Any], fcm: FakeFcm
) -> None:
    access = (await token(client, assertion(account))).json()["access_token"]
    headers = {"authorization": f"Bearer {access}"}
    url = f"/v1/projects/{fcm.project_id}/messages:send"
    data_only = {"message": {"token": "d", "data": {"type": "recall"}, "android": {}}}

    accepted = await client.post(url, json=data_only, headers=headers)
    refused = [
        await client.post(
            url,
            json={
                "message": {"token": "d", "android": {"notification": {"notification_count": n}}}
            },
            headers=headers,
        )
        for n in (-1, "3", True)
    ]

    assert accepted.status_code == 200
    assert fcm.messages_to("d") == [data_only]
    for response in refused:
        assert response.status_code == 400
        violations = response.json()["error"]["details"][1]["fieldViolations"]
        assert violations[0]["field"] == "message.android.notification.notification_count"
