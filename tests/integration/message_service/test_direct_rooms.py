"""Direct rooms on PostgreSQL: many clients of a pair opening their direct room at the same
moment get one room (the unique key decides; the losers read the winner's)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from fastapi import FastAPI

from message_service.app import create_app
from tests.integration.message_service.helpers import settings_for
from tests.unit.message_service.helpers import client_for, register


@pytest.fixture
async def app(pg_url: str, rabbit_url: str) -> AsyncIterator[FastAPI]:
    application = create_app(settings_for(pg_url, rabbit_url))
    async with application.router.lifespan_context(application):
        yield application


async def test_concurrent_opens_of_a_pair_make_one_direct_room(app: FastAPI) -> None:
    async with client_for(app) as client:
        alice = await register(client, "alice")
        bob = await register(client, "bob")

        async def open_as(me_index: int) -> tuple[int, str]:
            me, other = (alice, bob) if me_index % 2 == 0 else (bob, alice)
            response = await client.post(
                "/rooms",
                json={"kind": "direct", "member_ids": [str(other.id)]},
                headers=me.headers,
            )
            return response.status_code, response.json()["id"]

        answers = await asyncio.gather(*(open_as(index) for index in range(12)))

    assert sorted(status for status, _ in answers) == [200] * 11 + [201]
    assert len({room_id for _, room_id in answers}) == 1
