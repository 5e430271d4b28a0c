"""One user with an Android phone (FCM), an iPhone (APNs), a browser (Web Push) and an e-mail
address: a message from another member reaches all four, each through a local server that speaks
the provider's real protocol and checks what it receives (FCM's OAuth exchange and message
format; APNs over HTTP/2 with an ES256 provider token; Web Push decrypted with the browser's key,
VAPID verified; SMTP)."""

from __future__ import annotations

import uuid
from pathlib import Path

import asyncpg
import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.fakes.apns import FakeApns, device_token
from tests.fakes.fcm import FakeFcm
from tests.fakes.smtp import FakeSmtp
from tests.fakes.webpush import FakeWebPush
from tests.support import infra
from tests.support.processes import SERVICES, running_services, service_env

TEXT = "Ship it on Friday? 🚀"
INVITED = "Alice invited you to #launch"


def _vapid_key(path: Path) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


async def test_a_message_reaches_fcm_apns_web_push_and_email_of_one_user(
    rabbit_url: str,
    fcm: FakeFcm,
    credentials: Path,
    smtp: FakeSmtp,
    apns: FakeApns,
    apns_key: Path,
    tmp_path: Path,
) -> None:
    with FakeWebPush() as webpush:
        # The push service runs on loopback: allow it (production allows the real ones only).
        allowed = f"127.0.0.1,{webpush.host}"
        databases = {name: await infra.create_database() for name in SERVICES}
        environments = service_env(
            rabbit_url=rabbit_url,
            databases=databases,
            fcm=fcm,
            credentials=credentials,
            smtp=smtp,
            overrides={"WEBPUSH_ALLOWED_HOSTS": allowed},
        )
        environments["push-sender"].update(
            {
                "PUSH_PROVIDER": "live",
                "APNS_KEY_FILE": str(apns_key),
                "APNS_KEY_ID": apns.key_id,
                "APNS_TEAM_ID": apns.team_id,
                "APNS_TOPIC": apns.topic,
                "APNS_BASE_URL": apns.base_url,
                "WEBPUSH_VAPID_PRIVATE_KEY_FILE": str(_vapid_key(tmp_path / "vapid.pem")),
                "WEBPUSH_VAPID_SUBJECT": "mailto:ops@herald.example",
            }
        )
        try:
            async with running_services(environments, tmp_path) as services:
                message_id = await _post_to_bob_on_every_channel(
                    services["message-service"].base_url, webpush
                )

                async def everything_arrived() -> bool:
                    # Bob's invitation to the room first, then the message: two of each.
                    return (
                        min(
                            len(fcm.accepted),
                            len(apns.accepted),
                            len(webpush.received),
                            len(smtp.received),
                        )
                        >= 2
                    )

                await infra.wait_until(everything_arrived, timeout=60)
                deliveries = await _reported(databases["notification-router"], message_id)
        finally:
            for url in databases.values():
                await infra.drop_database(url)

    bodies = sorted([INVITED, TEXT])
    assert sorted(push["message"]["notification"]["body"] for push in fcm.accepted) == bodies
    assert sorted(payload["aps"]["alert"]["body"] for _, payload in apns.accepted) == bodies
    assert all(headers["apns-topic"] == apns.topic for headers, _ in apns.accepted)
    assert apns.http_versions
    assert set(apns.http_versions) == {"2"}
    # Decrypted with the browser's private key.
    assert sorted(browser.payload["body"] for browser in webpush.received) == bodies
    assert webpush.refusals == []
    assert webpush.undecryptable == 0
    assert sorted(str(mail["Subject"]) for mail in smtp.received) == [
        "Alice invited you to #launch",
        "New message from Alice in launch",
    ]
    assert {str(mail["To"]) for mail in smtp.received} == {"Bob <bob@example.test>"}
    # Each of Bob's four deliveries reported back to the router's ledger as delivered.
    assert sorted(deliveries) == sorted([("push", "delivered")] * 3 + [("email", "delivered")]), (
        deliveries
    )


async def _post_to_bob_on_every_channel(api: str, webpush: FakeWebPush) -> str:
    async with httpx.AsyncClient(base_url=api, timeout=10) as client:
        users = {}
        for name in ("alice", "bob"):
            response = await client.post(
                "/users",
                json={
                    "username": name,
                    "display_name": name.title(),
                    "email": f"{name}@example.test",
                    "password": "correct horse battery",
                },
            )
            assert response.status_code == 201, response.text
            users[name] = response.json()
        bob = {"Authorization": f"Bearer {users['bob']['token']}"}
        # Every message notifies Bob (a new user's default is DMs and mentions only).
        levels = await client.put(
            "/users/me/preferences",
            json={"push": "all", "email": "all", "email_delay": 0},
            headers=bob,
        )
        assert levels.status_code == 200, levels.text
        for device in (
            {"platform": "fcm", "token": f"fcm-bob-{uuid.uuid4().hex}"},
            {"platform": "apns", "token": device_token()},
            {"platform": "webpush", **webpush.subscribe().to_json()},
        ):
            registered = await client.post("/users/me/devices", json=device, headers=bob)
            assert registered.status_code == 201, registered.text
        alice = {"Authorization": f"Bearer {users['alice']['token']}"}
        room = await client.post(
            "/rooms", json={"name": "launch", "member_ids": [users["bob"]["id"]]}, headers=alice
        )
        assert room.status_code == 201, room.text
        joined = await client.post(f"/rooms/{room.json()['id']}/join", headers=bob)
        assert joined.status_code == 200, joined.text
        posted = await client.post(
            f"/rooms/{room.json()['id']}/messages", json={"content": TEXT}, headers=alice
        )
        assert posted.status_code == 201, posted.text
        return str(posted.json()["id"])


async def _reported(router_database: str, message_id: str) -> list[tuple[str, str]]:
    connection = await asyncpg.connect(
        router_database.replace("postgresql+asyncpg://", "postgresql://")
    )
    try:

        async def all_delivered() -> list[tuple[str, str]]:
            rows = await connection.fetch(
                "SELECT channel, status FROM notification_deliveries WHERE message_id = $1",
                uuid.UUID(message_id),
            )
            pairs = [(row["channel"], row["status"]) for row in rows]
            done = len(pairs) == 4 and all(status == "delivered" for _, status in pairs)
            return pairs if done else []

        return await infra.wait_until(all_delivered, timeout=30)
    finally:
        await connection.close()
