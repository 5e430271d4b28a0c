"""The real-time stream's hub on the zero-setup database (SQLite): each stream gets the events of
its user only (a message's edits and deletes: the room's members), in order, each once; a
stream resumed from a `Last-Event-ID` gets what it missed and then the live ones, nothing twice;
a client too far behind is cut off, to resume."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from herald_shared.events import (
    Channel,
    InboxDelivery,
    InboxItem,
    InboxItemsUpdated,
    InboxState,
    PresenceChanged,
    Trigger,
    utc_now,
)
from herald_shared.topology import EXCHANGE, INBOX_UPDATED
from message_service import repository
from message_service import stream as stream_module
from message_service.app import MessageService
from message_service.repository import StreamPosition
from message_service.stream import (
    HEARTBEAT,
    InvalidPosition,
    Stream,
    StreamEvent,
    StreamHub,
    StreamMetrics,
    format_position,
    parse_position,
)
from tests.support.infra import wait_until
from tests.unit.message_service.helpers import (
    Account,
    client_for,
    create_room,
    register,
    sign_in,
)


class Published:
    def __init__(self) -> None:
        self.events: list[PresenceChanged] = []

    async def __call__(self, event: PresenceChanged) -> None:
        self.events.append(event)


@asynccontextmanager
async def started_hub(
    runtime: MessageService, *, heartbeat: float
) -> AsyncIterator[tuple[StreamHub, Published]]:
    published = Published()
    hub = StreamHub(
        engine=runtime.engine,
        publish_presence=published,
        metrics=StreamMetrics(CollectorRegistry()),
        poll_interval=0.01,
        heartbeat=heartbeat,
        presence_ttl=45,
        batch_size=3,  # small: the tail and the catch-up both need several reads
    )
    hub.start()
    try:
        yield hub, published
    finally:
        await hub.stop()


@pytest.fixture
async def hub(runtime: MessageService) -> AsyncIterator[tuple[StreamHub, Published]]:
    async with started_hub(runtime, heartbeat=0.05) as started:
        yield started


async def next_event(stream: Stream, timeout: float = 5.0) -> tuple[str, str, dict[str, str]]:
    """(id, event name, data) of the stream's next event, heartbeats skipped."""
    async with asyncio.timeout(timeout):
        while True:
            frame = await stream.frames.get()
            assert frame is not None, "the stream ended"
            if frame == HEARTBEAT:
                continue
            fields = dict(line.split(": ", 1) for line in frame.decode().strip().splitlines())
            return fields["id"], fields["event"], json.loads(fields["data"])


def queued(stream: Stream) -> list[bytes | None]:
    """What waits in the stream now, heartbeats aside."""
    waiting = []
    while not stream.frames.empty():
        frame = stream.frames.get_nowait()
        if frame != HEARTBEAT:
            waiting.append(frame)
    return waiting


async def post(runtime: MessageService, room: uuid.UUID, author: Account, text: str) -> str:
    async with client_for(runtime.app) as client:
        response = await client.post(
            f"/rooms/{room}/messages", json={"content": text}, headers=author.headers
        )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def test_each_stream_gets_its_users_events_in_order_once(
    runtime: MessageService, hub: tuple[StreamHub, Published]
) -> None:
    streams, published = hub
    async with client_for(runtime.app) as client:
        alice = await register(client, "alice")
        bob = await register(client, "bob")
        eve = await register(client, "eve")
        room = await create_room(client, alice, [bob])
    bobs = await streams.open(bob.id, after=None, active_room_id=room)
    eves = await streams.open(eve.id, after=None, active_room_id=None)

    sent = [await post(runtime, room, alice, f"hello {index}") for index in range(7)]
    received = [await next_event(bobs) for _ in sent]

    assert [data["id"] for _, _, data in received] == sent
    assert {name for _, name, _ in received} == {"message"}
    assert received[0][2]["content"] == "hello 0"
    assert received[0][2]["room_id"] == str(room)
    ids = [parse_position(event_id) for event_id, _, _ in received]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert queued(eves) == []
    # Each stream said it is open, Bob's with the room in view.
    opened = [event for event in published.events if event.rooms]
    assert {(event.rooms[0].user_id, event.rooms[0].room_id) for event in opened} == {
        (bob.id, room),
        (eve.id, None),
    }


async def test_a_resumed_stream_gets_what_it_missed_then_the_live_ones_nothing_twice(
    runtime: MessageService, hub: tuple[StreamHub, Published]
) -> None:
    streams, _ = hub
    async with client_for(runtime.app) as client:
        alice = await register(client, "alice")
        bob = await register(client, "bob")
        room = await create_room(client, alice, [bob])
    first = await streams.open(bob.id, after=None, active_room_id=None)
    before = [await post(runtime, room, alice, f"seen {index}") for index in range(2)]
    seen = [await next_event(first) for _ in before]
    streams.close(first)
    missed = [await post(runtime, room, alice, f"missed {index}") for index in range(5)]

    resumed = await streams.open(bob.id, after=parse_position(seen[-1][0]), active_room_id=None)
    live = await post(runtime, room, alice, "live")
    received = [await next_event(resumed) for _ in range(6)]

    assert [data["id"] for _, _, data in received] == [*missed, live]
    assert queued(resumed) == []  # no repeat of what was seen or caught up


async def test_a_stream_too_far_behind_is_caught_up_no_further_than_it_may_queue(
    runtime: MessageService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Catching up from an old id queued every missed frame before the first byte went out; now
    it stops where a live stream would be ended, and the client resumes from there. (Heartbeats
    an hour apart: queued too, they would count towards the four.)"""
    monkeypatch.setattr(stream_module, "MAX_QUEUED_FRAMES", 4)
    async with client_for(runtime.app) as client:
        alice = await register(client, "alice")
        bob = await register(client, "bob")
        room = await create_room(client, alice, [bob])
    async with started_hub(runtime, heartbeat=3600) as (streams, _):
        first = await streams.open(bob.id, after=None, active_room_id=None)
        await post(runtime, room, alice, "seen")
        seen, _, _ = await next_event(first)
        streams.close(first)
        missed = [await post(runtime, room, alice, f"missed {index}") for index in range(7)]

        behind = await streams.open(bob.id, after=parse_position(seen), active_room_id=None)
        got = [await next_event(behind) for _ in range(4)]
        assert await behind.frames.get() is None  # ended there
        after = parse_position(got[-1][0])
        rest = await streams.open(bob.id, after=after, active_room_id=None)
        later = [await next_event(rest) for _ in range(3)]

    assert [data["id"] for _, _, data in got + later] == missed


async def test_streams_opened_together_on_an_idle_replica_lose_nothing(
    runtime: MessageService, hub: tuple[StreamHub, Published], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bob's stream asks for the newest position slowly; meanwhile Alice's stream opened, the
    tail started from her answer and a message for her was committed. Bob's later answer moved
    the tail past that message, which no stream ever got."""
    streams, _ = hub
    async with client_for(runtime.app) as client:
        alice = await register(client, "alice")
        bob = await register(client, "bob")
        carol = await register(client, "carol")
        room = await create_room(client, carol, [alice])
    real_head, real_rows = repository.stream_head, repository.stream_rows
    bobs_answer, tail_reads = asyncio.Event(), asyncio.Event()
    tail_reads.set()
    tail_parked = asyncio.Event()
    asked = 0

    async def head(engine: Any) -> StreamPosition:
        nonlocal asked
        asked += 1
        if asked == 2:  # Bob's
            await bobs_answer.wait()
        position: StreamPosition = await real_head(engine)
        return position

    async def rows(engine: Any, **kwargs: Any) -> Any:
        if not tail_reads.is_set():
            tail_parked.set()
            await tail_reads.wait()
            return []  # this read ran just before the message's commit
        return await real_rows(engine, **kwargs)

    monkeypatch.setattr(repository, "stream_head", head)
    monkeypatch.setattr(repository, "stream_rows", rows)
    opening_alice = asyncio.create_task(streams.open(alice.id, after=None, active_room_id=None))
    opening_bob = asyncio.create_task(streams.open(bob.id, after=None, active_room_id=None))
    alices = await opening_alice
    tail_reads.clear()
    await asyncio.wait_for(tail_parked.wait(), timeout=5)
    message = await post(runtime, room, carol, "for alice")
    bobs_answer.set()
    await opening_bob
    tail_reads.set()

    _, _, data = await next_event(alices)

    assert data["id"] == message


async def test_the_invitee_is_told_of_the_invitation(
    runtime: MessageService, hub: tuple[StreamHub, Published]
) -> None:
    streams, _ = hub
    async with client_for(runtime.app) as client:
        alice = await register(client, "alice")
        bob = await register(client, "bob")
        bobs = await streams.open(bob.id, after=None, active_room_id=None)
        response = await client.post(
            "/rooms", json={"name": "general", "member_ids": [str(bob.id)]}, headers=alice.headers
        )
    assert response.status_code == 201

    _, name, data = await next_event(bobs)

    assert name == "invitation"
    assert data["room_id"] == response.json()["id"]
    assert (data["name"], data["invited_by"]) == ("general", str(alice.id))


async def test_closing_a_stream_says_the_connection_ended(
    runtime: MessageService, hub: tuple[StreamHub, Published]
) -> None:
    streams, published = hub
    async with client_for(runtime.app) as client:
        bob = await register(client, "bob")
    stream = await streams.open(bob.id, after=None, active_room_id=None)

    streams.close(stream)
    streams.close(stream)  # twice: said once

    async def ended() -> list[PresenceChanged]:
        return [
            event
            for event in published.events
            if event.connections and event.connections[0].expires_at == event.connections[0].at
        ]

    await wait_until(ended, timeout=5, interval=0.01)
    (goodbye,) = await ended()
    assert goodbye.connections[0].connection_id == stream.id
    assert streams.open_streams == 0


async def test_a_stream_ends_once_its_session_is_signed_out(
    runtime: MessageService, hub: tuple[StreamHub, Published]
) -> None:
    streams, _ = hub
    async with client_for(runtime.app) as client:
        bob = await register(client, "bob")
        laptop = await sign_in(client, "bob")
        phone_stream = await streams.open(
            bob.id, after=None, active_room_id=None, session_id=bob.session_id
        )
        laptop_stream = await streams.open(
            bob.id, after=None, active_room_id=None, session_id=laptop.session_id
        )
        async with asyncio.timeout(5):
            assert await phone_stream.frames.get() == HEARTBEAT  # a heartbeat while signed in

        signed_out = await client.delete("/sessions/current", headers=bob.headers)

    assert signed_out.status_code == 204

    async def phone_ended() -> bool:
        return phone_stream.ended

    await wait_until(phone_ended, timeout=5, interval=0.01)
    frames = []
    while not phone_stream.frames.empty():
        frames.append(phone_stream.frames.get_nowait())
    assert frames[-1] is None  # the end, after what was queued
    async with asyncio.timeout(5):
        assert await laptop_stream.frames.get() == HEARTBEAT
    assert not laptop_stream.ended


async def test_heartbeats_reach_the_stream_and_renew_its_presence(
    runtime: MessageService, hub: tuple[StreamHub, Published]
) -> None:
    streams, published = hub
    async with client_for(runtime.app) as client:
        bob = await register(client, "bob")
    stream = await streams.open(bob.id, after=None, active_room_id=None)

    async with asyncio.timeout(5):
        assert await stream.frames.get() == HEARTBEAT

    async def renewed() -> bool:
        return any(
            [entry.connection_id for entry in event.connections] == [stream.id]
            and not event.rooms
            and event.connections[0].expires_at > event.connections[0].at
            for event in published.events
        )

    await wait_until(renewed, timeout=5, interval=0.01)


def test_a_client_too_far_behind_is_cut_off() -> None:
    stream = Stream(user_id=uuid.uuid4(), last=StreamPosition(0, 0))
    events = [
        StreamEvent(StreamPosition(1, seq), "message", frozenset({stream.user_id}), "{}")
        for seq in range(1, stream_module.MAX_QUEUED_FRAMES + 2)
    ]

    kept = [stream.offer(event) for event in events]

    assert kept[:-1] == [True] * stream_module.MAX_QUEUED_FRAMES
    assert kept[-1] is False


def test_an_event_older_than_what_the_stream_has_is_not_sent_again() -> None:
    stream = Stream(user_id=uuid.uuid4(), last=StreamPosition(5, 2))
    old = StreamEvent(StreamPosition(5, 2), "message", frozenset({stream.user_id}), "{}")
    new = StreamEvent(StreamPosition(6, 1), "message", frozenset({stream.user_id}), "{}")

    stream.offer(old)
    stream.offer(new)

    assert stream.frames.qsize() == 1
    assert stream.last == new.position


@pytest.mark.parametrize(
    "text",
    [
        "",
        "12",
        "12-",
        "-3",
        "a-1",
        "1-b",
        "1-2-3",
        "9" * 41,
        # Not ASCII digits: `str.isdigit()` takes all three, `int()` the last only.
        "1-\xb2",
        "\xb9-1",
        "1-\u0661",
        # Past PostgreSQL's bigint.
        f"{2**63}-1",
        f"1-{2**63}",
        "1-99999999999999999999999999",
    ],
)
def test_a_last_event_id_not_of_this_stream_is_refused(text: str) -> None:
    with pytest.raises(InvalidPosition):
        parse_position(text)


@pytest.mark.parametrize("position", [StreamPosition(123456789, 42), StreamPosition(0, 0)])
def test_event_ids_round_trip(position: StreamPosition) -> None:
    assert parse_position(format_position(position)) == position


def test_the_largest_event_id_is_taken() -> None:
    assert parse_position(f"{2**63 - 1}-{2**63 - 1}") == StreamPosition(2**63 - 1, 2**63 - 1)


async def test_the_stream_refuses_a_foreign_last_event_id_and_a_room_not_yours(
    client: httpx.AsyncClient,
) -> None:
    alice = await register(client, "alice")
    bob = await register(client, "bob")
    room = await create_room(client, alice, [])

    foreign = await client.get(
        "/users/me/events", headers={**bob.headers, "Last-Event-ID": "not-an-id"}
    )
    not_yours = await client.get(
        "/users/me/events", params={"active_room_id": str(room)}, headers=bob.headers
    )
    anonymous = await client.get("/users/me/events")
    moved = await client.put(
        "/users/me/presence", json={"active_room_id": str(room)}, headers=bob.headers
    )

    assert foreign.status_code == 422
    assert "Last-Event-ID" in foreign.json()["detail"]
    assert not_yours.status_code == moved.status_code == 404
    assert anonymous.status_code == 401


@pytest.mark.parametrize("last_event_id", ["1-\xb2", "1-99999999999999999999999999"])
async def test_a_last_event_id_no_database_could_take_is_422(
    client: httpx.AsyncClient, last_event_id: str
) -> None:
    bob = await register(client, "bob")
    # Sent and read as latin-1 ("²" is the byte 0xb2).
    headers = httpx.Headers({**bob.headers, "Last-Event-ID": last_event_id}, encoding="latin-1")

    response = await client.get("/users/me/events", headers=headers)

    assert response.status_code == 422
    assert "Last-Event-ID" in response.json()["detail"]


async def test_a_read_marker_reaches_the_users_other_devices_only(
    runtime: MessageService, hub: tuple[StreamHub, Published]
) -> None:
    streams, _ = hub
    async with client_for(runtime.app) as client:
        alice = await register(client, "alice")
        bob = await register(client, "bob")
        room = await create_room(client, alice, [bob])
        bobs = await streams.open(bob.id, after=None, active_room_id=None)
        alices = await streams.open(alice.id, after=None, active_room_id=None)
        message = await post(runtime, room, alice, "hello")
        marked = await client.put(
            f"/rooms/{room}/read", json={"up_to": message}, headers=bob.headers
        )
    assert marked.status_code == 200

    names = [(await next_event(bobs))[1:] for _ in range(2)]
    _, alice_saw, _ = await next_event(alices)

    read = {"room_id": str(room), "up_to": message, "unread": {"total": 0, "rooms": {str(room): 0}}}
    assert names == [("message", names[0][1]), ("read", read)]
    assert alice_saw == "message"
    assert queued(alices) == []  # Bob's marker is his own


async def test_edits_and_deletes_reach_the_rooms_members_only(
    runtime: MessageService, hub: tuple[StreamHub, Published]
) -> None:
    streams, _ = hub
    async with client_for(runtime.app) as client:
        alice = await register(client, "alice")
        bob = await register(client, "bob")
        carol = await register(client, "carol")  # a member who blocked Alice
        dave = await register(client, "dave")  # a member who leaves before the edit
        eve = await register(client, "eve")  # not in the room
        room = await create_room(client, alice, [bob, carol, dave])
        assert (await client.put(f"/users/me/blocked/{alice.id}", headers=carol.headers)).is_success
        opened = {
            account.username: await streams.open(account.id, after=None, active_room_id=None)
            for account in (alice, bob, carol, dave, eve)
        }
        message = await post(runtime, room, alice, "helo")
        _, dave_saw, _ = await next_event(opened["dave"])
        assert (await client.post(f"/rooms/{room}/leave", headers=dave.headers)).is_success
        edited = await client.patch(
            f"/rooms/{room}/messages/{message}", json={"content": "hello"}, headers=alice.headers
        )
        deleted = await client.delete(f"/rooms/{room}/messages/{message}", headers=alice.headers)
    assert (edited.status_code, deleted.status_code) == (200, 204)

    bob_saw = [await next_event(opened["bob"]) for _ in range(3)]
    alice_saw = [(await next_event(opened["alice"]))[1:] for _ in range(3)]

    assert [(name, data) for _, name, data in bob_saw] == [
        (
            "message",
            {
                "id": message,
                "room_id": str(room),
                "sender_id": str(alice.id),
                "content": "helo",
                "created_at": bob_saw[0][2]["created_at"],
                "edited_at": None,
            },
        ),
        (
            "message_edited",
            {
                "id": message,
                "room_id": str(room),
                "content": "hello",
                "edited_at": bob_saw[1][2]["edited_at"],
            },
        ),
        ("message_deleted", {"id": message, "room_id": str(room)}),
    ]
    assert datetime.fromisoformat(bob_saw[1][2]["edited_at"]) == datetime.fromisoformat(
        edited.json()["edited_at"]
    )
    assert alice_saw == [(name, data) for _, name, data in bob_saw]  # her other devices
    assert dave_saw == "message"
    assert queued(opened["dave"]) == []  # he left: nothing more of the room
    assert queued(opened["carol"]) == []  # as for the message itself
    assert queued(opened["eve"]) == []


async def test_a_resumed_stream_gets_the_edits_and_deletes_it_missed(
    runtime: MessageService, hub: tuple[StreamHub, Published]
) -> None:
    streams, _ = hub
    async with client_for(runtime.app) as client:
        alice = await register(client, "alice")
        bob = await register(client, "bob")
        room = await create_room(client, alice, [bob])
        first = await streams.open(bob.id, after=None, active_room_id=None)
        messages = [await post(runtime, room, alice, f"m{index}") for index in range(2)]
        seen = [await next_event(first) for _ in messages]
        streams.close(first)
        for message in messages:
            await client.patch(
                f"/rooms/{room}/messages/{message}",
                json={"content": "edited"},
                headers=alice.headers,
            )
        await client.delete(f"/rooms/{room}/messages/{messages[0]}", headers=alice.headers)

    resumed = await streams.open(bob.id, after=parse_position(seen[-1][0]), active_room_id=None)
    received = [(await next_event(resumed))[1:] for _ in range(3)]

    assert [(name, data["id"]) for name, data in received] == [
        ("message_edited", messages[0]),
        ("message_edited", messages[1]),
        ("message_deleted", messages[0]),
    ]
    assert queued(resumed) == []


async def test_an_inbox_item_that_changes_reaches_its_users_stream_once_per_version(
    runtime: MessageService, hub: tuple[StreamHub, Published]
) -> None:
    streams, _ = hub
    async with client_for(runtime.app) as client:
        alice = await register(client, "alice")
        bob = await register(client, "bob")
        room = await create_room(client, alice, [bob])
    bobs = await streams.open(bob.id, after=None, active_room_id=None)
    alices = await streams.open(alice.id, after=None, active_room_id=None)
    message = uuid.UUID(await post(runtime, room, alice, "hello"))
    assert (await next_event(bobs))[1] == "message"
    assert (await next_event(alices))[1] == "message"
    now = utc_now()

    def item(state: InboxState) -> InboxItem:
        delivery = InboxDelivery(channel=Channel.PUSH, state=state, decided_at=now)
        return InboxItem(
            user_id=bob.id,
            message_id=message,
            room_id=room,
            trigger=Trigger.MESSAGE,
            decided_at=now,
            message_created_at=now,
            deliveries=[delivery],
        )

    for version, state in ((1, InboxState.PENDING), (1, InboxState.PENDING), (2, InboxState.SENT)):
        event = InboxItemsUpdated(version=version, items=[item(state)])
        await runtime.broker.publish(event, exchange=EXCHANGE, routing_key=INBOX_UPDATED)

    received: list[tuple[str, str, Any]] = [await next_event(bobs) for _ in range(2)]
    assert [name for _, name, _ in received] == ["notifications", "notifications"]
    states = [data["items"][0]["deliveries"][0]["state"] for _, _, data in received]
    assert states == ["pending", "sent"]  # the replayed version changed nothing: not streamed
    assert received[0][2]["items"][0]["message_id"] == str(message)
    # With Bob's unread messages as the stream read the row: Alice's one message, in total and
    # in its room (the app's badge and the room's count).
    assert received[1][2]["unread"] == {"total": 1, "rooms": {str(room): 1}}
    # The tail handed those rows to every stream at once: Alice's got nothing of them.
    assert queued(alices) == []
    # Items of two users changed together: each stream gets its own user's part only.
    alices_item = item(InboxState.SENT).model_copy(update={"user_id": alice.id})
    both = InboxItemsUpdated(version=3, items=[item(InboxState.RECALLED), alices_item])
    await runtime.broker.publish(both, exchange=EXCHANGE, routing_key=INBOX_UPDATED)
    _, _, bobs_part = await next_event(bobs)
    _, _, alices_part = await next_event(alices)
    bob_data: Any = bobs_part
    alice_data: Any = alices_part
    assert [i["deliveries"][0]["state"] for i in bob_data["items"]] == ["recalled"]
    assert [i["deliveries"][0]["state"] for i in alice_data["items"]] == ["sent"]
