"""Presence with the four services as processes: Bob's real-time stream is open with room R in
view, so a mention in R reaches his screen and nothing else; a mention in room S pushes at once
but is not e-mailed while he is online; once his stream drops, the next mention pushes at once,
and e-mail comes back only after EMAIL_AFTER_OFFLINE_SECONDS without a stream (3 s here, 60 s
by default; the rule's boundaries at 60 s are table-tested in the routing module)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import httpx
import pytest

from tests.e2e.conftest import Person, register_person
from tests.fakes.fcm import FakeFcm
from tests.fakes.smtp import FakeSmtp
from tests.support import infra
from tests.support.processes import SERVICES, ServiceProcess, running_services, service_env
from tests.support.sse import SseClient

EMAIL_GRACE_S = 3.0


@pytest.fixture
async def services(
    rabbit_url: str, fcm: FakeFcm, smtp: FakeSmtp, credentials: Path, tmp_path: Path
) -> AsyncIterator[tuple[dict[str, ServiceProcess], dict[str, str]]]:
    databases = {name: await infra.create_database() for name in SERVICES}
    environments = service_env(
        rabbit_url=rabbit_url, databases=databases, fcm=fcm, credentials=credentials, smtp=smtp
    )
    environments["notification-router"]["EMAIL_AFTER_OFFLINE_SECONDS"] = str(EMAIL_GRACE_S)
    try:
        async with running_services(environments, tmp_path) as running:
            yield running, databases
    finally:
        for url in databases.values():
            await infra.drop_database(url)


async def test_the_room_in_view_is_silent_push_goes_elsewhere_email_waits_for_offline(
    services: tuple[dict[str, ServiceProcess], dict[str, str]], fcm: FakeFcm, smtp: FakeSmtp
) -> None:
    running, databases = services
    api = running["message-service"].base_url
    router = await asyncpg.connect(databases["notification-router"].replace("+asyncpg", ""))

    async def decision(message_id: str, person: Person) -> tuple[str, str]:
        async def decided() -> asyncpg.Record | None:
            row: asyncpg.Record | None = await router.fetchrow(
                "SELECT push_decision, email_decision FROM notifications"
                " WHERE message_id = $1 AND recipient_id = $2",
                uuid.UUID(message_id),
                uuid.UUID(person.id),
            )
            return row

        row = await infra.wait_until(decided, timeout=10, interval=0.02)
        assert row is not None
        return row["push_decision"], row["email_decision"]

    async def presence_of(person: Person) -> tuple[datetime | None, uuid.UUID | None]:
        row = await router.fetchrow(
            "SELECT max(c.expires_at) AS until, max(r.room_id::text) AS room"
            " FROM presence_connections c LEFT JOIN rooms_in_view r USING (user_id)"
            " WHERE c.user_id = $1",
            uuid.UUID(person.id),
        )
        room = row["room"] if row is not None else None
        return (row["until"] if row is not None else None), (uuid.UUID(room) if room else None)

    try:
        async with httpx.AsyncClient(base_url=api, timeout=10) as client:
            alice, bob = (
                await register_person(client, "alice"),
                await register_person(client, "bob"),
            )

            async def room(name: str) -> str:
                made = await client.post(
                    "/rooms", json={"name": name, "member_ids": [bob.id]}, headers=alice.auth
                )
                assert made.status_code == 201, made.text
                joined = await client.post(f"/rooms/{made.json()['id']}/join", headers=bob.auth)
                assert joined.status_code == 200, joined.text
                return str(made.json()["id"])

            async def post(room_id: str, text: str) -> tuple[str, float]:
                posted = await client.post(
                    f"/rooms/{room_id}/messages", json={"content": text}, headers=alice.auth
                )
                assert posted.status_code == 201, posted.text
                return str(posted.json()["id"]), time.monotonic()

            async def pushed(message_id: str) -> float:
                """When the push of that message to Bob's phone was accepted."""

                async def accepted() -> bool:
                    return any(
                        push["message"]["data"]["message_id"] == message_id
                        for push in fcm.messages_to(bob.device_token)
                    )

                await infra.wait_until(accepted, timeout=10, interval=0.01)
                return time.monotonic()

            r, s = await room("r"), await room("s")

            async def invited() -> bool:
                return await infra.invitations_delivered(databases["notification-router"]) == 2

            await infra.wait_until(invited, timeout=30)

            async with SseClient(api, bob.token, active_room_id=r) as stream:

                async def online_in(room_id: str) -> bool:
                    until, in_view = await presence_of(bob)
                    return (
                        until is not None
                        and until > datetime.now(UTC)
                        and (in_view == uuid.UUID(room_id))
                    )

                await infra.wait_until(lambda: online_in(r), timeout=10, interval=0.02)
                in_view, _ = await post(r, "@bob look at this")
                elsewhere, posted_at = await post(s, "@bob and at this")
                elsewhere_s = await pushed(elsewhere) - posted_at
                assert await decision(in_view, bob) == ("skipped:active_in_room",) * 2
                assert await decision(elsewhere, bob) == ("pending", "skipped:online")
                # Both reached the stream, in order (among Bob's inbox items, which it carries
                # too).
                shown: list[str] = []
                while len(shown) < 2:
                    event = await stream.next()
                    if event.event == "message":
                        shown.append(event.json()["id"])
                assert shown == [in_view, elsewhere]

                # The room in view changes through the API, on any replica.
                moved = await client.put(
                    "/users/me/presence", json={"active_room_id": s}, headers=bob.auth
                )
                assert moved.status_code == 204, moved.text
                await infra.wait_until(lambda: online_in(s), timeout=10, interval=0.02)
                now_in_view, _ = await post(s, "@bob still here?")
                assert await decision(now_in_view, bob) == ("skipped:active_in_room",) * 2

            async def offline() -> bool:
                until, _ = await presence_of(bob)
                return until is not None and until <= datetime.now(UTC)

            await infra.wait_until(offline, timeout=10, interval=0.02)
            gone_until, _ = await presence_of(bob)
            assert gone_until is not None
            dropped, posted_at = await post(s, "@bob are you there?")
            dropped_s = await pushed(dropped) - posted_at
            assert await decision(dropped, bob) == ("pending", "skipped:online")

            # E-mail is a rule of time: wait out the grace since the stream's presence ended,
            # then it comes back. On the wall clock, as the router's rule (a machine whose clock
            # is stepped, as a virtual machine's can be, moves it and not the monotonic one).
            mail_again_at = gone_until + timedelta(seconds=EMAIL_GRACE_S + 0.5)

            async def grace_over() -> bool:
                return datetime.now(UTC) >= mail_again_at

            await infra.wait_until(grace_over, timeout=EMAIL_GRACE_S + 10, interval=0.05)
            later, _ = await post(s, "@bob e-mail me then")
            assert await decision(later, bob) == ("pending", "pending")

            async def mailed() -> bool:
                return len(smtp.messages_to("bob@example.test")) == 3  # 2 invitations + this

            await infra.wait_until(mailed, timeout=10)
    finally:
        await router.close()

    # ~0.05 s on an idle machine (the issue asks for 1 s); the bound leaves room for a loaded CI.
    assert elsewhere_s < 5.0
    assert dropped_s < 5.0
