"""OpenID Connect access tokens, against a local provider (discovery and JWKS over HTTP): users
made on first sight, every claim and signature checked, keys fetched again when the provider
rotates them (and not for every made-up key id), kept through a provider outage, and the
built-in accounts switched off."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import FastAPI

from message_service.app import service_of
from message_service.oidc import MIN_REFRESH_INTERVAL_S
from tests.fakes.oidc import FakeOidc
from tests.unit.message_service.helpers import (
    PASSWORD,
    client_for,
    make_settings,
    running_app,
    user_updates,
)

AUDIENCE = "herald-api"


@pytest.fixture
def idp() -> Iterator[FakeOidc]:
    provider = FakeOidc()
    provider.start()
    try:
        yield provider
    finally:
        provider.stop()


@pytest.fixture
async def app(sqlite_url: str, idp: FakeOidc) -> AsyncIterator[FastAPI]:
    settings = make_settings(sqlite_url, oidc_issuer=idp.issuer, oidc_audience=AUDIENCE)
    async with running_app(settings) as app:
        yield app


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(app) as client:
        yield client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def me(client: httpx.AsyncClient, token: str) -> httpx.Response:
    return await client.get("/users/me", headers=bearer(token))


async def test_a_user_is_made_on_first_sight_and_found_again(
    client: httpx.AsyncClient, idp: FakeOidc, app: FastAPI
) -> None:
    claims: dict[str, Any] = {
        "preferred_username": "Alice.Smith",
        "name": "Alice Smith",
        "email": "alice@corp.example",
        "email_verified": True,
    }
    first = await me(client, idp.access_token("sub-alice", audience=AUDIENCE, **claims))
    again = await me(client, idp.access_token("sub-alice", audience=AUDIENCE, **claims))

    assert first.status_code == again.status_code == 200
    profile = first.json()
    assert (profile["username"], profile["display_name"], profile["email"]) == (
        "alice_smith",
        "Alice Smith",
        "alice@corp.example",
    )
    assert again.json()["id"] == profile["id"]
    sessions = await client.get(
        "/users/me/sessions", headers=bearer(idp.access_token("sub-alice", audience=AUDIENCE))
    )
    assert [s["name"] for s in sessions.json()] == ["identity provider"]
    (snapshot,) = await user_updates(service_of(app), uuid.UUID(profile["id"]))
    assert snapshot.email == "alice@corp.example"


async def test_an_address_the_provider_did_not_verify_is_not_taken(
    client: httpx.AsyncClient, idp: FakeOidc, app: FastAPI
) -> None:
    token = idp.access_token(
        "sub-bob", audience=AUDIENCE, email="bob@corp.example", email_verified=False
    )

    profile = (await me(client, token)).json()

    assert profile["email"] == ""
    (snapshot,) = await user_updates(service_of(app), uuid.UUID(profile["id"]))
    assert snapshot.email is None  # nothing to mail


async def test_usernames_do_not_collide(client: httpx.AsyncClient, idp: FakeOidc) -> None:
    first = await me(client, idp.access_token("one", audience=AUDIENCE, preferred_username="bob"))
    second = await me(client, idp.access_token("two", audience=AUDIENCE, preferred_username="bob"))

    assert first.json()["username"] == "bob"
    assert second.json()["username"].startswith("bob_")
    assert first.json()["id"] != second.json()["id"]


def unsigned(idp: FakeOidc) -> str:
    header = jwt.utils.base64url_encode(b'{"alg":"none","typ":"JWT"}').decode()
    body = jwt.utils.base64url_encode(
        json.dumps({"sub": "x", "aud": AUDIENCE, "iss": idp.issuer, "exp": 9999999999}).encode()
    ).decode()
    return f"{header}.{body}."


def tampered(idp: FakeOidc) -> str:
    header, _, signature = idp.access_token("mallory", audience=AUDIENCE).split(".")
    body = jwt.utils.base64url_encode(
        json.dumps({"sub": "alice", "aud": AUDIENCE, "iss": idp.issuer, "exp": 9999999999}).encode()
    ).decode()
    return f"{header}.{body}.{signature}"


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda idp: idp.access_token("x", audience=AUDIENCE, expires_in=-120), "expired"),
        (lambda idp: idp.access_token("x", audience="another-api"), "InvalidAudienceError"),
        (
            lambda idp: idp.access_token("x", audience=AUDIENCE, issuer="https://evil.example"),
            "InvalidIssuerError",
        ),
        (
            lambda idp: idp.access_token(
                "x",
                audience=AUDIENCE,
                kid="made-up",
                key=rsa.generate_private_key(public_exponent=65537, key_size=2048),
            ),
            "signed with a key the issuer does not publish",
        ),
        (
            lambda idp: idp.access_token(
                "x",
                audience=AUDIENCE,
                key=rsa.generate_private_key(public_exponent=65537, key_size=2048),
            ),
            "InvalidSignatureError",
        ),
        (unsigned, "algorithm not accepted: none"),
        (
            lambda idp: jwt.encode(
                {"sub": "x", "aud": AUDIENCE, "iss": idp.issuer, "exp": 9999999999},
                "a shared secret of thirty-two bytes!",
                algorithm="HS256",
            ),
            "algorithm not accepted: HS256",
        ),
        (tampered, "InvalidSignatureError"),
    ],
)
async def test_a_token_that_fails_a_check_is_401(
    client: httpx.AsyncClient, idp: FakeOidc, make: Any, reason: str
) -> None:
    response = await me(client, make(idp))

    assert response.status_code == 401
    assert response.json() == {"detail": f"invalid access token: {reason}"}
    assert response.headers["www-authenticate"] == 'Bearer error="invalid_token"'


async def test_rotated_keys_are_fetched_once_and_made_up_ones_not_at_all(
    client: httpx.AsyncClient, idp: FakeOidc, app: FastAPI
) -> None:
    verifier = service_of(app).oidc
    assert verifier is not None
    now = [1000.0]
    verifier._clock = lambda: now[0]
    assert (await me(client, idp.access_token("alice", audience=AUDIENCE))).status_code == 200
    fetched = idp.jwks_requests
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    async def made_up(count: int) -> list[int]:
        tokens = [
            idp.access_token("x", audience=AUDIENCE, kid=f"k{n}", key=stranger)
            for n in range(count)
        ]
        return [(await me(client, token)).status_code for token in tokens]

    # Unknown key ids within MIN_REFRESH_INTERVAL_S of a fetch: refused without one.
    assert await made_up(5) == [401] * 5
    assert idp.jwks_requests == fetched
    # The provider rotates its key; once the interval has passed, its first new token fetches
    # the keys again (once), and is accepted.
    idp.rotate()
    now[0] += MIN_REFRESH_INTERVAL_S
    rotated = [await me(client, idp.access_token("alice", audience=AUDIENCE)) for _ in "ab"]

    assert [response.status_code for response in rotated] == [200, 200]
    assert idp.jwks_requests == fetched + 1
    # And the cache's age: past OIDC_JWKS_CACHE_SECONDS, the next token fetches them again.
    now[0] += 300.1
    assert (await me(client, idp.access_token("alice", audience=AUDIENCE))).status_code == 200
    assert idp.jwks_requests == fetched + 2


async def test_keys_held_outlive_a_provider_outage(
    client: httpx.AsyncClient, idp: FakeOidc
) -> None:
    assert (await me(client, idp.access_token("alice", audience=AUDIENCE))).status_code == 200
    later = idp.access_token("alice", audience=AUDIENCE)
    idp.stop()

    assert (await me(client, later)).status_code == 200


async def test_a_provider_session_owns_its_devices(
    client: httpx.AsyncClient, idp: FakeOidc
) -> None:
    phone = idp.access_token("alice", audience=AUDIENCE, sid="phone-session")
    laptop = idp.access_token("alice", audience=AUDIENCE, sid="laptop-session")
    registered = await client.post(
        "/users/me/devices", json={"platform": "fcm", "token": "alice-phone"}, headers=bearer(phone)
    )
    assert registered.status_code == 201

    signed_out = await client.delete("/sessions/current", headers=bearer(phone))

    assert signed_out.status_code == 204
    assert (await client.get("/users/me/devices", headers=bearer(laptop))).json() == []


async def test_a_deleted_account_is_made_anew_at_the_next_token(
    client: httpx.AsyncClient, idp: FakeOidc
) -> None:
    first = (await me(client, idp.access_token("alice", audience=AUDIENCE))).json()
    deleted = await client.delete(
        "/users/me", headers=bearer(idp.access_token("alice", audience=AUDIENCE))
    )

    second = (await me(client, idp.access_token("alice", audience=AUDIENCE))).json()

    assert deleted.status_code == 204
    assert second["id"] != first["id"]


async def test_builtin_accounts_can_be_switched_off(sqlite_url: str, idp: FakeOidc) -> None:
    settings = make_settings(
        sqlite_url, oidc_issuer=idp.issuer, oidc_audience=AUDIENCE, builtin_accounts=False
    )
    async with running_app(settings) as app, client_for(app) as client:
        registration = await client.post(
            "/users",
            json={
                "username": "alice",
                "display_name": "Alice",
                "email": "alice@example.test",
                "password": PASSWORD,
            },
        )
        sign_in = await client.post("/sessions", json={"username": "a", "password": PASSWORD})
        session_token = await client.get("/users/me", headers=bearer("a" * 43))
        provider_token = await me(client, idp.access_token("alice", audience=AUDIENCE))
        password = await client.put(
            "/users/me/password",
            json={"new_password": PASSWORD},
            headers=bearer(idp.access_token("alice", audience=AUDIENCE)),
        )

    assert registration.status_code == sign_in.status_code == password.status_code == 403
    assert "identity provider" in registration.json()["detail"]
    assert session_token.status_code == 401
    assert provider_token.status_code == 200


@pytest.mark.parametrize(
    "overrides",
    [
        {"oidc_issuer": "https://idp.example"},  # no audience
        {"builtin_accounts": False},  # no provider: no one could sign in
        {"oidc_issuer": "http://idp.example", "oidc_audience": "a"},  # not https
        {"oidc_issuer": "https://idp.example", "oidc_audience": "a", "oidc_algorithms": "HS256"},
    ],
)
def test_settings_that_cannot_work_are_refused(sqlite_url: str, overrides: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"OIDC|https|BUILTIN"):
        make_settings(sqlite_url, **overrides)
