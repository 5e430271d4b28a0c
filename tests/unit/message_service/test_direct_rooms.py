"""Direct rooms: one per pair of users, opened by either of them, unnamed, two members only;
their messages reach the router as direct."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import pytest

from herald_shared.events import RoomKind
from message_service.app import MessageService
from tests.unit.message_service.helpers import Account, messages_created, register


async def open_direct(client: httpx.AsyncClient, me: Account, other: uuid.UUID) -> httpx.Response:
    return await client.post(
        "/rooms", json={"kind": "direct", "member_ids": [str(other)]}, headers=me.headers
    )


async def test_a_pair_has_one_direct_room_whoever_opens_it(client: httpx.AsyncClient) -> None:
    alice = await register(client, "alice")
    bob = await register(client, "bob")

    first = await open_direct(client, alice, bob.id)
    again = await open_direct(client, alice, bob.id)
    from_bob = await open_direct(client, bob, alice.id)

    assert first.status_code == 201
    assert again.status_code == from_bob.status_code == 200
    assert first.json() == again.json() == from_bob.json()
    body = first.json()
    assert (body["kind"], body["name"]) == ("direct", "")
    assert sorted(body["member_ids"]) == sorted([str(alice.id), str(bob.id)])


async def test_two_opening_at_once_get_the_same_room(client: httpx.AsyncClient) -> None:
    alice = await register(client, "alice")
    bob = await register(client, "bob")

    answers = await asyncio.gather(
        open_direct(client, alice, bob.id), open_direct(client, bob, alice.id)
    )

    assert sorted(answer.status_code for answer in answers) == [200, 201]
    assert answers[0].json()["id"] == answers[1].json()["id"]


async def test_each_pair_has_its_own(client: httpx.AsyncClient) -> None:
    alice = await register(client, "alice")
    bob = await register(client, "bob")
    carol = await register(client, "carol")

    with_bob = (await open_direct(client, alice, bob.id)).json()["id"]
    with_carol = (await open_direct(client, alice, carol.id)).json()["id"]
    bob_carol = (await open_direct(client, bob, carol.id)).json()["id"]

    assert len({with_bob, with_carol, bob_carol}) == 3
    assert (await client.get(f"/rooms/{with_bob}", headers=carol.headers)).status_code == 404


@pytest.mark.parametrize(
    "body",
    [
        {"kind": "direct", "member_ids": []},
        {"kind": "direct", "member_ids": [str(uuid.uuid4()), str(uuid.uuid4())]},
        {"kind": "direct", "name": "us", "member_ids": [str(uuid.uuid4())]},
        {"kind": "direct", "member_ids": [str(uuid.uuid4())]},  # no such user
        {"kind": "channel", "name": "x", "member_ids": []},
        {"kind": "group", "member_ids": []},  # a group room needs a name
    ],
)
async def test_invalid_direct_rooms_are_422(
    client: httpx.AsyncClient, body: dict[str, Any]
) -> None:
    alice = await register(client, "alice")

    response = await client.post("/rooms", json=body, headers=alice.headers)

    assert response.status_code == 422


async def test_a_direct_room_with_oneself_is_422(client: httpx.AsyncClient) -> None:
    alice = await register(client, "alice")

    response = await open_direct(client, alice, alice.id)

    assert response.status_code == 422
    assert "another user" in response.json()["detail"]


async def test_no_one_is_added_to_a_direct_room(client: httpx.AsyncClient) -> None:
    alice = await register(client, "alice")
    bob = await register(client, "bob")
    carol = await register(client, "carol")
    room = (await open_direct(client, alice, bob.id)).json()["id"]

    response = await client.post(
        f"/rooms/{room}/members", json={"user_id": str(carol.id)}, headers=alice.headers
    )

    assert response.status_code == 422
    assert (await client.get(f"/rooms/{room}", headers=carol.headers)).status_code == 404


async def test_a_direct_message_reaches_the_router_as_direct(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice = await register(client, "alice")
    bob = await register(client, "bob")
    room = (await open_direct(client, alice, bob.id)).json()["id"]

    posted = await client.post(
        f"/rooms/{room}/messages", json={"content": "got a minute?"}, headers=alice.headers
    )

    assert posted.status_code == 201
    (event,) = await messages_created(runtime)
    assert (event.room_kind, event.room_name, event.recipient_ids) == (
        RoomKind.DIRECT,
        "",
        [bob.id],
    )
