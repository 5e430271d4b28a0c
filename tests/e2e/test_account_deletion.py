"""Account deletion with the four services as processes: within a minute of `DELETE /users/me`
no table of any service's database holds the deleted user's e-mail address, device token,
username or display name, while what others wrote and were told stays."""

from __future__ import annotations

import time
import uuid

import asyncpg
import httpx
import pytest

from tests.e2e.conftest import Pipeline, register_person
from tests.support import infra
from tests.support.faults import emit

DEADLINE_S = 60


async def rows_holding(database_url: str, secrets: list[str]) -> list[str]:
    """`table: secret` for every row of every table of the database that holds a secret."""
    connection = await asyncpg.connect(database_url.replace("+asyncpg", ""))
    try:
        tables = await connection.fetch(
            "SELECT table_name FROM information_schema.tables"
            " WHERE table_schema = 'public' AND table_type = 'BASE TABLE'"
        )
        found = []
        for table in tables:
            name = table["table_name"]
            query = f'SELECT row_to_json(t)::text AS row FROM "{name}" t'  # noqa: S608  # the catalog's names
            rows = await connection.fetch(query)
            for row in rows:
                found += [f"{name}: {secret}" for secret in secrets if secret in row["row"]]
        return found
    finally:
        await connection.close()


async def test_a_deleted_account_leaves_no_address_token_or_name_in_any_database(
    pipeline: Pipeline, request: pytest.FixtureRequest
) -> None:
    suffix = uuid.uuid4().hex[:8]
    name = f"zebulon{suffix}"
    async with httpx.AsyncClient(base_url=pipeline.api, timeout=10) as client:
        alice = await register_person(client, f"alice{suffix}", levels={"email": "all"})
        # Bob's e-mail waits two minutes for a digest (a new user's delay): the router holds
        # it, with his address, when he deletes his account.
        bob = await register_person(client, name, email_delay=120)
        me = (await client.get("/users/me", headers=bob.auth)).json()
        secrets = [me["email"], bob.device_token, name, me["display_name"]]
        room = await client.post(
            "/rooms", json={"kind": "direct", "member_ids": [bob.id]}, headers=alice.auth
        )
        assert room.status_code == 201, room.text
        room_id = room.json()["id"]
        for author, text in ((alice, "are you there?"), (bob, "yes, but leaving")):
            posted = await client.post(
                f"/rooms/{room_id}/messages", json={"content": text}, headers=author.auth
            )
            assert posted.status_code == 201, posted.text

        # Before: Bob was pushed, Alice was pushed and mailed (his name as the sender), and
        # the router holds Bob's waiting e-mail.
        async def told() -> bool:
            return (
                len(pipeline.fcm.messages_to(bob.device_token)) == 1
                and len(pipeline.fcm.messages_to(alice.device_token)) == 1
                and any(
                    alice.username in recipient
                    for _, recipients in pipeline.smtp.envelopes
                    for recipient in recipients
                )
            )

        await infra.wait_until(told, timeout=30)
        router_db = pipeline.databases["notification-router"]
        assert any(
            found.startswith("window_entries") for found in await rows_holding(router_db, secrets)
        )

        deleted = await client.delete("/users/me", headers=bob.auth)
        assert deleted.status_code == 204
        started = time.monotonic()

        async def leftovers() -> list[str]:
            return [
                f"{service}.{where}"
                for service, url in pipeline.databases.items()
                for where in await rows_holding(url, secrets)
            ]

        async def forgotten() -> bool:
            return not await leftovers()

        try:
            await infra.wait_until(forgotten, timeout=DEADLINE_S, interval=0.5)
        except TimeoutError:
            left = await leftovers()
            raise AssertionError(f"still held after {DEADLINE_S} s: {left}") from None
        gone_after = time.monotonic() - started
        emit(
            request.config,
            f"ACCOUNT_DELETION gone_from_every_database_s={gone_after:.2f}",
            request.node,
        )

        # What Alice wrote and was told stays; Bob's message stays, signed by the placeholder.
        messages = (await client.get(f"/rooms/{room_id}/messages", headers=alice.auth)).json()
        assert [m["content"] for m in messages["items"]] == ["yes, but leaving", "are you there?"]

        async def alices_inbox() -> list[dict[str, object]]:
            response = await client.get("/users/me/notifications", headers=alice.auth)
            items: list[dict[str, object]] = response.json()["items"]
            return items

        (item,) = await infra.wait_until(alices_inbox, timeout=10)
        placeholder = f"deleted-{uuid.UUID(bob.id).hex[:24]}"  # his username now
        assert item["sender"] == {
            "id": bob.id,
            "username": placeholder,
            "display_name": "Deleted user",
        }
        assert (await client.get("/users/me", headers=bob.auth)).status_code == 401
