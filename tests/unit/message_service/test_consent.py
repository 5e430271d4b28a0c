"""Consent: someone put in a room by another is invited, hears nothing from it until they join,
and can decline or leave; a user can block another, whose messages then notify them no more and
who can no longer invite them."""

from __future__ import annotations

import uuid

import httpx

from herald_shared.events import EVENT_ADAPTER, RoomLeft
from message_service.app import MessageService
from tests.unit.message_service.helpers import (
    Account,
    invitations_created,
    messages_created,
    outbox_rows,
    register,
)


async def post(client: httpx.AsyncClient, room: str, author: Account, text: str) -> None:
    response = await client.post(
        f"/rooms/{room}/messages", json={"content": text}, headers=author.headers
    )
    assert response.status_code == 201, response.text


async def new_room(client: httpx.AsyncClient, owner: Account, *invited: Account) -> str:
    response = await client.post(
        "/rooms",
        json={"name": "general", "member_ids": [str(user.id) for user in invited]},
        headers=owner.headers,
    )
    assert response.status_code == 201, response.text
    room_id: str = response.json()["id"]
    return room_id


async def recipients_of_last(runtime: MessageService) -> list[uuid.UUID]:
    return (await messages_created(runtime))[-1].recipient_ids


async def test_the_invited_hear_nothing_until_they_join(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice = await register(client, "alice")
    bob = await register(client, "bob")
    room = await new_room(client, alice, bob)

    await post(client, room, alice, "before bob joins")
    reading = await client.get(f"/rooms/{room}/messages", headers=bob.headers)
    writing = await client.post(
        f"/rooms/{room}/messages", json={"content": "hi"}, headers=bob.headers
    )
    joined = await client.post(f"/rooms/{room}/join", headers=bob.headers)
    await post(client, room, alice, "after")

    events = await messages_created(runtime)
    assert [event.recipient_ids for event in events] == [[], [bob.id]]
    assert reading.status_code == writing.status_code == 404  # not a member yet
    assert joined.status_code == 200
    assert joined.json()["member_ids"] == [str(alice.id), str(bob.id)]


async def test_my_rooms_and_invitations_are_listed(client: httpx.AsyncClient) -> None:
    alice = await register(client, "alice")
    bob = await register(client, "bob")
    room = await new_room(client, alice, bob)

    before = (await client.get("/rooms", headers=bob.headers)).json()
    await client.post(f"/rooms/{room}/join", headers=bob.headers)
    after = (await client.get("/rooms", headers=bob.headers)).json()
    outsider = await client.get("/rooms", headers=(await register(client, "eve")).headers)

    assert before["rooms"] == []
    assert [(i["room_id"], i["name"], i["invited_by"]) for i in before["invitations"]] == [
        (room, "general", str(alice.id))
    ]
    assert after == {
        "rooms": [{"id": room, "kind": "group", "name": "general", "unread": 0}],
        "invitations": [],
    }
    assert outsider.json() == {"rooms": [], "invitations": []}


async def test_declining_or_leaving_ends_everything_from_the_room(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice = await register(client, "alice")
    bob = await register(client, "bob")
    carol = await register(client, "carol")
    room = await new_room(client, alice, bob, carol)
    await client.post(f"/rooms/{room}/join", headers=bob.headers)

    declined = await client.post(f"/rooms/{room}/leave", headers=carol.headers)
    left = await client.post(f"/rooms/{room}/leave", headers=bob.headers)
    again = await client.post(f"/rooms/{room}/leave", headers=bob.headers)
    await post(client, room, alice, "anyone?")

    assert declined.status_code == left.status_code == 204
    assert again.status_code == 404
    assert await recipients_of_last(runtime) == []
    assert (await client.post(f"/rooms/{room}/join", headers=carol.headers)).status_code == 404
    # The router is told, once per leave, to cancel what waits and recall what was shown.
    events = [EVENT_ADAPTER.validate_json(row.payload) for row in await outbox_rows(runtime)]
    left_events = [event for event in events if isinstance(event, RoomLeft)]
    assert [(event.user_id, str(event.room_id)) for event in left_events] == [
        (carol.id, room),
        (bob.id, room),
    ]


async def test_a_direct_room_cannot_be_left(client: httpx.AsyncClient) -> None:
    alice = await register(client, "alice")
    bob = await register(client, "bob")
    direct = await client.post(
        "/rooms", json={"kind": "direct", "member_ids": [str(bob.id)]}, headers=alice.headers
    )

    response = await client.post(f"/rooms/{direct.json()['id']}/leave", headers=bob.headers)

    assert response.status_code == 422


async def test_a_blocked_user_neither_notifies_nor_invites(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice = await register(client, "alice")
    bob = await register(client, "bob")
    mallory = await register(client, "mallory")
    room = await new_room(client, alice, bob, mallory)
    for user in (bob, mallory):
        await client.post(f"/rooms/{room}/join", headers=user.headers)
    direct = await client.post(
        "/rooms", json={"kind": "direct", "member_ids": [str(bob.id)]}, headers=mallory.headers
    )

    blocked = await client.put(f"/users/me/blocked/{mallory.id}", headers=bob.headers)
    await post(client, room, mallory, "@bob hey @room")
    in_room = await recipients_of_last(runtime)
    await post(client, direct.json()["id"], mallory, "psst")
    in_direct = await recipients_of_last(runtime)
    invited = await client.post(
        "/rooms", json={"name": "trap", "member_ids": [str(bob.id)]}, headers=mallory.headers
    )
    await post(client, room, alice, "hello")  # others still reach Bob

    assert blocked.status_code == 204
    assert in_room == [alice.id]
    assert in_direct == []
    assert invited.status_code == 201  # Mallory is not told that Bob blocked her
    assert (await client.get("/rooms", headers=bob.headers)).json()["invitations"] == []
    assert await recipients_of_last(runtime) == [bob.id, mallory.id]
    listed = await client.get("/users/me/blocked", headers=bob.headers)
    assert listed.json() == {"user_ids": [str(mallory.id)]}


async def test_unblocking_restores_notifications(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice = await register(client, "alice")
    bob = await register(client, "bob")
    direct = await client.post(
        "/rooms", json={"kind": "direct", "member_ids": [str(bob.id)]}, headers=alice.headers
    )
    room = direct.json()["id"]

    await client.put(f"/users/me/blocked/{alice.id}", headers=bob.headers)
    again = await client.put(f"/users/me/blocked/{alice.id}", headers=bob.headers)
    await post(client, room, alice, "one")
    unblocked = await client.delete(f"/users/me/blocked/{alice.id}", headers=bob.headers)
    await post(client, room, alice, "two")

    assert again.status_code == unblocked.status_code == 204
    assert [event.recipient_ids for event in await messages_created(runtime)] == [[], [bob.id]]


async def test_blocking_oneself_or_nobody_is_refused(client: httpx.AsyncClient) -> None:
    alice = await register(client, "alice")

    myself = await client.put(f"/users/me/blocked/{alice.id}", headers=alice.headers)
    nobody = await client.put(f"/users/me/blocked/{uuid.uuid4()}", headers=alice.headers)

    assert myself.status_code == 422
    assert nobody.status_code == 404


async def test_each_invitation_stages_one_notification_for_its_invitee_only(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice = await register(client, "alice")
    bob = await register(client, "bob")
    carol = await register(client, "carol")
    mallory = await register(client, "mallory")
    await client.put(f"/users/me/blocked/{alice.id}", headers=mallory.headers)
    room = await new_room(client, alice, bob, mallory)  # Mallory blocked Alice: not invited

    added = await client.post(
        f"/rooms/{room}/members", json={"user_id": str(carol.id)}, headers=alice.headers
    )
    again = await client.post(
        f"/rooms/{room}/members", json={"user_id": str(carol.id)}, headers=alice.headers
    )
    await client.post(f"/rooms/{room}/join", headers=bob.headers)
    await post(client, room, alice, "hello")

    invitations = await invitations_created(runtime)
    assert added.status_code == 201
    assert again.status_code == 200
    assert [event.invitee_id for event in invitations] == [bob.id, carol.id]
    assert {event.room_id for event in invitations} == {uuid.UUID(room)}
    assert {event.room_name for event in invitations} == {"general"}
    assert {(event.inviter.user_id, event.inviter.display_name) for event in invitations} == {
        (alice.id, "Alice")
    }
    assert len({event.invitation_id for event in invitations}) == 2
