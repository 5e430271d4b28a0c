"""The four services as processes on the machine's PostgreSQL and RabbitMQ: a chat message posted
over HTTP reaches every other room member as a ledger row, an FCM push and an e-mail."""

from __future__ import annotations

import uuid

import asyncpg
import httpx

from tests.e2e.conftest import Pipeline
from tests.support import infra


async def _register(client: httpx.AsyncClient, username: str, device_token: str) -> dict[str, str]:
    response = await client.post(
        "/users",
        json={
            "username": username,
            "display_name": username.title(),
            "email": f"{username}@example.test",
            "password": "correct horse battery",
        },
    )
    assert response.status_code == 201, response.text
    user: dict[str, str] = response.json()
    device = await client.post(
        "/users/me/devices",
        json={"platform": "fcm", "token": device_token},
        headers={"Authorization": f"Bearer {user['token']}"},
    )
    assert device.status_code == 201, device.text
    # Every message notifies (a new user's default is DMs and mentions only).
    levels = await client.put(
        "/users/me/preferences",
        json={"push": "all", "email": "all", "email_delay": 0},
        headers={"Authorization": f"Bearer {user['token']}"},
    )
    assert levels.status_code == 200, levels.text
    return user


def _pg(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://")


async def test_a_message_reaches_every_other_member_by_ledger_push_and_email(
    pipeline: Pipeline,
) -> None:
    async with httpx.AsyncClient(base_url=pipeline.api, timeout=10) as client:
        alice, bob, carol = [
            await _register(client, name, f"device-{name}-{uuid.uuid4().hex}")
            for name in ("alice", "bob", "carol")
        ]
        room = await client.post(
            "/rooms",
            json={"name": "general", "member_ids": [bob["id"], carol["id"]]},
            headers={"Authorization": f"Bearer {alice['token']}"},
        )
        assert room.status_code == 201, room.text
        for member in (bob, carol):  # invited by Alice: members once they join
            joined = await client.post(
                f"/rooms/{room.json()['id']}/join",
                headers={"Authorization": f"Bearer {member['token']}"},
            )
            assert joined.status_code == 200, joined.text
        pushes_before, emails_before = await pipeline.invitations_sent(2)
        posted = await client.post(
            f"/rooms/{room.json()['id']}/messages",
            json={"content": "Hello everyone! 👋"},
            headers={"Authorization": f"Bearer {alice['token']}"},
        )
        assert posted.status_code == 201, posted.text
        message_id = posted.json()["id"]

    async def both_delivered() -> bool:
        return (
            len(pipeline.fcm.accepted) >= pushes_before + 2
            and len(pipeline.smtp.received) >= emails_before + 2
        )

    await infra.wait_until(both_delivered, timeout=60)

    pushes = pipeline.fcm.accepted[pushes_before:]
    mails = pipeline.smtp.received[emails_before:]
    pushed_tokens = sorted(message["message"]["token"] for message in pushes)
    assert [token.split("-")[1] for token in pushed_tokens] == ["bob", "carol"]
    assert all(
        message["message"]["notification"]["body"] == "Hello everyone! 👋" for message in pushes
    )
    recipients = sorted(str(mail["To"]) for mail in mails)
    assert recipients == ["Bob <bob@example.test>", "Carol <carol@example.test>"]
    for mail in mails:
        text_part = mail.get_body(preferencelist=("plain",))
        assert text_part is not None
        assert "Hello everyone!" in text_part.get_content()

    # The router's ledger: one row per recipient, and every delivery reported back as delivered.
    connection = await asyncpg.connect(_pg(pipeline.databases["notification-router"]))
    try:

        async def all_reported() -> list[asyncpg.Record]:
            rows: list[asyncpg.Record] = await connection.fetch(
                "SELECT channel, status FROM notification_deliveries WHERE message_id = $1",
                uuid.UUID(message_id),
            )
            done = len(rows) == 4 and all(row["status"] == "delivered" for row in rows)
            return rows if done else []

        deliveries = await infra.wait_until(all_reported, timeout=30)
        ledger = await connection.fetch(
            "SELECT recipient_id FROM notifications WHERE message_id = $1", uuid.UUID(message_id)
        )
    finally:
        await connection.close()
    assert sorted(str(row["recipient_id"]) for row in ledger) == sorted([bob["id"], carol["id"]])
    assert sorted(row["channel"] for row in deliveries) == ["email", "email", "push", "push"]
