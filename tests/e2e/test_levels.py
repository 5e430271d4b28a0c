"""Chat-aware defaults with the four services as processes: new users hear of mentions only, so
room chatter sends nothing, while a mention of one member pushes that member's phone at once."""

from __future__ import annotations

import time
import uuid

import asyncpg
import httpx

from tests.e2e.conftest import Pipeline
from tests.support import infra

PLAIN_MESSAGES = 50


async def _member(client: httpx.AsyncClient, name: str) -> dict[str, str]:
    response = await client.post(
        "/users",
        json={"username": name, "display_name": name.title(), "email": f"{name}@example.test"},
    )
    assert response.status_code == 201, response.text
    user: dict[str, str] = response.json()
    device = await client.post(
        "/users/me/devices",
        json={"platform": "fcm", "token": f"device-{name}-{uuid.uuid4().hex}"},
        headers={"Authorization": f"Bearer {user['token']}"},
    )
    assert device.status_code == 201, device.text
    return user


async def test_by_default_chatter_sends_nothing_and_a_mention_pushes_at_once(
    pipeline: Pipeline,
) -> None:
    async with httpx.AsyncClient(base_url=pipeline.api, timeout=10) as client:
        members = [await _member(client, f"member{index}") for index in range(10)]
        alice, bob = members[0], members[1]
        auth = {"Authorization": f"Bearer {alice['token']}"}
        room = await client.post(
            "/rooms",
            json={"name": "general", "member_ids": [m["id"] for m in members[1:]]},
            headers=auth,
        )
        assert room.status_code == 201, room.text
        messages = f"/rooms/{room.json()['id']}/messages"
        for index in range(PLAIN_MESSAGES):
            posted = await client.post(messages, json={"content": f"chatter {index}"}, headers=auth)
            assert posted.status_code == 201, posted.text

        # Every plain message decided for its 9 recipients, each channel skipped by level.
        connection = await asyncpg.connect(
            pipeline.databases["notification-router"].replace("+asyncpg", "")
        )
        try:

            async def all_decided() -> list[asyncpg.Record]:
                rows: list[asyncpg.Record] = await connection.fetch(
                    "SELECT push_decision, email_decision, trigger FROM notifications"
                )
                return rows if len(rows) == PLAIN_MESSAGES * 9 else []

            decided = await infra.wait_until(all_decided, timeout=60)
        finally:
            await connection.close()
        assert {tuple(row) for row in decided} == {
            ("skipped:level_mentions", "skipped:level_mentions", "message")
        }
        assert pipeline.fcm.accepted == []
        assert pipeline.smtp.received == []

        mention = await client.post(
            messages, json={"content": f"@{bob['username']} can you look?"}, headers=auth
        )
        assert mention.status_code == 201, mention.text
        created = time.monotonic()

        async def bob_pushed() -> bool:
            return len(pipeline.fcm.accepted) >= 1

        await infra.wait_until(bob_pushed, timeout=10, interval=0.01)
        pushed_after = time.monotonic() - created

    (push,) = pipeline.fcm.accepted
    assert push["message"]["token"].startswith("device-member1-")
    # Within 1 s of the 201 on an idle machine; the bound here leaves room for a loaded CI.
    assert pushed_after < 5.0, pushed_after
