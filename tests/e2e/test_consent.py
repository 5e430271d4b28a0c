"""Consent with the four services as processes: someone put in a room by another hears of the
invitation once and of nothing else from the room until they join; nothing after they leave;
and nothing at all from someone they blocked."""

from __future__ import annotations

import uuid

import asyncpg
import httpx

from tests.e2e.conftest import Person, Pipeline, register_person
from tests.support import infra

MESSAGES_BEFORE_JOINING = 20
# Everything pushed: what stays silent below is consent's doing, not a level's.
EVERYTHING = {"push": "all", "email": "all"}


async def test_invited_once_then_nothing_until_joined_nothing_after_leaving_nothing_if_blocked(
    pipeline: Pipeline,
) -> None:
    router = await asyncpg.connect(
        pipeline.databases["notification-router"].replace("+asyncpg", "")
    )

    async def decided_for(person: Person, message_ids: list[str]) -> bool:
        """The router decided every one of these messages for `person` (the control member:
        once it has, the same decisions for anyone else were in the same transaction)."""
        count = await router.fetchval(
            "SELECT count(*) FROM notifications WHERE recipient_id = $1 AND message_id = ANY($2)",
            uuid.UUID(person.id),
            [uuid.UUID(message_id) for message_id in message_ids],
        )
        return bool(count == len(message_ids))

    async def ledger_rows_of(person: Person) -> list[tuple[str, str]]:
        rows = await router.fetch(
            "SELECT message_id::text, trigger FROM notifications WHERE recipient_id = $1",
            uuid.UUID(person.id),
        )
        return [(row["message_id"], row["trigger"]) for row in rows]

    try:
        async with httpx.AsyncClient(base_url=pipeline.api, timeout=10) as client:
            alice, bob, carol, mallory = [
                await register_person(client, name, levels=EVERYTHING)
                for name in ("alice", "bob", "carol", "mallory")
            ]

            async def post(room_id: str, author: Person, text: str) -> str:
                posted = await client.post(
                    f"/rooms/{room_id}/messages", json={"content": text}, headers=author.auth
                )
                assert posted.status_code == 201, posted.text
                return str(posted.json()["id"])

            # Carol joins at once: the control that every message was routed.
            room = await client.post(
                "/rooms",
                json={"name": "general", "member_ids": [bob.id, carol.id, mallory.id]},
                headers=alice.auth,
            )
            assert room.status_code == 201, room.text
            room_id = room.json()["id"]
            for person in (carol, mallory):
                joined = await client.post(f"/rooms/{room_id}/join", headers=person.auth)
                assert joined.status_code == 200, joined.text
            await pipeline.invitations_sent(3)

            before_joining = [
                await post(room_id, alice, f"@{bob.username} are you there? ({index})")
                for index in range(MESSAGES_BEFORE_JOINING)
            ]
            await infra.wait_until(lambda: decided_for(carol, before_joining), timeout=60)
            # Exactly one push and one e-mail reached Bob: the invitation.
            (invitation,) = pipeline.fcm.messages_to(bob.device_token)
            assert invitation["message"]["notification"]["body"] == (
                "Alice invited you to #general"
            )
            assert [
                str(mail["Subject"])
                for mail in pipeline.smtp.received
                if bob.username in str(mail["To"]).lower()
            ] == ["Alice invited you to #general"]

            joined = await client.post(f"/rooms/{room_id}/join", headers=bob.auth)
            assert joined.status_code == 200, joined.text
            welcome = await post(room_id, alice, f"@{bob.username} welcome!")

            async def welcomed() -> bool:
                return len(pipeline.fcm.messages_to(bob.device_token)) == 2

            await infra.wait_until(welcomed, timeout=30)

            left = await client.post(f"/rooms/{room_id}/leave", headers=bob.auth)
            assert left.status_code == 204, left.text
            after_leaving = [await post(room_id, alice, f"@{bob.username} come back")]

            # Bob blocks Mallory: her DM, her invitation and her mention of him are silent.
            blocked = await client.put(f"/users/me/blocked/{mallory.id}", headers=bob.auth)
            assert blocked.status_code == 204, blocked.text
            direct = await client.post(
                "/rooms", json={"kind": "direct", "member_ids": [bob.id]}, headers=mallory.auth
            )
            assert direct.status_code in (200, 201), direct.text
            from_mallory = [await post(direct.json()["id"], mallory, "psst")]
            trap = await client.post(
                "/rooms",
                json={"name": "trap", "member_ids": [bob.id, carol.id]},
                headers=mallory.auth,
            )
            assert trap.status_code == 201, trap.text
            rejoined = await client.post(
                "/rooms",
                json={"name": "shared", "member_ids": [bob.id, carol.id]},
                headers=alice.auth,
            )
            shared = rejoined.json()["id"]
            for person in (bob, carol):
                await client.post(f"/rooms/{shared}/join", headers=person.auth)
            await client.post(
                f"/rooms/{shared}/members", json={"user_id": mallory.id}, headers=alice.auth
            )
            await client.post(f"/rooms/{shared}/join", headers=mallory.auth)
            from_mallory.append(await post(shared, mallory, f"@{bob.username} @room hello"))

            # Carol's invitations (trap, shared) and the messages she shares with Bob decided.
            await infra.wait_until(
                lambda: decided_for(carol, [*after_leaving, from_mallory[-1]]), timeout=60
            )
            # general: Bob, Carol, Mallory; trap: Carol; shared: Bob, Carol, then Mallory.
            await pipeline.invitations_sent(7)

        rows = await ledger_rows_of(bob)
        decided = {message_id for message_id, _ in rows}
        assert not decided & {*before_joining, *after_leaving, *from_mallory}
        assert welcome in decided
        assert sorted(trigger for _, trigger in rows) == ["invitation", "invitation", "mention"]
        # What Bob's phone showed (leaving #general also sent a recall, which shows nothing).
        pushes = [
            push
            for push in pipeline.fcm.messages_to(bob.device_token)
            if "notification" in push["message"]
        ]
        assert [push["message"]["notification"]["body"] for push in pushes] == [
            "Alice invited you to #general",
            "@bob welcome!",
            "Alice invited you to #shared",
        ]
    finally:
        await router.close()
