"""E-mail that waits, with the four services as processes: Bob is offline and has an
`email_delay`; what he is told in the window reaches him as one e-mail when it ends, grouped by
room, without what he read meanwhile. The router's EMAIL_DELAY_SCALE makes two minutes six
seconds, but one test waits the real two minutes."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from email.message import EmailMessage
from pathlib import Path

import asyncpg
import httpx
import pytest

from tests.e2e.conftest import Person, Pipeline, register_person, started_pipeline
from tests.fakes.fcm import FakeFcm
from tests.fakes.smtp import FakeSmtp
from tests.support import infra

# Two minutes become 6 s.
SCALE = 0.05
WINDOW_S = 120 * SCALE


@pytest.fixture
async def short_windows(
    rabbit_url: str, fcm: FakeFcm, smtp: FakeSmtp, credentials: Path, tmp_path: Path
) -> AsyncIterator[Pipeline]:
    overrides = {"EMAIL_DELAY_SCALE": str(SCALE), "SCHEDULE_POLL_INTERVAL": "0.2"}
    async with started_pipeline(
        rabbit_url, fcm, smtp, credentials, tmp_path, overrides
    ) as pipeline:
        yield pipeline


def text_of(mail: EmailMessage) -> str:
    body = mail.get_body(("plain",))
    assert isinstance(body, EmailMessage)
    return str(body.get_content())


class Chat:
    """Alice and Bob, and rooms Bob has joined (his invitations e-mailed at once, before he
    chose to wait), on a running pipeline."""

    def __init__(self, pipeline: Pipeline, client: httpx.AsyncClient) -> None:
        self.pipeline = pipeline
        self.client = client

    async def start(self, rooms: list[str], *, email_delay: int) -> None:
        self.alice = await register_person(self.client, "alice")
        self.bob = await register_person(self.client, "bob")
        self.rooms = {name: await self._room(name) for name in rooms}
        await self.pipeline.invitations_sent(len(rooms))
        self.emails_before = len(self.pipeline.smtp.received)
        changed = await self.client.put(
            "/users/me/preferences", json={"email_delay": email_delay}, headers=self.bob.auth
        )
        assert changed.status_code == 200, changed.text
        await infra.wait_until(self._router_knows_the_delay)

    async def _room(self, name: str) -> str:
        room = await self.client.post(
            "/rooms", json={"name": name, "member_ids": [self.bob.id]}, headers=self.alice.auth
        )
        assert room.status_code == 201, room.text
        room_id = str(room.json()["id"])
        joined = await self.client.post(f"/rooms/{room_id}/join", headers=self.bob.auth)
        assert joined.status_code == 200, joined.text
        return room_id

    async def _router_knows_the_delay(self) -> bool:
        delay = await self._router(
            "SELECT email_delay FROM recipients WHERE user_id = $1", uuid.UUID(self.bob.id)
        )
        return bool(delay)

    async def _router(self, query: str, *args: object) -> object:
        url = self.pipeline.databases["notification-router"].replace("+asyncpg", "")
        connection = await asyncpg.connect(url)
        try:
            return await connection.fetchval(query, *args)
        finally:
            await connection.close()

    async def mention_bob(self, room: str, text: str, author: Person | None = None) -> str:
        posted = await self.client.post(
            f"/rooms/{self.rooms[room]}/messages",
            json={"content": f"@{self.bob.username} {text}"},
            headers=(author or self.alice).auth,
        )
        assert posted.status_code == 201, posted.text
        return str(posted.json()["id"])

    def new_emails(self) -> list[EmailMessage]:
        return list(self.pipeline.smtp.received[self.emails_before :])

    async def one_email(self, *, timeout: float) -> EmailMessage:
        """Wait for Bob's next e-mail; then for its delivery report, after which a second copy
        would have come, and check none did."""

        async def arrived() -> bool:
            return bool(self.new_emails())

        await infra.wait_until(arrived, timeout=timeout, interval=0.05)

        async def reported() -> bool:
            delivered = await self._router(
                "SELECT count(*) FROM notification_deliveries"
                " WHERE target = 'digest' AND status = 'delivered' AND recipient_id = $1",
                uuid.UUID(self.bob.id),
            )
            return delivered == 1

        await infra.wait_until(reported, timeout=30)
        (mail,) = self.new_emails()
        return mail


async def test_a_window_of_mentions_in_two_rooms_is_one_email_when_it_ends(
    short_windows: Pipeline,
) -> None:
    async with httpx.AsyncClient(base_url=short_windows.api, timeout=10) as client:
        chat = Chat(short_windows, client)
        await chat.start(["design", "random"], email_delay=120)

        # On the wall clock, as the router's windows: a clock that is stepped (a virtual
        # machine's after a pause) moves a window's end on that clock only.
        first_at = time.time()
        in_design = [await chat.mention_bob("design", f"design question {i}") for i in range(10)]
        in_random = [await chat.mention_bob("random", f"random remark {i}") for i in range(3)]
        mail = await chat.one_email(timeout=WINDOW_S + 30)
        arrived_s = time.time() - first_at

    text = text_of(mail)
    assert mail["Subject"] == "13 new messages in 2 conversations"
    assert mail["To"].addresses[0].addr_spec == "bob@example.test"
    # Grouped by room, oldest first.
    positions = [text.index(f"design question {i}") for i in range(10)] + [
        text.index(f"random remark {i}") for i in range(3)
    ]
    assert positions == sorted(positions)
    assert text.index("#design") < positions[0] < positions[9] < text.index("#random")
    assert len(in_design) + len(in_random) == 13
    # The window opened with the first mention and lasted its 6 s; the bound leaves room for
    # the router's poll (0.2 s) and a loaded machine.
    assert WINDOW_S - 0.5 <= arrived_s <= WINDOW_S + 5, arrived_s


async def test_a_room_read_before_the_window_ends_is_left_out_of_its_email(
    short_windows: Pipeline,
) -> None:
    async with httpx.AsyncClient(base_url=short_windows.api, timeout=10) as client:
        chat = Chat(short_windows, client)
        await chat.start(["design", "random"], email_delay=120)

        in_design = [await chat.mention_bob("design", f"design question {i}") for i in range(3)]
        await chat.mention_bob("random", "random remark")
        read = await client.put(
            f"/rooms/{chat.rooms['design']}/read",
            json={"up_to": in_design[-1]},
            headers=chat.bob.auth,
        )
        assert read.status_code == 200, read.text
        mail = await chat.one_email(timeout=WINDOW_S + 30)

    text = text_of(mail)
    assert mail["Subject"] == "1 new message in #random"
    assert "random remark" in text
    assert "design question" not in text


async def test_with_the_default_delay_the_email_comes_two_minutes_after_the_first_mention(
    pipeline: Pipeline,
) -> None:
    """The one test that waits the real default: two minutes, on the unscaled pipeline."""
    async with httpx.AsyncClient(base_url=pipeline.api, timeout=10) as client:
        chat = Chat(pipeline, client)
        await chat.start(["design"], email_delay=120)  # a new user's default

        # On the wall clock, as the router's windows: a clock that is stepped (a virtual
        # machine's after a pause) moves a window's end on that clock only.
        first_at = time.time()
        await chat.mention_bob("design", "are you there?")
        await chat.mention_bob("design", "ping")
        mail = await chat.one_email(timeout=150)
        arrived_s = time.time() - first_at

    assert mail["Subject"] == "2 new messages in #design"
    assert 115 <= arrived_s <= 125, arrived_s
