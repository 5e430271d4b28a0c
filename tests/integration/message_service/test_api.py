"""The API on PostgreSQL with a real broker: every endpoint once, keyset paging on real
timestamps (deleted messages skipped), and a DeviceInvalidated that arrives over RabbitMQ."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

import aio_pika
import httpx
import pytest
from fastapi import FastAPI

from herald_shared.events import DeviceInvalidated, InboxItem, InboxItemsUpdated, Trigger, utc_now
from herald_shared.topology import DEVICE_INVALIDATED, EXCHANGE, RECIPIENT_UPDATES
from message_service import repository
from message_service.app import create_app, service_of
from tests.integration.message_service.helpers import drain, nothing_pending, settings_for
from tests.support.infra import wait_until
from tests.unit.message_service.helpers import (
    PASSWORD,
    client_for,
    create_room,
    inbox,
    invitation_for,
    invite,
    read_by_id,
    register,
    sign_in,
)


@pytest.fixture
async def app(pg_url: str, rabbit_url: str) -> AsyncIterator[FastAPI]:
    app = create_app(settings_for(pg_url, rabbit_url))
    async with app.router.lifespan_context(app):
        yield app


async def test_every_endpoint_on_postgres(app: FastAPI) -> None:
    async with client_for(app) as client:
        alice = await register(client, "alice")
        bob = await register(client, "bob")
        carol = await register(client, "carol")

        me = await client.patch("/users/me", json={"display_name": "Al"}, headers=alice.headers)
        assert me.json()["display_name"] == "Al"
        assert (await client.get("/users/me", headers=alice.headers)).json()["email"] == (
            "alice@example.test"
        )

        alice_phone = await sign_in(client, "alice")
        device = await client.post(
            "/users/me/devices",
            json={"platform": "fcm", "token": "phone"},
            headers=alice_phone.headers,
        )
        moved = await client.post(
            "/users/me/devices", json={"platform": "fcm", "token": "phone"}, headers=bob.headers
        )
        assert (device.status_code, moved.status_code) == (201, 201)
        # The phone's session of Alice ended with the move; her first one goes on.
        assert (await client.get("/users/me", headers=alice_phone.headers)).status_code == 401
        assert (await client.get("/users/me/devices", headers=alice.headers)).json() == []
        laptop = await sign_in(client, "alice")
        sessions = (await client.get("/users/me/sessions", headers=laptop.headers)).json()
        assert [s["current"] for s in sessions] == [False, True]
        rotated = await client.post("/sessions/current/rotate", headers=laptop.headers)
        assert rotated.json()["id"] == str(laptop.session_id)
        ended = await client.delete(
            f"/users/me/sessions/{laptop.session_id}", headers=alice.headers
        )
        assert ended.status_code == 204
        password = await client.put(
            "/users/me/password",
            json={"current_password": PASSWORD, "new_password": "new passphrase"},
            headers=alice.headers,
        )
        assert password.status_code == 204
        deleted = await client.delete(
            f"/users/me/devices/{moved.json()['id']}", headers=bob.headers
        )
        assert deleted.status_code == 204

        room = await create_room(client, alice, [bob])
        added = await client.post(
            f"/rooms/{room}/members", json={"user_id": str(carol.id)}, headers=bob.headers
        )
        assert added.status_code == 201
        assert (await client.get(f"/rooms/{room}", headers=carol.headers)).status_code == 404
        invitations = (await client.get("/rooms", headers=carol.headers)).json()["invitations"]
        assert [invitation["room_id"] for invitation in invitations] == [str(room)]
        assert (await client.post(f"/rooms/{room}/join", headers=carol.headers)).status_code == 200
        assert (await client.get(f"/rooms/{room}", headers=carol.headers)).status_code == 200
        blocked = await client.put(f"/users/me/blocked/{alice.id}", headers=carol.headers)
        assert blocked.status_code == 204

        preferences = {
            "push_enabled": False,
            "email_enabled": True,
            "push_preview": False,
            "muted_room_ids": [str(room)],
            "quiet_hours": {"start": "22:00", "end": "07:00", "time_zone": "Europe/Paris"},
            "breakthrough_user_ids": [str(bob.id)],
        }
        put = await client.put("/users/me/preferences", json=preferences, headers=carol.headers)
        expected = {
            **preferences,
            "push": "none",
            "email": "mentions",
            "email_delay": 120,
            "snoozed_until": None,
        }
        assert put.json() == expected
        assert (await client.get("/users/me/preferences", headers=carol.headers)).json() == (
            expected
        )
        # Do Not Disturb, its instant through timestamptz.
        until = (utc_now() + timedelta(hours=1)).replace(microsecond=0)
        snoozed = await client.put(
            "/users/me/snooze", json={"until": until.isoformat()}, headers=carol.headers
        )
        assert datetime.fromisoformat(snoozed.json()["snoozed_until"]) == until
        read = (await client.get("/users/me/preferences", headers=carol.headers)).json()
        assert read == {**expected, "snoozed_until": snoozed.json()["snoozed_until"]}
        # Levels, a room's own and a timed mute, on PostgreSQL too.
        levels = await client.put(
            "/users/me/preferences", json={"push": "all"}, headers=carol.headers
        )
        assert (levels.json()["push"], levels.json()["muted_room_ids"]) == ("all", [str(room)])
        muted = {"push": "mentions", "email": "default", "muted_until": "2100-01-01T00:00:00Z"}
        room_settings = await client.put(
            f"/rooms/{room}/notifications", json=muted, headers=carol.headers
        )
        assert room_settings.json() == {
            "room_id": str(room),
            "push": "mentions",
            "email": "default",
            "muted_until": "2100-01-01T00:00:00Z",
        }

        sent = []
        for i in range(7):
            posted = await client.post(
                f"/rooms/{room}/messages", json={"content": f"m{i}"}, headers=alice.headers
            )
            sent.append(posted.json()["id"])
        seen: list[str] = []
        cursor = None
        while True:
            params: dict[str, Any] = {"limit": 3, **({"before": cursor} if cursor else {})}
            page = (
                await client.get(f"/rooms/{room}/messages", params=params, headers=bob.headers)
            ).json()
            seen += [item["id"] for item in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == sent[::-1]

        # Edits and deletes, by the author only; a deleted message leaves the pages and the
        # unread count, and its edit or delete streams to the members Alice's messages reach.
        message = f"/rooms/{room}/messages/{sent[3]}"
        edited = await client.patch(message, json={"content": "m3!"}, headers=alice.headers)
        assert edited.status_code == 200
        assert datetime.fromisoformat(edited.json()["edited_at"]) > datetime.fromisoformat(
            edited.json()["created_at"]
        )
        assert (
            await client.patch(message, json={"content": "x"}, headers=bob.headers)
        ).status_code == 403
        unread_before = (await client.get("/rooms", headers=bob.headers)).json()["rooms"][0][
            "unread"
        ]
        gone = f"/rooms/{room}/messages/{sent[5]}"
        assert (await client.delete(gone, headers=alice.headers)).status_code == 204
        assert (await client.delete(gone, headers=alice.headers)).status_code == 404
        page = (
            await client.get(f"/rooms/{room}/messages", params={"limit": 3}, headers=bob.headers)
        ).json()
        assert [item["id"] for item in page["items"]] == [sent[6], sent[4], sent[3]]
        assert page["items"][2]["content"] == "m3!"
        after = (await client.get("/rooms", headers=bob.headers)).json()["rooms"][0]["unread"]
        assert after == unread_before - 1
        audiences = await repository.room_audiences(
            service_of(app).engine, authors=[(room, alice.id)]
        )
        assert audiences == {(room, alice.id): frozenset({alice.id, bob.id})}  # Carol blocked her

        outsider = await register(client, "mallory")
        assert (await client.get(f"/rooms/{room}", headers=outsider.headers)).status_code == 404


async def test_a_device_invalidated_over_rabbitmq_is_removed_and_republished(
    app: FastAPI, rabbit_url: str
) -> None:
    runtime = service_of(app)
    async with client_for(app) as client:
        alice = await register(client, "alice")
        device = await client.post(
            "/users/me/devices", json={"platform": "fcm", "token": "dead"}, headers=alice.headers
        )
        device_id = uuid.UUID(device.json()["id"])
        await wait_until(lambda: nothing_pending(runtime), timeout=10)
        await drain(rabbit_url, RECIPIENT_UPDATES.name)

        event = DeviceInvalidated(user_id=alice.id, device_id=device_id, reason="UNREGISTERED")
        connection = await aio_pika.connect(rabbit_url)
        async with connection:
            channel = await connection.channel()
            exchange = await channel.get_exchange(EXCHANGE.name)
            for _ in range(2):  # a redelivery is a no-op
                await exchange.publish(
                    aio_pika.Message(
                        event.model_dump_json().encode(),
                        content_type="application/json",
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    ),
                    routing_key=DEVICE_INVALIDATED,
                )

        async def gone() -> bool:
            listed = await client.get("/users/me/devices", headers=alice.headers)
            return not listed.json()

        await wait_until(gone, timeout=10)

        async def republished() -> list[dict[str, Any]]:
            if not await nothing_pending(runtime):
                return []
            return [json.loads(m.body) for m in await drain(rabbit_url, RECIPIENT_UPDATES.name)]

        (snapshot,) = await wait_until(republished, timeout=10)
    assert (snapshot["user_id"], snapshot["version"], snapshot["devices"]) == (
        str(alice.id),
        3,
        [],
    )


async def test_concurrent_opens_of_a_pair_make_one_direct_room(app: FastAPI) -> None:
    """Many clients of a pair opening their direct room at the same moment get one room: the
    unique key decides, the losers read the winner's."""
    async with client_for(app) as client:
        alice = await register(client, "alice")
        bob = await register(client, "bob")

        async def open_as(me_index: int) -> tuple[int, str]:
            me, other = (alice, bob) if me_index % 2 == 0 else (bob, alice)
            response = await client.post(
                "/rooms",
                json={"kind": "direct", "member_ids": [str(other.id)]},
                headers=me.headers,
            )
            return response.status_code, response.json()["id"]

        answers = await asyncio.gather(*(open_as(index) for index in range(12)))

    assert sorted(status for status, _ in answers) == [200] * 11 + [201]
    assert len({room_id for _, room_id in answers}) == 1


async def test_an_invitation_is_unread_until_answered_and_a_new_one_waits_again(
    app: FastAPI,
) -> None:
    """The invitation's "read" condition on PostgreSQL (the unit tests run it on SQLite)."""
    runtime = service_of(app)

    async def project(version: int, item: InboxItem) -> None:
        async with runtime.sessions() as session:
            await repository.apply_inbox_items(
                session, InboxItemsUpdated(version=version, items=[item])
            )
            await session.commit()

    async with client_for(app) as client:
        alice, bob = await register(client, "alice"), await register(client, "bob")
        room = await invite(client, alice, bob)
        first = invitation_for(bob, room)
        await project(1, first)
        unread = await inbox(client, bob, unread_only="true")
        assert read_by_id(unread) == {str(first.message_id): False}

        declined = await client.post(f"/rooms/{room}/leave", headers=bob.headers)
        assert declined.status_code == 204, declined.text
        again = await client.post(
            f"/rooms/{room}/members", json={"user_id": str(bob.id)}, headers=alice.headers
        )
        assert again.status_code == 201, again.text
        second = invitation_for(bob, room)
        await project(2, second)
        assert read_by_id(await inbox(client, bob)) == {
            str(first.message_id): True,
            str(second.message_id): False,
        }

        joined = await client.post(f"/rooms/{room}/join", headers=bob.headers)
        assert joined.status_code == 200, joined.text
        assert (await inbox(client, bob, unread_only="true"))["items"] == []


async def test_inbox_items_upsert_on_postgres_keeps_the_newest_version(app: FastAPI) -> None:
    """The upsert's PostgreSQL form (one array per column): every new item, and each item only
    over an older version of it, its changed keys returned."""
    runtime = service_of(app)

    async def project(version: int, items: list[InboxItem]) -> int:
        async with runtime.sessions() as session:
            changed = await repository.apply_inbox_items(
                session, InboxItemsUpdated(version=version, items=items)
            )
            await session.commit()
        return changed

    async with client_for(app) as client:
        alice, bob = await register(client, "alice"), await register(client, "bob")
        rooms = [await invite(client, alice, bob) for _ in range(3)]
        newer = [invitation_for(bob, room) for room in rooms]
        older = [item.model_copy(update={"trigger": Trigger.DIRECT}) for item in newer]

        assert await project(5, newer) == 3
        assert await project(4, older[:2]) == 0  # older: nothing changes
        assert await project(5, newer[2:]) == 0  # a replay: nothing changes
        assert await project(6, older[2:]) == 1  # newer: it changes

        page = await inbox(client, bob)
        triggers = {item["message_id"]: item["trigger"] for item in page["items"]}
        assert triggers == {
            str(newer[0].message_id): "invitation",
            str(newer[1].message_id): "invitation",
            str(newer[2].message_id): "dm",
        }


async def test_inbox_items_of_a_deleted_account_are_dropped_on_postgres(app: FastAPI) -> None:
    """The deleted-account filter's PostgreSQL form (the user ids as one array): of one event,
    the deleted user's items are dropped and the other user's kept."""
    runtime = service_of(app)
    async with client_for(app) as client:
        alice, bob = await register(client, "alice"), await register(client, "bob")
        carol = await register(client, "carol")
        rooms = [await invite(client, alice, user) for user in (bob, carol, bob)]
        items = [
            invitation_for(user, room) for user, room in zip((bob, carol, bob), rooms, strict=True)
        ]
        assert (await client.delete("/users/me", headers=carol.headers)).status_code == 204

        async with runtime.sessions() as session:
            changed = await repository.apply_inbox_items(
                session, InboxItemsUpdated(version=1, items=items)
            )
            await session.commit()

        assert changed == 2
        assert read_by_id(await inbox(client, bob)) == {
            str(items[0].message_id): False,
            str(items[2].message_id): False,
        }


async def test_what_postgresql_cannot_take_is_422_not_500(app: FastAPI) -> None:
    """asyncpg refuses a NUL in text, and a bound number past bigint: each was a 500 here."""
    async with client_for(app) as client:
        alice = await register(client, "alice")

        nul = await client.post("/sessions", json={"username": "ali\u0000ce", "password": PASSWORD})
        answers = [
            await client.get(
                "/users/me/events",
                # Sent and read as latin-1 ("²" is the byte 0xb2).
                headers=httpx.Headers(
                    {**alice.headers, "Last-Event-ID": last_event_id}, encoding="latin-1"
                ),
            )
            for last_event_id in (
                "1-\xb2",
                "1-99999999999999999999999999",
                "99999999999999999999-1",
            )
        ]

        assert nul.status_code == 422
        assert [answer.status_code for answer in answers] == [422, 422, 422]
