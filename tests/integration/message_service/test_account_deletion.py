"""Deleting an account on PostgreSQL: its settings go, and nothing that reaches it afterwards (an
unsubscribe link mailed before, a request that waited for its row's lock) stages a snapshot newer
than its last (`deleted`) one, which the router would take and so make the user again."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from fastapi import FastAPI
from sqlalchemy import text

from herald_shared.events import utc_now
from herald_shared.unsubscribe import UnsubscribeTokens
from message_service import repository, service
from message_service.app import MessageService, create_app, service_of
from message_service.models import Preferences, User
from tests.integration.message_service.helpers import settings_for
from tests.support.infra import wait_until
from tests.unit.message_service.helpers import client_for, register, user_updates

SECRET = "test-unsubscribe-secret-0123456789abcdef"


@pytest.fixture
async def app(pg_url: str, rabbit_url: str) -> AsyncIterator[FastAPI]:
    app = create_app(settings_for(pg_url, rabbit_url, unsubscribe_secret=SECRET))
    async with app.router.lifespan_context(app):
        yield app


async def rows_of(runtime: MessageService, user_id: uuid.UUID) -> tuple[User, Preferences | None]:
    async with runtime.sessions() as session:
        user = await session.get(User, user_id)
        preferences = await session.get(Preferences, user_id)
    assert user is not None
    return user, preferences


async def test_an_unsubscribe_link_mailed_before_the_deletion_changes_nothing(
    app: FastAPI,
) -> None:
    runtime = service_of(app)
    async with client_for(app) as client:
        bob = await register(client, "bob")
        token = UnsubscribeTokens(SECRET.encode()).issue(
            bob.id, now=utc_now(), lifetime=timedelta(days=30)
        )
        assert (await rows_of(runtime, bob.id))[1] is not None
        assert (await client.delete("/users/me", headers=bob.headers)).status_code == 204
        (deletion,) = await user_updates(runtime, bob.id)

        response = await client.post(
            "/unsubscribe", params={"token": token}, data={"List-Unsubscribe": "One-Click"}
        )

    assert response.status_code == 200  # as any valid link: it does not tell who exists
    user, preferences = await rows_of(runtime, bob.id)
    assert preferences is None  # deleted with the account, and not made again
    assert (user.deleted_at is not None, user.version) == (True, deletion.version)
    assert await user_updates(runtime, bob.id) == [deletion]
    assert deletion.deleted


async def test_an_unsubscribe_that_waited_for_the_deletion_stages_nothing(app: FastAPI) -> None:
    """The unsubscribe locks the user's row while the deletion holds it: once the deletion
    commits, PostgreSQL reads the row again, finds the account deleted and leaves it out."""
    runtime = service_of(app)
    async with client_for(app) as client:
        bob = await register(client, "bob")

    async with runtime.sessions() as deleting, runtime.sessions() as unsubscribing:
        await repository.lock_users(deleting, user_ids={bob.id})
        waiting = asyncio.create_task(service.turn_email_off(session=unsubscribing, user_id=bob.id))

        async def blocked_on_the_lock() -> bool:
            async with runtime.engine.connect() as connection:
                waits = await connection.scalar(
                    text(
                        "SELECT count(*) FROM pg_stat_activity"
                        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                    )
                )
            return bool(waits)

        await wait_until(blocked_on_the_lock)
        assert not waiting.done()
        await service.delete_account(session=deleting, user_id=bob.id)
        await asyncio.wait_for(waiting, timeout=10)

    user, preferences = await rows_of(runtime, bob.id)
    assert preferences is None
    (last,) = await user_updates(runtime, bob.id)
    assert (last.deleted, last.version) == (True, user.version)
