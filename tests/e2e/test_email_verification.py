"""Verified e-mail addresses with the four services as processes, verification on (the other
end-to-end suites run with `EMAIL_VERIFICATION=false`: `tests.support.processes.service_env`).

Bob registers: nothing is e-mailed to him (his pushes, the positive control, arrive) until he
follows the link of the verification e-mail that reaches the SMTP fake (its page, then its
button's POST); then his mentions are e-mailed. A new address starts again, and the old link no
longer verifies. Hard bounces (the SMTP fake answers 550 to his address) unverify it at
`EMAIL_BOUNCE_LIMIT`."""

from __future__ import annotations

import functools
import re
import uuid
from collections.abc import AsyncIterator
from email.message import EmailMessage
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest

from tests.e2e.conftest import Person, Pipeline, register_person, started_pipeline
from tests.fakes.fcm import FakeFcm
from tests.fakes.smtp import FakeSmtp
from tests.support import infra

BOUNCE_LIMIT = 2
OVERRIDES = {"EMAIL_VERIFICATION": "true", "EMAIL_BOUNCE_LIMIT": str(BOUNCE_LIMIT)}
VERIFICATION_SUBJECT = "Confirm your e-mail address for Herald"


@pytest.fixture
async def verifying_pipeline(
    rabbit_url: str, fcm: FakeFcm, smtp: FakeSmtp, credentials: Path, tmp_path: Path
) -> AsyncIterator[Pipeline]:
    async with started_pipeline(
        rabbit_url, fcm, smtp, credentials, tmp_path, overrides=OVERRIDES
    ) as pipeline:
        yield pipeline


def mails_to(smtp: FakeSmtp, address: str) -> list[EmailMessage]:
    return [mail for mail in list(smtp.received) if mail["To"].addresses[0].addr_spec == address]


def text_of(mail: EmailMessage) -> str:
    body = mail.get_body(preferencelist=("plain",))
    assert body is not None
    content: str = body.get_content()
    return content


async def verification_link(smtp: FakeSmtp, address: str) -> str:
    """The link of the (one) verification e-mail to `address`, once it has arrived."""

    async def arrived() -> list[EmailMessage]:
        return [mail for mail in mails_to(smtp, address) if mail["Subject"] == VERIFICATION_SUBJECT]

    [mail] = await infra.wait_until(arrived, timeout=30)
    match = re.search(r"https?://\S+/verify-email\?token=\S+", text_of(mail))
    assert match is not None, text_of(mail)
    return match[0]


async def follow(client: httpx.AsyncClient, link: str) -> httpx.Response:
    """Open the link as a browser does (its page, which changes nothing), then press its
    button (the form's POST). The link names message-service's default base URL: the test's
    service listens elsewhere, so only its path and query are kept."""
    parts = urlsplit(link)
    target = f"{parts.path}?{parts.query}"
    page = await client.get(target)
    assert page.status_code == 200, page.text
    assert '<form method="post"' in page.text
    return await client.post(target)


async def email_verified(client: httpx.AsyncClient, person: Person) -> bool:
    me = await client.get("/users/me", headers=person.auth)
    assert me.status_code == 200, me.text
    verified: bool = me.json()["email_verified"]
    return verified


async def test_only_a_verified_address_is_emailed_and_bounces_unverify_it(
    verifying_pipeline: Pipeline,
) -> None:
    pipeline = verifying_pipeline
    router = await asyncpg.connect(
        pipeline.databases["notification-router"].replace("+asyncpg", "")
    )

    async def router_sees(person: Person, verified: bool) -> bool:
        """The router's projection of `person` has their address as verified (or not): what
        a message decides with from then on."""
        value = await router.fetchval(
            "SELECT email_verified FROM recipients WHERE user_id = $1", uuid.UUID(person.id)
        )
        return value is verified

    async def email_decision(person: Person, message_id: str) -> str | None:
        value = await router.fetchval(
            "SELECT email_decision FROM notifications WHERE recipient_id = $1 AND message_id = $2",
            uuid.UUID(person.id),
            uuid.UUID(message_id),
        )
        return None if value is None else str(value)

    try:
        async with httpx.AsyncClient(base_url=pipeline.api, timeout=10) as client:
            alice = await register_person(client, "alice")
            bob = await register_person(client, "bob")
            assert not await email_verified(client, bob)
            direct = await client.post(
                "/rooms", json={"kind": "direct", "member_ids": [bob.id]}, headers=alice.auth
            )
            assert direct.status_code in {200, 201}, direct.text
            room_id = direct.json()["id"]

            async def mention(text: str) -> str:
                posted = await client.post(
                    f"/rooms/{room_id}/messages",
                    json={"content": f"@{bob.username} {text}"},
                    headers=alice.auth,
                )
                assert posted.status_code == 201, posted.text
                return str(posted.json()["id"])

            async def pushed(message_id: str) -> bool:
                return any(
                    push["message"]["data"].get("message_id") == message_id
                    for push in pipeline.fcm.messages_to(bob.device_token)
                )

            async def not_emailed(message_id: str, text: str, address: str) -> None:
                """The push arrives (the control) and the router decided no e-mail, for an
                unverified address: so none will come (the decision is final)."""
                await infra.wait_until(lambda: pushed(message_id), timeout=30)
                decision = await infra.wait_until(
                    lambda: email_decision(bob, message_id), timeout=30
                )
                assert decision == "skipped:email_unverified"
                assert not [
                    mail for mail in mails_to(pipeline.smtp, address) if text in text_of(mail)
                ]

            async def emailed(text: str, address: str) -> None:
                async def arrived() -> list[EmailMessage]:
                    return [
                        mail for mail in mails_to(pipeline.smtp, address) if text in text_of(mail)
                    ]

                [mail] = await infra.wait_until(arrived, timeout=30)
                assert mail["Subject"] != VERIFICATION_SUBJECT

            # 1. Unverified: the mention is pushed, not e-mailed.
            await infra.wait_until(lambda: router_sees(bob, False), timeout=30)
            await not_emailed(
                await mention("before verifying"), "before verifying", "bob@example.test"
            )

            # 2. The verification e-mail's link (page, then button) verifies; now it is e-mailed.
            link = await verification_link(pipeline.smtp, "bob@example.test")
            confirmed = await follow(client, link)
            assert confirmed.status_code == 200, confirmed.text
            assert "Address confirmed" in confirmed.text
            assert await email_verified(client, bob)
            await infra.wait_until(lambda: router_sees(bob, True), timeout=30)
            await mention("after verifying")
            await emailed("after verifying", "bob@example.test")

            # 3. A new address starts again; the first link no longer verifies anything.
            changed = await client.patch(
                "/users/me", json={"email": "bob2@example.test"}, headers=bob.auth
            )
            assert changed.status_code == 200, changed.text
            assert changed.json()["email_verified"] is False
            await infra.wait_until(lambda: router_sees(bob, False), timeout=30)
            await not_emailed(await mention("new address"), "new address", "bob2@example.test")
            stale = await client.post(f"{urlsplit(link).path}?{urlsplit(link).query}")
            assert stale.status_code == 400
            assert "not valid for your current e-mail address" in stale.text
            second = await verification_link(pipeline.smtp, "bob2@example.test")
            assert (await follow(client, second)).status_code == 200
            await infra.wait_until(lambda: router_sees(bob, True), timeout=30)

            # 4. The mail server refuses the address for good: BOUNCE_LIMIT bounces unverify it.
            pipeline.smtp.reply("bob2@example.test", 550, "5.1.1 no such user")
            bounced = [await mention(f"bounce {index}") for index in range(BOUNCE_LIMIT)]
            for message_id in bounced:
                await infra.wait_until(functools.partial(pushed, message_id), timeout=30)
            await infra.wait_until(lambda: router_sees(bob, False), timeout=60)
            assert not await email_verified(client, bob)
            await not_emailed(
                await mention("after bouncing"), "after bouncing", "bob2@example.test"
            )
            # Asking again is refused for now: this address had its e-mail minutes ago.
            again = await client.post("/users/me/email/verification", headers=bob.auth)
            assert again.status_code == 429, again.text
            assert int(again.headers["retry-after"]) > 0
    finally:
        await router.close()
