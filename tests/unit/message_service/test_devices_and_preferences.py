"""Push devices and notification preferences."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import httpx
import pytest

from message_service.app import MessageService
from tests.unit.message_service.helpers import (
    client_for,
    create_room,
    make_settings,
    register,
    running_app,
    sign_in,
    user_updates,
)


async def add_device(client: httpx.AsyncClient, headers: dict[str, str], token: str) -> Any:
    return await client.post(
        "/users/me/devices", json={"platform": "fcm", "token": token}, headers=headers
    )


async def test_a_device_is_registered_and_its_token_never_returned(
    client: httpx.AsyncClient,
) -> None:
    alice = await register(client, "alice")

    response = await add_device(client, alice.headers, "fcm-token-alice")

    assert response.status_code == 201
    body = response.json()
    assert set(body) == {"id", "platform", "created_at", "session_id"}
    assert (body["platform"], body["session_id"]) == ("fcm", str(alice.session_id))
    listed = await client.get("/users/me/devices", headers=alice.headers)
    assert listed.json() == [body]
    assert "fcm-token-alice" not in listed.text


async def test_the_same_token_again_returns_the_existing_device(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice = await register(client, "alice")
    first = await add_device(client, alice.headers, "tok")

    again = await add_device(client, alice.headers, "tok")

    assert again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert len((await client.get("/users/me/devices", headers=alice.headers)).json()) == 1
    # Registering again refreshes the token's registration time, which the snapshot carries.
    updates = await user_updates(runtime, alice.id)
    assert [u.version for u in updates] == [1, 2, 3]
    registered, refreshed = (u.devices[0].token_updated_at for u in updates[1:])
    assert registered is not None
    assert refreshed is not None
    assert refreshed >= registered


async def test_a_token_registered_by_another_user_moves_to_the_new_user(
    client: httpx.AsyncClient, runtime: MessageService, caplog: pytest.LogCaptureFixture
) -> None:
    alice = await register(client, "alice")  # on the phone
    alice_laptop = await sign_in(client, "alice")
    bob = await register(client, "bob")
    first = await add_device(client, alice.headers, "shared-phone")

    with caplog.at_level(logging.WARNING, logger="message_service"):
        moved = await add_device(client, bob.headers, "shared-phone")

    (audit,) = [r.getMessage() for r in caplog.records if "device.moved" in r.getMessage()]
    assert f"from_user_id={alice.id} from_device_id={first.json()['id']}" in audit
    assert f"to_user_id={bob.id} to_device_id={moved.json()['id']}" in audit
    assert "shared-phone" not in audit

    assert moved.status_code == 201
    # Alice's session on the phone is signed out; her laptop's is not.
    assert (await client.get("/users/me", headers=alice.headers)).status_code == 401
    assert (await client.get("/users/me/devices", headers=alice_laptop.headers)).json() == []
    sessions = (await client.get("/users/me/sessions", headers=alice_laptop.headers)).json()
    assert [s["id"] for s in sessions] == [str(alice_laptop.session_id)]
    assert runtime.registry.get_sample_value("herald_message_device_moves_total") == 1
    bobs = (await client.get("/users/me/devices", headers=bob.headers)).json()
    assert [d["id"] for d in bobs] == [moved.json()["id"]]
    alice_last = (await user_updates(runtime, alice.id))[-1]
    bob_last = (await user_updates(runtime, bob.id))[-1]
    assert (alice_last.version, alice_last.devices) == (3, [])
    assert bob_last.version == 2
    assert [(str(d.device_id), d.token) for d in bob_last.devices] == [
        (moved.json()["id"], "shared-phone")
    ]


async def test_devices_per_user_are_capped(sqlite_url: str) -> None:
    async with (
        running_app(make_settings(sqlite_url, max_devices_per_user=2)) as app,
        client_for(app) as client,
    ):
        alice = await register(client, "alice")
        for token in ("one", "two"):
            assert (await add_device(client, alice.headers, token)).status_code == 201

        third = await add_device(client, alice.headers, "three")
        known = await add_device(client, alice.headers, "two")

    assert third.status_code == 409
    assert "at most 2 devices" in third.json()["detail"]
    assert known.status_code == 200


async def test_a_device_is_deleted_only_by_its_owner(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice = await register(client, "alice")
    mallory = await register(client, "mallory")
    device_id = (await add_device(client, alice.headers, "tok")).json()["id"]

    by_other = await client.delete(f"/users/me/devices/{device_id}", headers=mallory.headers)
    unknown = await client.delete(f"/users/me/devices/{uuid.uuid4()}", headers=alice.headers)
    by_owner = await client.delete(f"/users/me/devices/{device_id}", headers=alice.headers)
    again = await client.delete(f"/users/me/devices/{device_id}", headers=alice.headers)

    assert (by_other.status_code, unknown.status_code) == (404, 404)
    assert by_owner.status_code == 204
    assert again.status_code == 404
    assert [u.version for u in await user_updates(runtime, alice.id)] == [1, 2, 3]
    assert [u.version for u in await user_updates(runtime, mallory.id)] == [1]


@pytest.mark.parametrize(
    "body",
    [
        {"platform": "apns", "token": "tok"},
        {"platform": "fcm", "token": ""},
        {"platform": "fcm", "token": "has space"},
        {"platform": "fcm", "token": "line\nbreak"},
        {"platform": "fcm", "token": "x" * 4097},
        {"platform": "fcm"},
        {"platform": "fcm", "token": "tok", "user_id": "00000000-0000-0000-0000-000000000001"},
    ],
)
async def test_invalid_devices_are_422(client: httpx.AsyncClient, body: dict[str, Any]) -> None:
    alice = await register(client, "alice")

    response = await client.post("/users/me/devices", json=body, headers=alice.headers)

    assert response.status_code == 422


async def test_a_malformed_device_id_is_422(client: httpx.AsyncClient) -> None:
    alice = await register(client, "alice")

    response = await client.delete("/users/me/devices/not-a-uuid", headers=alice.headers)

    assert response.status_code == 422


async def test_preferences_default_to_dms_and_mentions(client: httpx.AsyncClient) -> None:
    alice = await register(client, "alice")

    response = await client.get("/users/me/preferences", headers=alice.headers)

    assert response.json() == {
        "push": "mentions",
        "email": "mentions",
        "push_preview": True,
        "email_delay": 120,
        "push_enabled": True,
        "email_enabled": True,
        "muted_room_ids": [],
        "quiet_hours": None,
        "snoozed_until": None,
        "breakthrough_user_ids": [],
    }


async def test_preferences_are_replaced_and_published(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice = await register(client, "alice")
    room = await create_room(client, alice, [])
    body = {"push_enabled": False, "email_enabled": False, "muted_room_ids": [str(room)] * 2}

    response = await client.put("/users/me/preferences", json=body, headers=alice.headers)
    unchanged = await client.put("/users/me/preferences", json=body, headers=alice.headers)

    expected = {
        "push": "none",
        "email": "none",
        "push_preview": True,
        "email_delay": 120,
        "push_enabled": False,
        "email_enabled": False,
        "muted_room_ids": [str(room)],
        "quiet_hours": None,
        "snoozed_until": None,
        "breakthrough_user_ids": [],
    }
    assert response.status_code == unchanged.status_code == 200
    assert response.json() == expected
    assert (await client.get("/users/me/preferences", headers=alice.headers)).json() == expected
    updates = await user_updates(runtime, alice.id)
    assert [u.version for u in updates] == [1, 2]  # the identical second PUT changed nothing
    assert updates[-1].preferences.muted_room_ids == [room]


async def test_turning_previews_off_reaches_the_snapshot(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice = await register(client, "alice")
    body = {
        "push_enabled": True,
        "email_enabled": True,
        "push_preview": False,
        "muted_room_ids": [],
    }

    response = await client.put("/users/me/preferences", json=body, headers=alice.headers)

    assert response.json()["push_preview"] is False
    updates = await user_updates(runtime, alice.id)
    assert [u.preferences.push_preview for u in updates] == [True, False]


async def test_the_email_delay_is_a_preference_published_to_the_router(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice = await register(client, "alice")

    response = await client.put(
        "/users/me/preferences", json={"email_delay": 900}, headers=alice.headers
    )
    at_once = await client.put(
        "/users/me/preferences", json={"email_delay": 0}, headers=alice.headers
    )

    assert response.json()["email_delay"] == 900
    assert at_once.json()["email_delay"] == 0
    updates = await user_updates(runtime, alice.id)
    assert [u.preferences.email_delay for u in updates] == [120, 900, 0]


async def test_only_own_rooms_can_be_muted(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice = await register(client, "alice")
    bob = await register(client, "bob")
    bobs_room = await create_room(client, bob, [])

    for room_id in (bobs_room, uuid.uuid4()):
        response = await client.put(
            "/users/me/preferences",
            json={"push_enabled": True, "email_enabled": True, "muted_room_ids": [str(room_id)]},
            headers=alice.headers,
        )
        assert response.status_code == 422
        assert str(room_id) in response.json()["detail"]
    assert [u.version for u in await user_updates(runtime, alice.id)] == [1]


@pytest.mark.parametrize(
    "body",
    [
        {"push": "sometimes"},
        {"email": "all", "email_enabled": True},
        {"push": None, "push_enabled": None, "push_preview": "no"},
        {"email_delay": 60},
        {"email_delay": "120"},
        {"email_delay": False},
        {"email_delay": 120.0},
        {"push_enabled": "yes", "email_enabled": True, "muted_room_ids": []},
        {"push_enabled": 1, "email_enabled": True, "muted_room_ids": []},
        {"push_enabled": True, "email_enabled": True, "muted_room_ids": ["nope"]},
        {"push_enabled": True, "email_enabled": True, "muted_room_ids": [], "sms": True},
        {
            "push_enabled": True,
            "email_enabled": True,
            "muted_room_ids": [str(uuid.uuid4()) for _ in range(1001)],
        },
    ],
)
async def test_invalid_preferences_are_422(client: httpx.AsyncClient, body: dict[str, Any]) -> None:
    alice = await register(client, "alice")

    response = await client.put("/users/me/preferences", json=body, headers=alice.headers)

    assert response.status_code == 422
