"""Registration, authentication, the profile, and the UserUpdated snapshots they stage."""

from __future__ import annotations

import hashlib
from typing import Any

import httpx
import pytest
from sqlmodel import select

from message_service.app import MessageService
from message_service.models import AuthSession, User
from tests.unit.message_service.helpers import PASSWORD, register, user_updates

PROTECTED = [
    ("GET", "/users/me"),
    ("PATCH", "/users/me"),
    ("GET", "/users/me/devices"),
    ("POST", "/users/me/devices"),
    ("DELETE", "/users/me/devices/00000000-0000-0000-0000-000000000001"),
    ("GET", "/users/me/preferences"),
    ("PUT", "/users/me/preferences"),
    ("PUT", "/users/me/snooze"),
    ("POST", "/rooms"),
    ("GET", "/rooms/00000000-0000-0000-0000-000000000001"),
    ("POST", "/rooms/00000000-0000-0000-0000-000000000001/members"),
    ("POST", "/rooms/00000000-0000-0000-0000-000000000001/messages"),
    ("GET", "/rooms/00000000-0000-0000-0000-000000000001/messages"),
]


async def test_registration_returns_a_token_and_stores_only_its_hash(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    response = await client.post(
        "/users",
        json={
            "username": "alice",
            "display_name": "Alice",
            "email": "alice@example.test",
            "password": PASSWORD,
        },
    )

    assert response.status_code == 201
    body = response.json()
    assert set(body) == {"id", "username", "display_name", "token", "session_id", "expires_at"}
    assert (body["username"], body["display_name"]) == ("alice", "Alice")
    token = body["token"]
    assert len(token) >= 43  # 32 random bytes, base64url
    async with runtime.sessions() as session:
        rows = (await session.exec(select(AuthSession))).all()
    assert [row.token_hash for row in rows] == [hashlib.sha256(token.encode()).hexdigest()]
    assert [str(row.id) for row in rows] == [body["session_id"]]
    assert all(token not in str(row.model_dump()) for row in rows)

    me = await client.get("/users/me", headers={"Authorization": f"Bearer {token}"})
    assert me.status_code == 200
    assert me.json()["id"] == body["id"]


@pytest.mark.parametrize(("method", "path"), PROTECTED)
async def test_every_other_route_needs_a_bearer_token(
    client: httpx.AsyncClient, method: str, path: str
) -> None:
    response = await client.request(method, path, json={})

    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    "authorization",
    ["Bearer not-a-token", "Basic YWxpY2U6c2VjcmV0", "Bearer", "not-even-a-scheme"],
)
async def test_a_wrong_token_or_scheme_is_401(
    client: httpx.AsyncClient, authorization: str
) -> None:
    await register(client, "alice")

    response = await client.get("/users/me", headers={"Authorization": authorization})

    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")


async def test_tokens_are_per_user(client: httpx.AsyncClient) -> None:
    alice = await register(client, "alice")
    bob = await register(client, "bob")

    me = await client.get("/users/me", headers=bob.headers)

    assert me.json()["id"] == str(bob.id) != str(alice.id)


@pytest.mark.parametrize("username", ["room", "all"])
async def test_a_username_that_mentions_a_whole_room_is_422(
    client: httpx.AsyncClient, username: str
) -> None:
    response = await client.post(
        "/users",
        json={
            "username": username,
            "display_name": "X",
            "email": "x@example.test",
            "password": PASSWORD,
        },
    )

    assert response.status_code == 422
    assert "mentions a whole room" in response.text


async def test_a_taken_username_is_409(client: httpx.AsyncClient) -> None:
    await register(client, "alice")

    response = await client.post(
        "/users",
        json={
            "username": "alice",
            "display_name": "Other",
            "email": "o@example.test",
            "password": PASSWORD,
        },
    )

    assert response.status_code == 409
    assert response.json() == {"detail": "username is taken"}


@pytest.mark.parametrize(
    "changes",
    [
        {"username": "Alice"},
        {"username": "al"},
        {"username": "a" * 33},
        {"username": "al ice"},
        {"username": "alice!"},
        {"display_name": "A" * 101},
        {"display_name": "   "},
        {"display_name": "Alice\r\nBcc: x@example.test"},
        {"display_name": "Alice\x00"},
        {"display_name": "evil\u202egnp.exe"},
        {"email": "not-an-address"},
        {"email": "alice@localhost"},
        {"email": "alice@example.test\r\nBcc: x@example.test"},
        {"email": "a" * 65 + "@example.test"},
        {"is_admin": True},
        {"id": "00000000-0000-0000-0000-000000000001"},
        {"password": "seven c"},
        {"password": "x" * 129},
        {"password": None},
        {"password": 12345678},
        {"session_name": "phone\nBcc: x"},
        {"session_name": "p" * 101},
    ],
)
async def test_registration_rejects_invalid_and_unknown_fields(
    client: httpx.AsyncClient, changes: dict[str, Any]
) -> None:
    body = {
        "username": "alice",
        "display_name": "Alice",
        "email": "alice@example.test",
        "password": PASSWORD,
        **changes,
    }

    response = await client.post("/users", json=body)

    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"][1] == next(iter(changes))


async def test_registration_needs_a_password(client: httpx.AsyncClient) -> None:
    body = {"username": "alice", "display_name": "Alice", "email": "alice@example.test"}

    response = await client.post("/users", json=body)

    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "password"]


async def test_names_are_trimmed_and_the_mail_domain_lowercased(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post(
        "/users",
        json={
            "username": "alice",
            "display_name": "  Alice 👋 ",
            "email": "Alice@Example.TEST",
            "password": PASSWORD,
        },
    )
    token = response.json()["token"]

    me = (await client.get("/users/me", headers={"Authorization": f"Bearer {token}"})).json()

    assert (me["display_name"], me["email"]) == ("Alice 👋", "Alice@example.test")


async def test_profile_shows_own_fields_only(client: httpx.AsyncClient) -> None:
    alice = await register(client, "alice")

    response = await client.get("/users/me", headers=alice.headers)

    assert set(response.json()) == {
        "id",
        "username",
        "display_name",
        "email",
        "email_verified",
        "created_at",
    }


async def test_patch_changes_the_profile_and_bumps_the_version(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice = await register(client, "alice")

    response = await client.patch(
        "/users/me",
        json={"display_name": "Alice L.", "email": "alice@new.example.test"},
        headers=alice.headers,
    )

    assert response.status_code == 200
    assert response.json()["display_name"] == "Alice L."
    assert response.json()["email"] == "alice@new.example.test"
    updates = await user_updates(runtime, alice.id)
    assert [u.version for u in updates] == [1, 2]
    assert (updates[1].display_name, updates[1].email) == ("Alice L.", "alice@new.example.test")
    async with runtime.sessions() as session:
        user = await session.get(User, alice.id)
    assert user is not None
    assert user.version == 2


@pytest.mark.parametrize("body", [{}, {"display_name": "Alice"}, {"email": "alice@example.test"}])
async def test_patch_without_a_change_publishes_nothing(
    client: httpx.AsyncClient, runtime: MessageService, body: dict[str, str]
) -> None:
    alice = await register(client, "alice")

    response = await client.patch("/users/me", json=body, headers=alice.headers)

    assert response.status_code == 200
    assert [u.version for u in await user_updates(runtime, alice.id)] == [1]


@pytest.mark.parametrize(
    "body",
    [
        {"display_name": None},
        {"email": None},
        {"username": "mallory"},
        {"version": 99},
        {"display_name": "x\ny"},
        {"email": "nope"},
    ],
)
async def test_patch_rejects_nulls_invalid_and_unknown_fields(
    client: httpx.AsyncClient, runtime: MessageService, body: dict[str, Any]
) -> None:
    alice = await register(client, "alice")

    response = await client.patch("/users/me", json=body, headers=alice.headers)

    assert response.status_code == 422
    assert [u.version for u in await user_updates(runtime, alice.id)] == [1]


async def test_every_relevant_change_stages_a_full_snapshot_with_a_growing_version(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice = await register(client, "alice")
    bob = await register(client, "bob")
    room = await client.post(
        "/rooms", json={"name": "r", "member_ids": [str(bob.id)]}, headers=alice.headers
    )
    room_id = room.json()["id"]

    await client.patch("/users/me", json={"display_name": "Al"}, headers=alice.headers)
    device = await client.post(
        "/users/me/devices", json={"platform": "fcm", "token": "tok-a"}, headers=alice.headers
    )
    await client.put(
        "/users/me/preferences",
        json={"push_enabled": False, "email_enabled": True, "muted_room_ids": [room_id]},
        headers=alice.headers,
    )
    await client.delete(f"/users/me/devices/{device.json()['id']}", headers=alice.headers)

    updates = await user_updates(runtime, alice.id)
    assert [u.version for u in updates] == [1, 2, 3, 4, 5]
    first, renamed, with_device, muted, without_device = updates
    assert (first.username, first.display_name, first.email) == (
        "alice",
        "Alice",
        "alice@example.test",
    )
    assert first.devices == []
    assert first.preferences.push_enabled
    assert first.preferences.email_enabled
    assert renamed.display_name == "Al"
    assert [(d.platform, d.token) for d in with_device.devices] == [("fcm", "tok-a")]
    assert muted.preferences.push_enabled is False
    assert [str(r) for r in muted.preferences.muted_room_ids] == [room_id]
    assert without_device.devices == []
    assert without_device.preferences.muted_room_ids == muted.preferences.muted_room_ids
    # Room creation and the other user's registration are not alice's changes.
    assert [u.version for u in await user_updates(runtime, bob.id)] == [1]
