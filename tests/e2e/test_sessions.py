"""Sessions with the four services as processes: a device belongs to the session that
registered it, so signing that session out stops its pushes (the next mention reaches the
user's other device only), and its token stops working."""

from __future__ import annotations

import json
import uuid

import asyncpg
import httpx

from tests.e2e.conftest import Pipeline, register_person
from tests.support import infra

PASSWORD = "correct horse battery"  # register_person's


async def test_a_signed_out_device_is_pushed_no_more(pipeline: Pipeline) -> None:
    router = await asyncpg.connect(
        pipeline.databases["notification-router"].replace("+asyncpg", "")
    )

    async def devices_known_for(user_id: str) -> set[str]:
        raw = await router.fetchval(
            "SELECT devices FROM recipients WHERE user_id = $1", uuid.UUID(user_id)
        )
        devices = json.loads(raw) if isinstance(raw, str) else (raw or [])
        return {str(device["device_id"]) for device in devices}

    async def bob_has(devices: set[str]) -> bool:
        return await devices_known_for(bob.id) == devices

    async def pushed(token: str, count: int) -> bool:
        return len(pipeline.fcm.messages_to(token)) == count

    async def push_targets(message_id: str, user_id: str) -> list[str]:
        rows = await router.fetch(
            "SELECT target FROM notification_deliveries"
            " WHERE message_id = $1 AND recipient_id = $2 AND channel = 'push'",
            uuid.UUID(message_id),
            uuid.UUID(user_id),
        )
        return sorted(row["target"] for row in rows)

    try:
        async with httpx.AsyncClient(base_url=pipeline.api, timeout=10) as client:
            alice = await register_person(client, "alice")
            bob = await register_person(client, "bob")  # his phone, in his first session
            tablet = await client.post(
                "/sessions", json={"username": "bob", "password": PASSWORD, "name": "tablet"}
            )
            assert tablet.status_code == 201, tablet.text
            tablet_auth = {"Authorization": f"Bearer {tablet.json()['token']}"}
            tablet_token = f"device-bob-tablet-{uuid.uuid4().hex}"
            registered = await client.post(
                "/users/me/devices",
                json={"platform": "fcm", "token": tablet_token},
                headers=tablet_auth,
            )
            assert registered.status_code == 201, registered.text
            tablet_device = registered.json()["id"]
            phone_device = next(
                device["id"]
                for device in (await client.get("/users/me/devices", headers=bob.auth)).json()
                if device["id"] != tablet_device
            )
            room = await client.post(
                "/rooms", json={"kind": "direct", "member_ids": [bob.id]}, headers=alice.auth
            )
            assert room.status_code == 201, room.text
            room_id = room.json()["id"]

            async def post(text: str) -> str:
                posted = await client.post(
                    f"/rooms/{room_id}/messages", json={"content": text}, headers=alice.auth
                )
                assert posted.status_code == 201, posted.text
                return str(posted.json()["id"])

            # Control: both devices are pushed while both sessions are open.
            await infra.wait_until(lambda: bob_has({phone_device, tablet_device}), timeout=30)
            first = await post("lunch?")
            await infra.wait_until(lambda: pushed(bob.device_token, 1), timeout=30)
            await infra.wait_until(lambda: pushed(tablet_token, 1), timeout=30)
            assert await push_targets(first, bob.id) == sorted([phone_device, tablet_device])

            signed_out = await client.delete("/sessions/current", headers=bob.auth)
            assert signed_out.status_code == 204
            assert (await client.get("/users/me", headers=bob.auth)).status_code == 401
            await infra.wait_until(lambda: bob_has({tablet_device}), timeout=30)
            second = await post("still on for lunch?")
            await infra.wait_until(lambda: pushed(tablet_token, 2), timeout=30)

            assert await push_targets(second, bob.id) == [tablet_device]
            assert len(pipeline.fcm.messages_to(bob.device_token)) == 1
    finally:
        await router.close()
