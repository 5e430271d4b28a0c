"""Deleting an account (`DELETE /users/me`): its tokens stop working at once, what was its alone
is deleted, its row keeps only a placeholder for the messages it wrote, the outbox keeps none of
its personal data, and one last snapshot (`deleted`) tells the router to forget it."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import httpx
from sqlmodel import select
from sqlmodel.ext.asyncio.session import AsyncSession

from herald_shared.events import InboxItem as Item
from herald_shared.events import InboxItemsUpdated, Level, Trigger
from message_service import repository, service
from message_service.app import MessageService
from message_service.models import (
    AuthSession,
    Block,
    BreakthroughUser,
    Device,
    InboxItem,
    Preferences,
    RoomMember,
    RoomSettings,
    User,
)
from tests.unit.message_service.helpers import (
    PASSWORD,
    create_room,
    outbox_rows,
    register,
    sign_in,
    user_updates,
)


async def test_deleting_an_account_leaves_nothing_personal(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice = await register(client, "alice")
    bob = await register(client, "bob", email="bob.secret@example.test")
    bobs_laptop = await sign_in(client, "bob")
    device = await client.post(
        "/users/me/devices",
        json={"platform": "fcm", "token": "bobs-secret-push-token"},
        headers=bob.headers,
    )
    assert device.status_code == 201
    room = await create_room(client, alice, [bob])
    posted = await client.post(
        f"/rooms/{room}/messages", json={"content": "hello from me"}, headers=bob.headers
    )
    assert posted.status_code == 201
    blocked = await client.put(f"/users/me/blocked/{alice.id}", headers=bob.headers)
    assert blocked.status_code == 204
    muted = await client.put(
        f"/rooms/{room}/notifications",
        json={"push": "none", "email": "default", "muted_until": None},
        headers=bob.headers,
    )
    assert muted.status_code == 200, muted.text
    preferences = await client.put(
        "/users/me/preferences",
        json={"email": "all", "breakthrough_user_ids": [str(alice.id)]},
        headers=bob.headers,
    )
    assert preferences.status_code == 200, preferences.text

    response = await client.delete("/users/me", headers=bob.headers)

    assert response.status_code == 204
    for account in (bob, bobs_laptop):
        assert (await client.get("/users/me", headers=account.headers)).status_code == 401
    signing_in = await client.post("/sessions", json={"username": "bob", "password": PASSWORD})
    assert signing_in.status_code == 401
    async with runtime.sessions() as session:
        row = await session.get(User, bob.id)
        assert row is not None
        leftovers = {
            model.__name__: (await session.exec(select(model).where(model.user_id == bob.id))).all()
            for model in (
                AuthSession,
                Device,
                Preferences,
                RoomMember,
                RoomSettings,
                BreakthroughUser,
                Block,
                InboxItem,
            )
        }
    assert (row.username, row.display_name, row.email) == (
        service.deleted_username(bob.id),
        "Deleted user",
        "",
    )
    assert row.password_hash is None
    assert row.deleted_at is not None
    assert leftovers == {name: [] for name in leftovers}
    # The message stays, signed by the placeholder; the room goes on without him.
    messages = (await client.get(f"/rooms/{room}/messages", headers=alice.headers)).json()
    assert [m["content"] for m in messages["items"]] == ["hello from me"]
    members = (await client.get(f"/rooms/{room}", headers=alice.headers)).json()["member_ids"]
    assert members == [str(alice.id)]
    # The outbox holds nothing of his but the last snapshot, which holds nothing personal.
    payloads = " ".join(row.payload for row in await outbox_rows(runtime))
    for secret in ("bob.secret@example.test", "bobs-secret-push-token", '"Bob"'):
        assert secret not in payloads
    (last,) = await user_updates(runtime, bob.id)
    assert last.deleted
    assert (last.email, last.devices, last.display_name) == (None, [], "Deleted user")


async def test_a_deleted_account_cannot_be_invited_messaged_or_blocked(
    client: httpx.AsyncClient,
) -> None:
    alice = await register(client, "alice")
    bob = await register(client, "bob")
    assert (await client.delete("/users/me", headers=bob.headers)).status_code == 204

    room = await client.post(
        "/rooms", json={"name": "r", "member_ids": [str(bob.id)]}, headers=alice.headers
    )
    direct = await client.post(
        "/rooms", json={"kind": "direct", "member_ids": [str(bob.id)]}, headers=alice.headers
    )
    blocked = await client.put(f"/users/me/blocked/{bob.id}", headers=alice.headers)

    assert room.status_code == direct.status_code == 422
    assert "unknown user id" in direct.text
    assert blocked.status_code == 404


async def test_the_username_of_a_deleted_account_is_free_again(
    client: httpx.AsyncClient,
) -> None:
    bob = await register(client, "bob")
    assert (await client.delete("/users/me", headers=bob.headers)).status_code == 204

    again = await register(client, "bob")

    assert again.id != bob.id


async def test_inbox_items_that_arrive_after_the_deletion_are_not_kept(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    bob = await register(client, "bob")
    assert (await client.delete("/users/me", headers=bob.headers)).status_code == 204
    now = datetime.now(UTC)
    event = InboxItemsUpdated(
        version=7,
        items=[
            Item(
                user_id=bob.id,
                message_id=uuid.uuid4(),
                room_id=uuid.uuid4(),
                trigger=Trigger.DIRECT,
                decided_at=now,
                message_created_at=now,
                deliveries=[],
            )
        ],
    )
    async with runtime.sessions() as session:
        assert await repository.apply_inbox_items(session, event) == 0
        await session.commit()
        kept = (await session.exec(select(InboxItem))).all()
    assert kept == []


async def test_a_request_that_reaches_a_deleted_account_changes_nothing(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    """A request authenticated just before the deletion, which then waited for the user's lock:
    it finds no user, so it neither brings back the settings nor stages a snapshot newer than
    the last (`deleted`) one, which the router would take and so make the user again."""
    bob = await register(client, "bob")
    assert (await client.delete("/users/me", headers=bob.headers)).status_code == 204
    changes: dict[str, Callable[[AsyncSession], Awaitable[object]]] = {
        "set_preferences": lambda session: service.set_preferences(
            session=session, user_id=bob.id, email=Level.NONE
        ),
        "snooze": lambda session: service.snooze(session=session, user_id=bob.id, until=None),
        "change_password": lambda session: service.change_password(
            session=session, user_id=bob.id, keep_session_id=uuid.uuid4(), password_hash="x"
        ),
    }

    refused = []
    for name, change in changes.items():
        async with runtime.sessions() as session:
            try:
                await change(session)
            except service.NotFound:
                refused.append(name)

    assert refused == list(changes)
    async with runtime.sessions() as session:
        row = await session.get(User, bob.id)
        preferences = await session.get(Preferences, bob.id)
    assert row is not None
    assert (row.deleted_at is not None, row.password_hash) == (True, None)
    assert preferences is None
    (last,) = await user_updates(runtime, bob.id)
    assert (last.deleted, last.version) == (True, row.version)


async def test_a_deleted_account_leaves_the_breakthrough_lists_of_others(
    client: httpx.AsyncClient,
) -> None:
    """Kept there, its id would be shown to Alice and refused (422) when she saved her list."""
    alice, bob, carol = [await register(client, name) for name in ("alice", "bob", "carol")]
    both = [str(bob.id), str(carol.id)]
    saved = await client.put(
        "/users/me/preferences", json={"breakthrough_user_ids": both}, headers=alice.headers
    )
    assert saved.status_code == 200, saved.text

    assert (await client.delete("/users/me", headers=bob.headers)).status_code == 204

    shown = await client.get("/users/me/preferences", headers=alice.headers)
    assert shown.json()["breakthrough_user_ids"] == [str(carol.id)]
    again = await client.put(
        "/users/me/preferences",
        json={"breakthrough_user_ids": shown.json()["breakthrough_user_ids"]},
        headers=alice.headers,
    )
    assert again.status_code == 200, again.text
