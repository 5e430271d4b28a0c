"""Use cases called directly, for the paths the HTTP API cannot reach, and the ASGI middleware."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, MutableMapping
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy.exc import IntegrityError

from herald_shared.database import run_migrations
from herald_shared.events import Platform
from message_service import repository, service
from message_service.app import (
    BodySizeLimit,
    MessageService,
    SafeErrors,
    create_app,
    email_verification_of,
    service_of,
)
from message_service.cursor import decode_cursor
from message_service.models import Device
from tests.unit.message_service.helpers import make_settings, user_updates


@pytest.fixture
async def runtime(sqlite_url: str) -> AsyncIterator[MessageService]:
    runtime = service_of(create_app(make_settings(sqlite_url)))
    await run_migrations(
        runtime.engine, script_location="message_service:migrations", service_name="message-service"
    )
    yield runtime
    await runtime.engine.dispose()


async def new_user(runtime: MessageService, username: str = "alice") -> uuid.UUID:
    async with runtime.sessions() as session:
        registration = await service.register_user(
            session=session,
            username=username,
            display_name="A",
            email="a@example.test",
            password_hash="not checked here",
            session_ttl=timedelta(days=1),
            verification=email_verification_of(runtime.settings),
        )
    return registration.user.id


async def session_of(runtime: MessageService, user_id: uuid.UUID) -> uuid.UUID:
    """The user's first session (registration started it)."""
    async with runtime.sessions() as session:
        return (await service.list_sessions(session=session, user_id=user_id))[0].id


async def test_unknown_users_are_not_found(runtime: MessageService) -> None:
    ghost = uuid.uuid4()
    async with runtime.sessions() as session:
        with pytest.raises(service.NotFound):
            await service.get_profile(session=session, user_id=ghost)
        with pytest.raises(service.NotFound):
            await service.update_profile(
                session=session,
                user_id=ghost,
                display_name="x",
                verification=email_verification_of(runtime.settings),
            )
        with pytest.raises(service.NotFound):
            await service.register_device(
                session=session,
                user_id=ghost,
                session_id=uuid.uuid4(),
                platform=Platform.FCM,
                token="t",
                max_devices=5,
            )
        assert not await service.remove_invalidated_device(
            session=session, user_id=ghost, device_id=uuid.uuid4()
        )
    assert (
        await service.authenticate(
            engine=runtime.engine, token="nothing", session_ttl=timedelta(days=1)
        )
        is None
    )


async def test_a_device_insert_that_loses_a_race_is_retried(
    runtime: MessageService, monkeypatch: pytest.MonkeyPatch
) -> None:
    user_id = await new_user(runtime)
    add_device = repository.add_device
    failures = 1

    async def racing_add(*args: Any, **kwargs: Any) -> None:
        nonlocal failures
        if failures:
            failures -= 1
            raise IntegrityError("INSERT", {}, Exception("duplicate token"))
        await add_device(*args, **kwargs)

    monkeypatch.setattr(repository, "add_device", racing_add)
    async with runtime.sessions() as session:
        registration = await service.register_device(
            session=session,
            user_id=user_id,
            session_id=await session_of(runtime, user_id),
            platform=Platform.FCM,
            token="t",
            max_devices=5,
        )

    assert registration.created
    assert [u.version for u in await user_updates(runtime, user_id)] == [1, 2]


async def test_a_device_race_that_never_settles_is_409(
    runtime: MessageService, monkeypatch: pytest.MonkeyPatch
) -> None:
    user_id = await new_user(runtime)

    async def always_taken(*args: Any, **kwargs: Any) -> None:
        raise IntegrityError("INSERT", {}, Exception("duplicate token"))

    monkeypatch.setattr(repository, "add_device", always_taken)
    async with runtime.sessions() as session:
        with pytest.raises(service.Conflict):
            await service.register_device(
                session=session,
                user_id=user_id,
                session_id=await session_of(runtime, user_id),
                platform=Platform.FCM,
                token="t",
                max_devices=5,
            )
    assert [u.version for u in await user_updates(runtime, user_id)] == [1]


async def test_a_token_that_changes_hands_while_locking_is_retried(
    runtime: MessageService, monkeypatch: pytest.MonkeyPatch
) -> None:
    user_id = await new_user(runtime)
    lookup = repository.device_by_token
    calls = 0

    async def moving_token(*args: Any, **kwargs: Any) -> Device | None:
        # First attempt: free when read, someone else's once our lock is taken.
        nonlocal calls
        calls += 1
        if calls == 2:
            return Device(user_id=uuid.uuid4(), platform="fcm", token="t", token_hash="h")
        return await lookup(*args, **kwargs)

    monkeypatch.setattr(repository, "device_by_token", moving_token)
    async with runtime.sessions() as session:
        registration = await service.register_device(
            session=session,
            user_id=user_id,
            session_id=await session_of(runtime, user_id),
            platform=Platform.FCM,
            token="t",
            max_devices=5,
        )

    assert registration.created
    assert calls == 4


def test_mentions_follow_member_order_and_ignore_addresses() -> None:
    bob, carol = uuid.uuid4(), uuid.uuid4()
    members = [(bob, "bob"), (carol, "carol_2")]

    assert service.mentioned("@CAROL_2 @bob @bob", members) == [bob, carol]
    assert service.mentioned("mail bob@example.test or @bobby", members) == []
    assert service.mentioned("@bob.", members) == [bob]


@pytest.mark.parametrize("cursor", ["", "%%%", "bm90IGpzb24", "WyJ4IiwieSJd"])
def test_bad_cursors_are_invalid(cursor: str) -> None:
    with pytest.raises(ValueError, match="invalid cursor"):
        decode_cursor(cursor)


Message = MutableMapping[str, Any]


async def call(app: Any, headers: list[tuple[bytes, bytes]], body: bytes) -> list[Message]:
    sent: list[Message] = []
    chunks = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> Message:
        return chunks.pop(0) if chunks else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/x", "headers": headers}
    await app(scope, receive, send)
    return sent


async def echo(scope: Message, receive: Any, send: Any) -> None:
    message = await receive()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": message["body"]})


@pytest.mark.parametrize("length", [b"abc", b"-1", b"2048"])
async def test_a_bad_or_too_large_content_length_is_413(length: bytes) -> None:
    sent = await call(BodySizeLimit(echo, max_bytes=1024), [(b"content-length", length)], b"{}")

    assert sent[0]["status"] == 413


async def test_a_small_body_passes_the_limit() -> None:
    sent = await call(BodySizeLimit(echo, max_bytes=1024), [], b"x" * 1024)

    assert sent[0]["status"] == 200
    assert sent[1]["body"] == b"x" * 1024


async def test_an_error_after_the_response_started_is_only_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def fails_midway(scope: Message, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise ValueError("user@example.test said hello")

    with caplog.at_level(logging.ERROR):
        sent = await call(SafeErrors(fails_midway), [], b"")

    assert [m["type"] for m in sent] == ["http.response.start"]
    assert "ValueError" in caplog.text
    assert "user@example.test" not in caplog.text
