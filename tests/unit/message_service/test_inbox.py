"""The notification inbox: the `inbox_updates` projection (the highest version of an item wins),
and `GET /users/me/notifications[/{message_id}]` (one user's items only, newest first, keyset
pages, unread only, the preview as the user's setting says, a deleted message left out, an
invitation read once answered)."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

import httpx

from herald_shared.events import (
    Channel,
    InboxDelivery,
    InboxItem,
    InboxItemsUpdated,
    InboxState,
    RoomRead,
    Trigger,
    utc_now,
)
from herald_shared.topology import EXCHANGE, INBOX_UPDATED
from message_service.app import MessageService
from tests.unit.message_service.helpers import (
    Account,
    create_room,
    inbox,
    invitation_for,
    invite,
    outbox_rows,
    read_by_id,
    register,
)


async def project(runtime: MessageService, version: int, *items: InboxItem) -> None:
    event = InboxItemsUpdated(version=version, items=list(items))
    await runtime.broker.publish(event, exchange=EXCHANGE, routing_key=INBOX_UPDATED)


def item_for(
    account: Account,
    message: dict[str, str],
    *,
    state: InboxState = InboxState.SENT,
    reason: str | None = None,
    trigger: Trigger = Trigger.MESSAGE,
) -> InboxItem:
    now = utc_now()
    return InboxItem(
        user_id=account.id,
        message_id=uuid.UUID(message["id"]),
        room_id=uuid.UUID(message["room_id"]),
        trigger=trigger,
        decided_at=now,
        message_created_at=datetime.fromisoformat(message["created_at"]),
        deliveries=[
            InboxDelivery(
                channel=Channel.PUSH,
                device_id=uuid.uuid4(),
                state=state,
                reason=reason,
                decided_at=now,
                accepted_at=now + timedelta(milliseconds=40) if state is InboxState.SENT else None,
            ),
            InboxDelivery(
                channel=Channel.EMAIL,
                state=InboxState.SUPPRESSED,
                reason="level:mentions",
                decided_at=now,
            ),
        ],
    )


async def post(
    client: httpx.AsyncClient, author: Account, room_id: uuid.UUID, text: str
) -> dict[str, str]:
    response = await client.post(
        f"/rooms/{room_id}/messages", json={"content": text}, headers=author.headers
    )
    assert response.status_code == 201, response.text
    message: dict[str, str] = response.json()
    return message


async def test_an_item_shows_who_what_why_and_each_channels_state(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice, bob = await register(client, "alice"), await register(client, "bob")
    room = await create_room(client, alice, [bob], name="design")
    message = await post(client, alice, room, "the mockups are ready")

    await project(runtime, 1, item_for(bob, message, trigger=Trigger.MENTION))

    page = await inbox(client, bob)
    [item] = page["items"]
    assert item["message_id"] == message["id"]
    assert item["room_name"] == "design"
    assert item["sender"] == {"id": str(alice.id), "username": "alice", "display_name": "Alice"}
    assert item["preview"] == "the mockups are ready"
    assert item["trigger"] == "mention"
    assert item["read"] is False
    push, email = item["deliveries"]
    assert (push["channel"], push["state"], push["accepted_at"] is not None) == (
        "push",
        "sent",
        True,
    )
    assert (email["channel"], email["state"], email["reason"]) == (
        "email",
        "suppressed",
        "level:mentions",
    )
    assert page["next_cursor"] is None
    # Alice was told nothing of her own message; Bob's item is not hers.
    assert (await inbox(client, alice))["items"] == []
    mine = await client.get(f"/users/me/notifications/{message['id']}", headers=bob.headers)
    theirs = await client.get(f"/users/me/notifications/{message['id']}", headers=alice.headers)
    assert (mine.status_code, theirs.status_code) == (200, 404)
    assert mine.json() == item


async def test_an_older_or_replayed_version_never_overwrites_a_newer_one(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice, bob = await register(client, "alice"), await register(client, "bob")
    room = await create_room(client, alice, [bob])
    message = await post(client, alice, room, "hi")

    await project(runtime, 5, item_for(bob, message, state=InboxState.SENT))
    await project(runtime, 3, item_for(bob, message, state=InboxState.PENDING))  # late
    await project(runtime, 5, item_for(bob, message, state=InboxState.FAILED))  # same version

    [item] = (await inbox(client, bob))["items"]
    assert item["deliveries"][0]["state"] == "sent"
    await project(runtime, 6, item_for(bob, message, state=InboxState.RECALLED))
    [item] = (await inbox(client, bob))["items"]
    assert item["deliveries"][0]["state"] == "recalled"


async def test_pages_go_newest_first_and_unread_only_leaves_out_what_was_read(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice, bob = await register(client, "alice"), await register(client, "bob")
    room = await create_room(client, alice, [bob])
    messages = [await post(client, alice, room, f"message {n}") for n in range(5)]
    await project(runtime, 1, *(item_for(bob, message) for message in messages))
    read = await client.put(
        f"/rooms/{room}/read", json={"up_to": messages[1]["id"]}, headers=bob.headers
    )
    assert read.status_code == 200, read.text

    first = await inbox(client, bob, limit="2")
    second = await inbox(client, bob, limit="2", cursor=str(first["next_cursor"]))
    third = await inbox(client, bob, limit="2", cursor=str(second["next_cursor"]))
    listed = [item for page in (first, second, third) for item in page["items"]]
    assert [item["message_id"] for item in listed] == [m["id"] for m in reversed(messages)]
    assert [item["read"] for item in listed] == [False, False, False, True, True]
    assert third["next_cursor"] is None
    unread = await inbox(client, bob, unread_only="true")
    assert [item["message_id"] for item in unread["items"]] == [
        m["id"] for m in reversed(messages[2:])
    ]


async def test_no_preview_when_the_user_turned_previews_off_and_a_deleted_message_leaves(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice, bob = await register(client, "alice"), await register(client, "bob")
    room = await create_room(client, alice, [bob])
    kept, deleted = (
        await post(client, alice, room, "secret plan"),
        await post(client, alice, room, "oops"),
    )
    await project(runtime, 1, item_for(bob, kept), item_for(bob, deleted))
    off = await client.put(
        "/users/me/preferences", json={"push_preview": False}, headers=bob.headers
    )
    assert off.status_code == 200, off.text
    gone = await client.delete(f"/rooms/{room}/messages/{deleted['id']}", headers=alice.headers)
    assert gone.status_code == 204, gone.text

    [item] = (await inbox(client, bob))["items"]
    assert (item["message_id"], item["preview"]) == (kept["id"], None)
    missing = await client.get(f"/users/me/notifications/{deleted['id']}", headers=bob.headers)
    assert missing.status_code == 404


async def test_no_preview_once_the_user_is_no_longer_a_member_of_the_room(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    """The item stays, but not the text: an edit made after Bob left is the room's, not his."""
    alice, bob = await register(client, "alice"), await register(client, "bob")
    room = await create_room(client, alice, [bob])
    message = await post(client, alice, room, "before bob left")
    await project(runtime, 1, item_for(bob, message))
    [item] = (await inbox(client, bob))["items"]
    assert item["preview"] == "before bob left"

    left = await client.post(f"/rooms/{room}/leave", headers=bob.headers)
    assert left.status_code == 204, left.text
    edited = await client.patch(
        f"/rooms/{room}/messages/{message['id']}",
        json={"content": "the plan, now that bob left"},
        headers=alice.headers,
    )
    assert edited.status_code == 200, edited.text

    [item] = (await inbox(client, bob))["items"]
    one = await client.get(f"/users/me/notifications/{message['id']}", headers=bob.headers)
    assert (item["message_id"], item["preview"]) == (message["id"], None)
    assert one.status_code == 200
    assert one.json()["preview"] is None


async def test_the_inbox_needs_a_token_and_refuses_a_cursor_it_did_not_hand_out(
    client: httpx.AsyncClient,
) -> None:
    bob = await register(client, "bob")
    assert (await client.get("/users/me/notifications")).status_code == 401
    bad = await client.get(
        "/users/me/notifications", params={"cursor": "yesterday"}, headers=bob.headers
    )
    assert bad.status_code == 422


async def room_reads(runtime: MessageService) -> list[RoomRead]:
    return [
        RoomRead.model_validate_json(row.payload)
        for row in await outbox_rows(runtime)
        if row.event_type == "room_read"
    ]


async def test_marking_items_read_moves_each_rooms_marker_to_the_newest_of_them_once(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice, bob = await register(client, "alice"), await register(client, "bob")
    general = await create_room(client, alice, [bob], name="general")
    design = await create_room(client, alice, [bob], name="design")
    in_general = [await post(client, alice, general, f"general {n}") for n in range(3)]
    in_design = [await post(client, alice, design, f"design {n}") for n in range(2)]
    await project(runtime, 1, *(item_for(bob, m) for m in in_general + in_design))

    read = await client.post(
        "/users/me/notifications/read",
        json={"ids": [in_general[0]["id"], in_general[1]["id"], in_design[0]["id"]]},
        headers=bob.headers,
    )

    assert read.status_code == 200, read.text
    assert {(room["room_id"], room["up_to"], room["unread"]) for room in read.json()["rooms"]} == {
        (str(design), in_design[0]["id"], 1),
        (str(general), in_general[1]["id"], 1),
    }
    assert {(event.room_id, str(event.message_id)) for event in await room_reads(runtime)} == {
        (general, in_general[1]["id"]),
        (design, in_design[0]["id"]),
    }
    unread = await inbox(client, bob, unread_only="true")
    assert [item["message_id"] for item in unread["items"]] == [
        in_design[1]["id"],
        in_general[2]["id"],
    ]
    # The same again, or an older one: markers only move forward, nothing more is staged.
    again = await client.post(
        "/users/me/notifications/read", json={"ids": [in_general[0]["id"]]}, headers=bob.headers
    )
    assert again.json() == {"rooms": []}
    assert len(await room_reads(runtime)) == 2


async def test_marking_all_read_reads_every_room_to_its_newest_message(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice, bob, eve = [await register(client, name) for name in ("alice", "bob", "eve")]
    rooms = [await create_room(client, alice, [bob], name=f"room {n}") for n in range(3)]
    newest = {room: [await post(client, alice, room, "hi") for _ in range(2)][-1] for room in rooms}
    elsewhere = await create_room(client, alice, [eve], name="not bob's")
    await post(client, alice, elsewhere, "hi")

    read = await client.post(
        "/users/me/notifications/read", json={"all": True}, headers=bob.headers
    )

    assert read.status_code == 200, read.text
    assert {(room["room_id"], room["up_to"], room["unread"]) for room in read.json()["rooms"]} == {
        (str(room), newest[room]["id"], 0) for room in rooms
    }
    assert {event.room_id for event in await room_reads(runtime)} == set(rooms)


async def test_ids_of_someone_elses_inbox_move_nothing_and_a_body_must_say_what(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice, bob, eve = [await register(client, name) for name in ("alice", "bob", "eve")]
    room = await create_room(client, alice, [bob, eve])
    message = await post(client, alice, room, "hi")
    await project(runtime, 1, item_for(bob, message))

    eves = await client.post(
        "/users/me/notifications/read", json={"ids": [message["id"]]}, headers=eve.headers
    )
    assert (eves.status_code, eves.json()) == (200, {"rooms": []})
    bodies: list[dict[str, Any]] = [
        {},
        {"ids": []},
        {"all": False},
        {"ids": [message["id"]], "all": True},
    ]
    for body in bodies:
        refused = await client.post("/users/me/notifications/read", json=body, headers=bob.headers)
        assert refused.status_code == 422, body
    assert await room_reads(runtime) == []


async def test_retention_deletes_the_items_of_old_messages_only(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice, bob = await register(client, "alice"), await register(client, "bob")
    room = await create_room(client, alice, [bob])
    old, new = await post(client, alice, room, "old"), await post(client, alice, room, "new")
    aged = dict(old, created_at=(utc_now() - timedelta(days=91)).isoformat())
    await project(runtime, 1, item_for(bob, aged), item_for(bob, new))

    assert await runtime.retention.prune_once() == {"inbox_items": 1}

    items = (await inbox(client, bob))["items"]
    assert [item["message_id"] for item in items] == [new["id"]]


async def test_an_invitation_stays_unread_until_answered_by_joining(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice, bob = await register(client, "alice"), await register(client, "bob")
    room = await invite(client, alice, bob)
    invitation = invitation_for(bob, room)
    await project(runtime, 1, invitation)
    assert read_by_id(await inbox(client, bob)) == {str(invitation.message_id): False}
    assert len((await inbox(client, bob, unread_only="true"))["items"]) == 1

    joined = await client.post(f"/rooms/{room}/join", headers=bob.headers)
    assert joined.status_code == 200, joined.text

    assert read_by_id(await inbox(client, bob)) == {str(invitation.message_id): True}
    assert (await inbox(client, bob, unread_only="true"))["items"] == []


async def test_a_declined_invitation_is_read_and_a_new_one_to_the_same_room_is_not(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice, bob = await register(client, "alice"), await register(client, "bob")
    room = await invite(client, alice, bob)
    first = invitation_for(bob, room)
    await project(runtime, 1, first)
    declined = await client.post(f"/rooms/{room}/leave", headers=bob.headers)
    assert declined.status_code == 204, declined.text
    assert read_by_id(await inbox(client, bob)) == {str(first.message_id): True}

    again = await client.post(
        f"/rooms/{room}/members", json={"user_id": str(bob.id)}, headers=alice.headers
    )
    assert again.status_code == 201, again.text
    second = invitation_for(bob, room)
    await project(runtime, 2, second)

    assert read_by_id(await inbox(client, bob)) == {
        str(first.message_id): True,
        str(second.message_id): False,
    }
