"""Rooms and membership; a non-member never learns that a room exists."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from herald_shared.events import EVENT_ADAPTER, RoomRead
from message_service.app import MessageService
from tests.unit.message_service.helpers import create_room, outbox_rows, register


async def test_the_creator_is_a_member_and_the_listed_users_are_invited(
    client: httpx.AsyncClient,
) -> None:
    alice = await register(client, "alice")
    bob = await register(client, "bob")

    response = await client.post(
        "/rooms",
        json={"name": "general", "member_ids": [str(bob.id), str(bob.id), str(alice.id)]},
        headers=alice.headers,
    )

    assert response.status_code == 201
    body = response.json()
    assert set(body) == {"id", "kind", "name", "member_ids", "created_at"}
    assert (body["kind"], body["name"]) == ("group", "general")
    assert body["member_ids"] == [str(alice.id)]
    # Bob is invited, not a member: he does not see the room until he joins.
    assert (await client.get(f"/rooms/{body['id']}", headers=bob.headers)).status_code == 404
    joined = await client.post(f"/rooms/{body['id']}/join", headers=bob.headers)
    fetched = await client.get(f"/rooms/{body['id']}", headers=bob.headers)
    assert joined.status_code == fetched.status_code == 200
    assert fetched.json()["member_ids"] == [str(alice.id), str(bob.id)]


async def test_unknown_members_are_422_with_the_reason(client: httpx.AsyncClient) -> None:
    alice = await register(client, "alice")
    ghost = uuid.uuid4()

    response = await client.post(
        "/rooms", json={"name": "r", "member_ids": [str(ghost)]}, headers=alice.headers
    )

    assert response.status_code == 422
    assert response.json() == {"detail": f"unknown user ids: {ghost}"}


async def test_member_lists_are_capped(client: httpx.AsyncClient) -> None:
    alice = await register(client, "alice")
    others = [str(uuid.uuid4()) for _ in range(1000)]

    too_long = await client.post(
        "/rooms",
        json={"name": "r", "member_ids": [*others, str(uuid.uuid4())]},
        headers=alice.headers,
    )
    with_creator = await client.post(
        "/rooms", json={"name": "r", "member_ids": others}, headers=alice.headers
    )

    assert too_long.status_code == 422
    assert with_creator.status_code == 422
    assert with_creator.json() == {"detail": "a room has at most 1000 members"}


@pytest.mark.parametrize(
    "body",
    [
        {"name": "x" * 101, "member_ids": []},
        {"name": "", "member_ids": []},
        {"name": "line\nbreak", "member_ids": []},
        {"name": "tab\there", "member_ids": []},
        {"member_ids": []},
        {"name": "r", "member_ids": ["not-a-uuid"]},
        {"name": "r", "member_ids": [], "created_by": "00000000-0000-0000-0000-000000000001"},
    ],
)
async def test_invalid_rooms_are_422(client: httpx.AsyncClient, body: dict[str, Any]) -> None:
    alice = await register(client, "alice")

    response = await client.post("/rooms", json=body, headers=alice.headers)

    assert response.status_code == 422


async def test_a_non_member_gets_404_exactly_as_for_a_missing_room(
    client: httpx.AsyncClient,
) -> None:
    alice = await register(client, "alice")
    mallory = await register(client, "mallory")
    room = await create_room(client, alice, [])

    hidden = await client.get(f"/rooms/{room}", headers=mallory.headers)
    missing = await client.get(f"/rooms/{uuid.uuid4()}", headers=mallory.headers)

    assert hidden.status_code == missing.status_code == 404
    assert hidden.json() == missing.json() == {"detail": "room not found"}


async def test_a_member_adds_a_user_once(client: httpx.AsyncClient) -> None:
    alice = await register(client, "alice")
    bob = await register(client, "bob")
    carol = await register(client, "carol")
    room = await create_room(client, alice, [bob])

    added = await client.post(
        f"/rooms/{room}/members", json={"user_id": str(carol.id)}, headers=bob.headers
    )
    again = await client.post(
        f"/rooms/{room}/members", json={"user_id": str(carol.id)}, headers=alice.headers
    )

    assert added.status_code == 201
    assert added.json()["member_ids"] == [str(alice.id), str(bob.id)]  # Carol is invited
    assert again.status_code == 200
    assert again.json()["member_ids"] == added.json()["member_ids"]
    assert (await client.get(f"/rooms/{room}", headers=carol.headers)).status_code == 404
    assert (await client.post(f"/rooms/{room}/join", headers=carol.headers)).status_code == 200
    assert (await client.get(f"/rooms/{room}", headers=carol.headers)).status_code == 200


async def test_only_members_add_members(client: httpx.AsyncClient) -> None:
    alice = await register(client, "alice")
    mallory = await register(client, "mallory")
    room = await create_room(client, alice, [])

    response = await client.post(
        f"/rooms/{room}/members", json={"user_id": str(mallory.id)}, headers=mallory.headers
    )

    assert response.status_code == 404
    assert (await client.get(f"/rooms/{room}", headers=mallory.headers)).status_code == 404


@pytest.mark.parametrize(
    "body",
    [{"user_id": str(uuid.uuid4())}, {"user_id": "nope"}, {}, {"user_id": None, "role": "x"}],
)
async def test_adding_an_unknown_or_invalid_user_is_422(
    client: httpx.AsyncClient, body: dict[str, Any]
) -> None:
    alice = await register(client, "alice")
    room = await create_room(client, alice, [])

    response = await client.post(f"/rooms/{room}/members", json=body, headers=alice.headers)

    assert response.status_code == 422


async def test_a_full_room_takes_no_one_else(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("message_service.service.MAX_ROOM_MEMBERS", 2)
    alice = await register(client, "alice")
    bob = await register(client, "bob")
    carol = await register(client, "carol")
    room = await create_room(client, alice, [bob])

    response = await client.post(
        f"/rooms/{room}/members", json={"user_id": str(carol.id)}, headers=alice.headers
    )

    assert response.status_code == 409


async def test_read_markers_move_forward_only_and_count_what_is_unread(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice = await register(client, "alice")
    bob = await register(client, "bob")
    room = await create_room(client, alice, [bob])
    other = await create_room(client, alice, [bob], name="other")
    ids = []
    for text in ("one", "two", "three"):
        posted = await client.post(
            f"/rooms/{room}/messages", json={"content": text}, headers=alice.headers
        )
        ids.append(posted.json()["id"])
    await client.post(f"/rooms/{room}/messages", json={"content": "mine"}, headers=bob.headers)
    elsewhere = await client.post(
        f"/rooms/{other}/messages", json={"content": "x"}, headers=alice.headers
    )

    before = await client.get("/rooms", headers=bob.headers)
    second = await client.put(f"/rooms/{room}/read", json={"up_to": ids[1]}, headers=bob.headers)
    behind = await client.put(f"/rooms/{room}/read", json={"up_to": ids[0]}, headers=bob.headers)
    wrong_room = await client.put(
        f"/rooms/{room}/read", json={"up_to": elsewhere.json()["id"]}, headers=bob.headers
    )
    not_mine = await client.put(
        f"/rooms/{room}/read",
        json={"up_to": ids[2]},
        headers=(await register(client, "eve")).headers,
    )

    unread = {row["id"]: row["unread"] for row in before.json()["rooms"]}
    assert unread == {str(room): 3, str(other): 1}  # Bob's own message is not unread
    assert second.status_code == behind.status_code == 200
    assert second.json() == {"room_id": str(room), "up_to": ids[1], "unread": 1}
    assert behind.json() == second.json()  # an older marker changes nothing
    assert wrong_room.status_code == 422  # the room is there, the message is not in it
    assert not_mine.status_code == 404
    reads = [
        event
        for event in (
            EVENT_ADAPTER.validate_json(row.payload) for row in await outbox_rows(runtime)
        )
        if isinstance(event, RoomRead)
    ]
    assert [(event.user_id, str(event.message_id)) for event in reads] == [(bob.id, ids[1])]
