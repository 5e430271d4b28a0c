"""Notification levels (user defaults and per room), timed mutes and room-wide mentions: what
the API takes and answers, and what reaches the router in `user.updated` and
`notification.message.new`."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from herald_shared.events import Level, RoomSettingsSnapshot
from message_service.app import MessageService
from message_service.service import room_mentioned
from tests.unit.message_service.helpers import (
    create_room,
    messages_created,
    register,
    user_updates,
)

FOREVER = "9999-12-31T23:59:59Z"


async def put_preferences(
    client: httpx.AsyncClient, headers: dict[str, str], body: dict[str, Any]
) -> httpx.Response:
    return await client.put("/users/me/preferences", json=body, headers=headers)


async def test_levels_are_set_per_channel_and_published(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice = await register(client, "alice")

    response = await put_preferences(client, alice.headers, {"push": "all", "email": "none"})
    again = await put_preferences(client, alice.headers, {"push": "all"})  # e-mail left as is

    assert response.status_code == again.status_code == 200
    assert (again.json()["push"], again.json()["email"]) == ("all", "none")
    assert (again.json()["push_enabled"], again.json()["email_enabled"]) == (True, False)
    updates = await user_updates(runtime, alice.id)
    assert [u.version for u in updates] == [1, 2]  # the second PUT changed nothing
    assert updates[0].preferences.push_level is Level.MENTIONS  # a new user's default
    last = updates[-1].preferences
    assert (last.push, last.email) == (Level.ALL, Level.NONE)
    # For routers that know only the booleans:
    assert (last.push_enabled, last.email_enabled) == (True, False)


@pytest.mark.parametrize(
    ("level", "flag", "expected"),
    [
        ("all", False, "none"),
        ("all", True, "all"),  # on already: the level stays
        ("none", True, "mentions"),  # back on: the default
        ("mentions", True, "mentions"),
    ],
)
async def test_the_older_on_off_flag_maps_onto_the_level(
    client: httpx.AsyncClient, level: str, flag: bool, expected: str
) -> None:
    alice = await register(client, "alice")
    await put_preferences(client, alice.headers, {"push": level})

    response = await put_preferences(client, alice.headers, {"push_enabled": flag})

    assert response.json()["push"] == expected


async def test_room_settings_replace_the_defaults_in_that_room(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice = await register(client, "alice")
    room = await create_room(client, alice, [])
    until = datetime.now(UTC) + timedelta(hours=1)

    before = await client.get(f"/rooms/{room}/notifications", headers=alice.headers)
    response = await client.put(
        f"/rooms/{room}/notifications",
        json={"push": "all", "email": "default", "muted_until": until.isoformat()},
        headers=alice.headers,
    )
    after = await client.get(f"/rooms/{room}/notifications", headers=alice.headers)

    assert before.json() == {
        "room_id": str(room),
        "push": "default",
        "email": "default",
        "muted_until": None,
    }
    assert response.status_code == 200
    assert after.json() == response.json()
    assert (after.json()["push"], after.json()["email"]) == ("all", "default")
    assert datetime.fromisoformat(after.json()["muted_until"]) == until
    snapshot = (await user_updates(runtime, alice.id))[-1].preferences
    assert snapshot.rooms == [
        RoomSettingsSnapshot(room_id=room, push=Level.ALL, email=None, muted_until=until)
    ]
    assert snapshot.muted_room_ids == []  # a mute with an end is not the older, endless kind


async def test_a_mute_that_has_ended_is_no_mute(client: httpx.AsyncClient) -> None:
    alice = await register(client, "alice")
    room = await create_room(client, alice, [])

    response = await client.put(
        f"/rooms/{room}/notifications",
        json={"push": "default", "email": "default", "muted_until": "2020-01-01T00:00:00Z"},
        headers=alice.headers,
    )

    assert response.json()["muted_until"] is None


async def test_an_endless_mute_is_the_older_muted_room(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice = await register(client, "alice")
    room = await create_room(client, alice, [])

    await client.put(
        f"/rooms/{room}/notifications",
        json={"push": "default", "email": "default", "muted_until": FOREVER},
        headers=alice.headers,
    )
    preferences = (await client.get("/users/me/preferences", headers=alice.headers)).json()
    unmuted = await put_preferences(client, alice.headers, {"muted_room_ids": []})
    settings = await client.get(f"/rooms/{room}/notifications", headers=alice.headers)

    assert preferences["muted_room_ids"] == [str(room)]
    assert unmuted.json()["muted_room_ids"] == []
    assert settings.json()["muted_until"] is None
    snapshots = [u.preferences.muted_room_ids for u in await user_updates(runtime, alice.id)]
    assert snapshots == [[], [room], []]


async def test_only_members_see_or_set_a_rooms_settings(client: httpx.AsyncClient) -> None:
    alice = await register(client, "alice")
    bob = await register(client, "bob")
    room = await create_room(client, alice, [])
    body = {"push": "none", "email": "none", "muted_until": None}

    for path in (f"/rooms/{room}/notifications", f"/rooms/{uuid.uuid4()}/notifications"):
        assert (await client.get(path, headers=bob.headers)).status_code == 404
        assert (await client.put(path, json=body, headers=bob.headers)).status_code == 404


@pytest.mark.parametrize(
    "body",
    [
        {"push": "all", "email": "default"},  # muted_until must be said, even if null
        {"push": "loud", "email": "default", "muted_until": None},
        {"push": "all", "email": "default", "muted_until": "2030-01-01T00:00:00"},  # no offset
        {"push": "all", "email": "default", "muted_until": 1_900_000_000},  # a number
        {"push": "all", "email": "default", "muted_until": None, "snooze": True},
    ],
)
async def test_invalid_room_settings_are_422(
    client: httpx.AsyncClient, body: dict[str, Any]
) -> None:
    alice = await register(client, "alice")
    room = await create_room(client, alice, [])

    response = await client.put(f"/rooms/{room}/notifications", json=body, headers=alice.headers)

    assert response.status_code == 422


@pytest.mark.parametrize(
    ("sent", "stored"),
    [
        ("0001-01-01T00:00:00+01:00", None),  # a mute long over
        ("9999-12-31T23:59:59-01:00", "9999-12-31T23:59:59.999999Z"),
    ],
)
async def test_a_mute_beyond_the_years_utc_holds_is_kept_at_its_bound(
    client: httpx.AsyncClient, sent: str, stored: str | None
) -> None:
    """Valid RFC 3339 instants the schema allows, before year 1 or after 9999 once in UTC:
    stored as the first or last instant (the fuzzer found them refused, a 422)."""
    alice = await register(client, "alice")
    room = await create_room(client, alice, [])
    body = {"push": "all", "email": "default", "muted_until": sent}

    response = await client.put(f"/rooms/{room}/notifications", json=body, headers=alice.headers)
    read = await client.get(f"/rooms/{room}/notifications", headers=alice.headers)

    assert response.status_code == 200
    assert response.json()["muted_until"] == read.json()["muted_until"] == stored


async def test_a_room_wide_mention_is_flagged_on_the_message(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice = await register(client, "alice")
    bob = await register(client, "bob")
    room = await create_room(client, alice, [bob])

    for content in ("lunch?", "@room lunch?", "@bob lunch?"):
        response = await client.post(
            f"/rooms/{room}/messages", json={"content": content}, headers=alice.headers
        )
        assert response.status_code == 201

    events = await messages_created(runtime)
    assert [(e.room_mentioned, e.mentions) for e in events] == [
        (False, []),
        (True, []),
        (False, [bob.id]),
    ]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("@room", True),
        ("hey @ALL, lunch", True),
        ("@all!", True),
        ("a@room.example", False),  # an address, not a mention
        ("@roommate", False),
        ("@@room", False),
        ("room all", False),
    ],
)
def test_room_mentions(content: str, expected: bool) -> None:
    assert room_mentioned(content) is expected
