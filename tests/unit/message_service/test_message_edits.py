"""Edits and deletes of a message, by its author only: the answer, what is listed and counted
unread afterwards, and the MessageEdited / MessageDeleted each stages in the outbox."""

from __future__ import annotations

import logging
import uuid
from datetime import datetime
from typing import Any

import httpx
import pytest
from sqlmodel import select

from herald_shared.events import EVENT_ADAPTER, MessageDeleted, MessageEdited
from message_service import repository
from message_service.app import MessageService
from message_service.models import Message
from tests.unit.message_service.helpers import Account, create_room, outbox_rows, register


async def post(
    client: httpx.AsyncClient, sender: Account, room: uuid.UUID, content: str, key: str = ""
) -> str:
    headers = {**sender.headers, **({"Idempotency-Key": key} if key else {})}
    response = await client.post(
        f"/rooms/{room}/messages", json={"content": content}, headers=headers
    )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def edit(
    client: httpx.AsyncClient, who: Account, room: uuid.UUID, message: str, content: str
) -> httpx.Response:
    return await client.patch(
        f"/rooms/{room}/messages/{message}", json={"content": content}, headers=who.headers
    )


async def delete(
    client: httpx.AsyncClient, who: Account, room: uuid.UUID, message: str
) -> httpx.Response:
    return await client.delete(f"/rooms/{room}/messages/{message}", headers=who.headers)


async def listed(client: httpx.AsyncClient, who: Account, room: uuid.UUID) -> list[dict[str, Any]]:
    response = await client.get(f"/rooms/{room}/messages", headers=who.headers)
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


async def changes(runtime: MessageService) -> list[MessageEdited | MessageDeleted]:
    events = [EVENT_ADAPTER.validate_json(row.payload) for row in await outbox_rows(runtime)]
    return [event for event in events if isinstance(event, MessageEdited | MessageDeleted)]


async def unread(client: httpx.AsyncClient, who: Account, room: uuid.UUID) -> int:
    rooms = (await client.get("/rooms", headers=who.headers)).json()["rooms"]
    counts = {row["id"]: row["unread"] for row in rooms}
    return int(counts[str(room)])


async def test_the_author_edits_a_message_and_the_new_text_is_staged(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice = await register(client, "alice")
    bob = await register(client, "bob")
    room = await create_room(client, alice, [bob])
    message = await post(client, alice, room, "helo @bob")

    response = await edit(client, alice, room, message, "hello @bob 👋")

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["content"] == "hello @bob 👋"
    assert (body["id"], body["room_id"], body["sender_id"]) == (message, str(room), str(alice.id))
    edited_at = datetime.fromisoformat(body["edited_at"])
    assert edited_at > datetime.fromisoformat(body["created_at"])
    # As the list shows it, to Bob too.
    assert await listed(client, bob, room) == [body]
    (event,) = await changes(runtime)
    assert isinstance(event, MessageEdited)
    assert (str(event.message_id), event.room_id, event.sender_id) == (message, room, alice.id)
    assert event.message_content == "hello @bob 👋"
    assert event.edited_at == event.occurred_at == edited_at


async def test_only_the_author_may_edit_or_delete(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice = await register(client, "alice")
    bob = await register(client, "bob")
    room = await create_room(client, alice, [bob])
    message = await post(client, alice, room, "mine")

    edited = await edit(client, bob, room, message, "yours now")
    deleted = await delete(client, bob, room, message)

    assert edited.status_code == deleted.status_code == 403
    assert (
        edited.json()
        == deleted.json()
        == {"detail": "only its author may edit or delete a message"}
    )
    assert [item["content"] for item in await listed(client, alice, room)] == ["mine"]
    assert await changes(runtime) == []


async def test_a_room_not_yours_or_a_message_not_in_the_room_is_404(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice = await register(client, "alice")
    mallory = await register(client, "mallory")
    room = await create_room(client, alice, [])
    other = await create_room(client, alice, [], name="other")
    message = await post(client, alice, room, "here")
    elsewhere = await post(client, alice, other, "there")

    answers = [
        await edit(client, mallory, room, message, "x"),
        await delete(client, mallory, room, message),
        # Alice is in both rooms: a message is reached through its own room only.
        await edit(client, alice, room, elsewhere, "x"),
        await delete(client, alice, room, elsewhere),
        await edit(client, alice, room, str(uuid.uuid4()), "x"),
        await delete(client, alice, uuid.uuid4(), message),
    ]

    assert [answer.status_code for answer in answers] == [404] * 6
    assert answers[0].json() == {"detail": "room not found"}  # nothing said of the message
    assert answers[2].json() == {"detail": "message not found"}
    assert [item["content"] for item in await listed(client, alice, other)] == ["there"]
    assert await changes(runtime) == []


async def test_the_same_text_again_changes_nothing_and_publishes_nothing(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice = await register(client, "alice")
    room = await create_room(client, alice, [])
    message = await post(client, alice, room, "as it was")
    rows = len(await outbox_rows(runtime))

    same = await edit(client, alice, room, message, "as it was")
    changed = await edit(client, alice, room, message, "as it is")
    again = await edit(client, alice, room, message, "as it is")

    assert same.status_code == changed.status_code == again.status_code == 200
    assert same.json()["edited_at"] is None
    assert again.json() == changed.json()  # edited_at stays that of the one real edit
    assert len(await outbox_rows(runtime)) == rows + 1
    (event,) = await changes(runtime)
    assert isinstance(event, MessageEdited)
    assert event.message_content == "as it is"


@pytest.mark.parametrize(
    "body",
    [
        {"content": "x" * 4001},
        {"content": ""},
        {"content": " \n\t "},
        {"content": "bell\x07"},
        {},
        {"content": "hi", "sender_id": "00000000-0000-0000-0000-000000000001"},
    ],
)
async def test_an_edit_follows_the_rules_of_a_post(
    client: httpx.AsyncClient, body: dict[str, Any]
) -> None:
    alice = await register(client, "alice")
    room = await create_room(client, alice, [])
    message = await post(client, alice, room, "hi")

    response = await client.patch(
        f"/rooms/{room}/messages/{message}", json=body, headers=alice.headers
    )

    assert response.status_code == 422
    assert "\x07" not in response.text
    longest = await edit(client, alice, room, message, "y" * 4000)
    assert longest.status_code == 200


async def test_a_deleted_message_is_gone_its_text_erased_and_its_deletion_staged(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice = await register(client, "alice")
    bob = await register(client, "bob")
    room = await create_room(client, alice, [bob])
    kept = await post(client, alice, room, "kept")
    secret = await post(client, alice, room, "a secret sent by mistake")
    assert await unread(client, bob, room) == 2

    response = await delete(client, alice, room, secret)

    assert response.status_code == 204
    assert response.content == b""
    assert [item["id"] for item in await listed(client, bob, room)] == [kept]
    assert await unread(client, bob, room) == 1
    async with runtime.sessions() as session:
        row = (await session.exec(select(Message).where(Message.id == uuid.UUID(secret)))).one()
    assert row.content == ""  # the row stays, its text does not
    assert row.deleted_at is not None
    (event,) = await changes(runtime)
    assert isinstance(event, MessageDeleted)
    assert (str(event.message_id), event.room_id, event.sender_id) == (secret, room, alice.id)
    assert event.deleted_at == event.occurred_at == row.deleted_at
    assert "secret" not in (await outbox_rows(runtime))[-1].payload
    # Gone for good: a second delete, an edit, and a read marker on it.
    again = await delete(client, alice, room, secret)
    edited = await edit(client, alice, room, secret, "back")
    marked = await client.put(f"/rooms/{room}/read", json={"up_to": secret}, headers=bob.headers)
    assert again.status_code == edited.status_code == 404
    assert again.json() == {"detail": "message not found"}
    assert marked.status_code == 422
    assert marked.json() == {"detail": "up_to names no message of this room"}
    assert len(await changes(runtime)) == 1


async def test_a_read_marker_on_a_message_deleted_since_still_counts_what_follows(
    client: httpx.AsyncClient,
) -> None:
    alice = await register(client, "alice")
    bob = await register(client, "bob")
    room = await create_room(client, alice, [bob])
    read = await post(client, alice, room, "read")
    marked = await client.put(f"/rooms/{room}/read", json={"up_to": read}, headers=bob.headers)
    assert marked.status_code == 200
    await post(client, alice, room, "after")

    assert (await delete(client, alice, room, read)).status_code == 204

    assert await unread(client, bob, room) == 1


async def test_pages_skip_deleted_messages_and_stay_whole(client: httpx.AsyncClient) -> None:
    alice = await register(client, "alice")
    room = await create_room(client, alice, [])
    sent = [await post(client, alice, room, f"m{index}") for index in range(9)]
    # The newest, the oldest, one at each page's edge, and two in a row.
    for index in (8, 6, 3, 2, 0):
        assert (await delete(client, alice, room, sent[index])).status_code == 204

    pages: list[list[str]] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"before": cursor} if cursor else {})}
        page = (
            await client.get(f"/rooms/{room}/messages", params=params, headers=alice.headers)
        ).json()
        pages.append([item["id"] for item in page["items"]])
        cursor = page["next_cursor"]
        if cursor is None:
            break

    assert pages == [[sent[7], sent[5]], [sent[4], sent[1]]]


async def test_the_idempotency_key_of_a_deleted_message_is_spent(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice = await register(client, "alice")
    room = await create_room(client, alice, [])
    message = await post(client, alice, room, "oops", key="client-1")
    assert (await delete(client, alice, room, message)).status_code == 204

    retried = await client.post(
        f"/rooms/{room}/messages",
        json={"content": "oops"},
        headers={**alice.headers, "Idempotency-Key": "client-1"},
    )

    assert retried.status_code == 409
    assert retried.json() == {"detail": "the message of this Idempotency-Key was deleted"}
    assert await listed(client, alice, room) == []


async def test_an_edit_and_its_event_are_one_transaction(
    client: httpx.AsyncClient,
    runtime: MessageService,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    alice = await register(client, "alice")
    room = await create_room(client, alice, [])
    message = await post(client, alice, room, "before")
    rows = len(await outbox_rows(runtime))

    def broken_outbox(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("disk full while writing secret text")

    monkeypatch.setattr(repository, "_outbox_values", broken_outbox)
    with caplog.at_level(logging.ERROR):
        edited = await edit(client, alice, room, message, "top secret words")
        deleted = await delete(client, alice, room, message)

    assert edited.status_code == deleted.status_code == 500
    monkeypatch.undo()
    assert [item["content"] for item in await listed(client, alice, room)] == ["before"]
    assert len(await outbox_rows(runtime)) == rows
    assert "top secret" not in caplog.text


async def test_the_routes_document_their_answers(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    item = document["paths"]["/rooms/{room_id}/messages/{message_id}"]

    for method in ("patch", "delete"):
        answers = item[method]["responses"]
        assert {"401", "403", "404", "422", "429"} <= set(answers), method
        assert answers["403"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorOut")
    assert "204" in item["delete"]["responses"]
    assert item["patch"]["responses"]["200"]["content"]["application/json"]["schema"][
        "$ref"
    ].endswith("/MessageOut")
    posting = document["paths"]["/rooms/{room_id}/messages"]["post"]["responses"]
    assert "409" in posting


async def test_a_retried_post_replays_its_message_also_once_edited(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice = await register(client, "alice")
    room = await create_room(client, alice, [])
    message = await post(client, alice, room, "first draft", key="client-2")
    assert (await edit(client, alice, room, message, "second thoughts")).status_code == 200

    def retry(content: str) -> Any:
        return client.post(
            f"/rooms/{room}/messages",
            json={"content": content},
            headers={**alice.headers, "Idempotency-Key": "client-2"},
        )

    # The client never saw the first answer and sends the same request again.
    replayed = await retry("first draft")
    other = await retry("something else")

    assert replayed.status_code == 201, replayed.text  # a replay answers as the first time
    assert (replayed.json()["id"], replayed.json()["content"]) == (message, "second thoughts")
    assert other.status_code == 422
    assert other.json() == {
        "detail": "this Idempotency-Key was already used for a different message"
    }
    assert [item["id"] for item in await listed(client, alice, room)] == [message]
