"""Posting and reading messages, and the MessageCreated each message stages in the outbox."""

from __future__ import annotations

import base64
import json
import logging
import uuid
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlmodel import select

from herald_shared.events import utc_now
from message_service import repository
from message_service.app import MessageService
from message_service.cursor import decode_cursor, encode_cursor
from message_service.models import Message
from tests.unit.message_service.helpers import (
    Account,
    create_room,
    messages_created,
    outbox_rows,
    register,
)

# A cursor whose instant has no time zone.
NAIVE_CURSOR = base64.urlsafe_b64encode(
    json.dumps(["2025-01-01T00:00:00", str(uuid.UUID(int=1))]).encode()
).decode()


async def post(
    client: httpx.AsyncClient,
    sender: Account,
    room: uuid.UUID,
    content: str,
    key: str | None = None,
) -> httpx.Response:
    headers = dict(sender.headers)
    if key is not None:
        headers["Idempotency-Key"] = key
    return await client.post(f"/rooms/{room}/messages", json={"content": content}, headers=headers)


async def test_a_message_is_stored_and_its_event_staged_for_every_other_member(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice = await register(client, "alice")
    bob = await register(client, "bob")
    carol = await register(client, "carol")
    room = await create_room(client, alice, [bob, carol], name="Team 🚀")

    response = await post(client, alice, room, "Hello everyone! 👋")

    assert response.status_code == 201
    body = response.json()
    assert set(body) == {"id", "room_id", "sender_id", "content", "created_at", "edited_at"}
    assert body["edited_at"] is None
    assert (body["room_id"], body["sender_id"]) == (str(room), str(alice.id))
    assert body["content"] == "Hello everyone! 👋"
    (event,) = await messages_created(runtime)
    assert str(event.message_id) == body["id"]
    assert (event.room_id, event.room_name, event.sender_id) == (room, "Team 🚀", alice.id)
    assert sorted(event.recipient_ids) == sorted([bob.id, carol.id])
    assert event.message_content == "Hello everyone! 👋"
    assert (event.sender_info.user_id, event.sender_info.username) == (alice.id, "alice")
    assert event.sender_info.display_name == "Alice"
    assert event.mentions == []
    assert event.timestamp.isoformat().replace("+00:00", "Z") == body["created_at"]
    assert event.occurred_at == event.timestamp


async def test_mentions_are_the_members_named_with_an_at(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice = await register(client, "alice")
    bob = await register(client, "bob")
    carol = await register(client, "carol")
    dave = await register(client, "dave")  # not in the room
    room = await create_room(client, alice, [bob, carol])

    await post(
        client,
        alice,
        room,
        "@Bob and (@carol), not carol@example.test nor @dave, @bobby or @alice",
    )

    (event,) = await messages_created(runtime)
    assert event.mentions == sorted([bob.id, carol.id], key=event.recipient_ids.index)
    assert dave.id not in event.recipient_ids


async def test_the_message_and_its_event_are_one_transaction(
    client: httpx.AsyncClient,
    runtime: MessageService,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    alice = await register(client, "alice")
    room = await create_room(client, alice, [])
    rows_before = len(await outbox_rows(runtime))

    def broken_outbox(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("disk full while writing secret text")

    monkeypatch.setattr(repository, "_outbox_values", broken_outbox)
    with caplog.at_level(logging.ERROR):
        response = await post(client, alice, room, "top secret words")

    assert response.status_code == 500
    assert response.json() == {"detail": "internal error"}
    async with runtime.sessions() as session:
        assert (await session.exec(select(Message))).all() == []
    assert len(await outbox_rows(runtime)) == rows_before
    assert "message_service.http.unhandled" in caplog.text
    assert "top secret" not in caplog.text
    assert "secret text" not in caplog.text


async def test_a_non_member_can_neither_post_nor_read(client: httpx.AsyncClient) -> None:
    alice = await register(client, "alice")
    mallory = await register(client, "mallory")
    room = await create_room(client, alice, [])

    posted = await post(client, mallory, room, "hi")
    listed = await client.get(f"/rooms/{room}/messages", headers=mallory.headers)

    assert posted.status_code == listed.status_code == 404
    assert (await client.get(f"/rooms/{room}/messages", headers=alice.headers)).json() == {
        "items": [],
        "next_cursor": None,
    }


@pytest.mark.parametrize(
    "body",
    [
        {"content": "x" * 4001},
        {"content": ""},
        {"content": " \n\t "},
        {"content": "nul\x00byte"},
        {"content": "bell\x07"},
        {},
        {"content": "hi", "sender_id": "00000000-0000-0000-0000-000000000001"},
        {"content": "hi", "recipient_ids": []},
    ],
)
async def test_invalid_messages_are_422(
    client: httpx.AsyncClient, runtime: MessageService, body: dict[str, Any]
) -> None:
    alice = await register(client, "alice")
    room = await create_room(client, alice, [])

    response = await client.post(f"/rooms/{room}/messages", json=body, headers=alice.headers)

    assert response.status_code == 422
    assert await messages_created(runtime) == []


async def test_the_longest_message_and_line_breaks_are_accepted(
    client: httpx.AsyncClient,
) -> None:
    alice = await register(client, "alice")
    room = await create_room(client, alice, [])

    longest = await post(client, alice, room, "é" * 4000)
    multiline = await post(client, alice, room, "line one\r\nline two\ttabbed")

    assert longest.status_code == multiline.status_code == 201


async def test_the_same_idempotency_key_returns_the_original_message(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice = await register(client, "alice")
    bob = await register(client, "bob")
    room = await create_room(client, alice, [bob])

    first = await post(client, alice, room, "once", key="client-msg-1")
    retried = await post(client, alice, room, "once", key="client-msg-1")
    other_sender = await post(client, bob, room, "once", key="client-msg-1")

    assert first.status_code == retried.status_code == 201
    assert retried.json() == first.json()
    assert retried.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert other_sender.json()["id"] != first.json()["id"]
    listed = (await client.get(f"/rooms/{room}/messages", headers=alice.headers)).json()
    assert len(listed["items"]) == 2
    assert len(await messages_created(runtime)) == 2


async def test_a_reused_idempotency_key_for_another_message_is_422(
    client: httpx.AsyncClient,
) -> None:
    alice = await register(client, "alice")
    room = await create_room(client, alice, [])
    other_room = await create_room(client, alice, [])
    await post(client, alice, room, "first", key="k")

    different_text = await post(client, alice, room, "second", key="k")
    different_room = await post(client, alice, other_room, "first", key="k")

    assert different_text.status_code == different_room.status_code == 422


@pytest.mark.parametrize("key", ["", "x" * 256, "has space", "tab\tkey"])
async def test_an_invalid_idempotency_key_is_422(client: httpx.AsyncClient, key: str) -> None:
    alice = await register(client, "alice")
    room = await create_room(client, alice, [])

    response = await post(client, alice, room, "hi", key=key)

    assert response.status_code == 422


async def test_a_lost_idempotency_race_answers_with_the_winner(
    client: httpx.AsyncClient, runtime: MessageService, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice = await register(client, "alice")
    room = await create_room(client, alice, [])
    winner = await post(client, alice, room, "hello", key="race")
    lookup = repository.message_by_key
    calls = 0

    async def miss_once(*args: Any, **kwargs: Any) -> Message | None:
        # The first lookup happens before the concurrent winner committed: it finds nothing.
        nonlocal calls
        calls += 1
        return None if calls == 1 else await lookup(*args, **kwargs)

    monkeypatch.setattr(repository, "message_by_key", miss_once)

    loser = await post(client, alice, room, "hello", key="race")

    assert loser.status_code == 201
    assert loser.json()["id"] == winner.json()["id"]
    assert len(await messages_created(runtime)) == 1


async def test_messages_are_paged_newest_first(client: httpx.AsyncClient) -> None:
    alice = await register(client, "alice")
    room = await create_room(client, alice, [])
    sent = [(await post(client, alice, room, f"m{i}")).json()["id"] for i in range(5)]

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

    assert pages == [sent[4:2:-1], sent[2:0:-1], sent[:1]]


async def test_same_instant_messages_are_paged_by_id(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice = await register(client, "alice")
    room = await create_room(client, alice, [])
    instant = utc_now()
    async with runtime.sessions() as session:
        stored = [
            Message(room_id=room, sender_id=alice.id, content=f"m{i}", created_at=instant)
            for i in range(3)
        ]
        session.add_all(stored)
        await session.commit()

    ids: list[str] = []
    cursor = None
    for _ in range(3):
        params: dict[str, Any] = {"limit": 1, **({"before": cursor} if cursor else {})}
        page = (
            await client.get(f"/rooms/{room}/messages", params=params, headers=alice.headers)
        ).json()
        ids += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]

    assert ids == sorted((str(m.id) for m in stored), key=uuid.UUID, reverse=True)
    assert cursor is None


async def test_the_page_size_is_capped_at_100(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice = await register(client, "alice")
    room = await create_room(client, alice, [])
    start = utc_now()
    async with runtime.sessions() as session:
        session.add_all(
            Message(
                room_id=room,
                sender_id=alice.id,
                content=f"m{i}",
                created_at=start + timedelta(milliseconds=i),
            )
            for i in range(105)
        )
        await session.commit()

    default = (await client.get(f"/rooms/{room}/messages", headers=alice.headers)).json()
    capped = (await client.get(f"/rooms/{room}/messages?limit=1000", headers=alice.headers)).json()
    rest = (
        await client.get(
            f"/rooms/{room}/messages",
            params={"limit": 1000, "before": capped["next_cursor"]},
            headers=alice.headers,
        )
    ).json()

    assert len(default["items"]) == 50
    assert len(capped["items"]) == 100
    assert [item["content"] for item in capped["items"][:2]] == ["m104", "m103"]
    assert len(rest["items"]) == 5
    assert rest["next_cursor"] is None


@pytest.mark.parametrize(
    "params",
    [
        {"limit": 0},
        {"limit": -1},
        {"limit": "many"},
        {"before": "not-a-cursor"},
        {"before": encode_cursor(utc_now(), uuid.uuid4())[:-4] + "!!!!"},
        {"before": "W10"},  # valid base64 of "[]"
        {"before": NAIVE_CURSOR},
        {"before": "x" * 201},
    ],
)
async def test_invalid_paging_is_422(client: httpx.AsyncClient, params: dict[str, Any]) -> None:
    alice = await register(client, "alice")
    room = await create_room(client, alice, [])

    response = await client.get(f"/rooms/{room}/messages", params=params, headers=alice.headers)

    assert response.status_code == 422


def test_cursors_round_trip() -> None:
    instant, message_id = utc_now(), uuid.uuid4()

    assert decode_cursor(encode_cursor(instant, message_id)) == (
        instant,
        message_id,
    )
