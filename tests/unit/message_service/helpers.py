"""Builders and readers for message-service's tests (imported by tests; never a conftest)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import FastAPI
from faststream.rabbit import TestRabbitBroker
from sqlmodel import col, select

from herald_shared.broker import RabbitSettings
from herald_shared.events import (
    EVENT_ADAPTER,
    Channel,
    InboxDelivery,
    InboxItem,
    InboxState,
    InvitationCreated,
    MessageCreated,
    SenderInfo,
    Trigger,
    UserUpdated,
    utc_now,
)
from message_service.app import MessageService, create_app, service_of
from message_service.models import OutboxEvent
from message_service.settings import Settings

# Nothing listens there: the in-memory broker never connects, and a real connection fails fast.
CLOSED_RABBITMQ_URL = "amqp://guest:secret-password@127.0.0.1:1/"
TEST_LINK_SECRET = "test-link-secret-0123456789abcdef-0123456789"


def make_settings(database_url: str, **overrides: Any) -> Settings:
    rabbitmq = overrides.pop("rabbitmq", None) or RabbitSettings(
        url=CLOSED_RABBITMQ_URL, publish_timeout=1.0
    )
    # Registration answers at once (its timing floor is tested on its own).
    # A secret of the tests' own: the e-mail verification links are signed with it, and none
    # of them writes the machine-local one into the working directory.
    values: dict[str, Any] = {
        "unsubscribe_secret": TEST_LINK_SECRET,
        "outbox_relay_interval": 0.05,
        "outbox_max_backoff": 0.2,
        "registration_min_seconds": 0.0,
    }
    values.update(overrides)
    return Settings(database_url=database_url, rabbitmq=rabbitmq, **values)


@asynccontextmanager
async def running_app(settings: Settings) -> AsyncIterator[FastAPI]:
    """The app with its lifespan (migrations, broker, relay) on the in-memory broker."""
    app = create_app(settings)
    async with TestRabbitBroker(service_of(app).broker), app.router.lifespan_context(app):
        yield app


def client_for(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


@dataclass(frozen=True)
class Account:
    id: uuid.UUID
    username: str
    token: str
    session_id: uuid.UUID

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


# Every test account's password (the strength rules are tested in test_sessions).
PASSWORD = "correct horse battery"


async def register(
    client: httpx.AsyncClient, username: str, *, email: str | None = None
) -> Account:
    response = await client.post(
        "/users",
        json={
            "username": username,
            "display_name": username.title(),
            "email": email or f"{username}@example.test",
            "password": PASSWORD,
        },
    )
    assert response.status_code == 201, response.text
    body = response.json()
    return Account(
        id=uuid.UUID(body["id"]),
        username=username,
        token=body["token"],
        session_id=uuid.UUID(body["session_id"]),
    )


async def sign_in(
    client: httpx.AsyncClient, username: str, *, password: str = PASSWORD, name: str | None = None
) -> Account:
    """Another session of a registered user (another of their devices)."""
    response = await client.post(
        "/sessions", json={"username": username, "password": password, "name": name}
    )
    assert response.status_code == 201, response.text
    body = response.json()
    return Account(
        id=uuid.UUID(body["user_id"]),
        username=username,
        token=body["token"],
        session_id=uuid.UUID(body["id"]),
    )


async def create_room(
    client: httpx.AsyncClient, owner: Account, members: Sequence[Account], name: str = "general"
) -> uuid.UUID:
    response = await client.post(
        "/rooms",
        json={"name": name, "member_ids": [str(member.id) for member in members]},
        headers=owner.headers,
    )
    assert response.status_code == 201, response.text
    room_id = uuid.UUID(response.json()["id"])
    for member in members:  # invited by the owner: members once they join
        joined = await client.post(f"/rooms/{room_id}/join", headers=member.headers)
        assert joined.status_code == 200, joined.text
    return room_id


async def outbox_rows(runtime: MessageService) -> list[OutboxEvent]:
    async with runtime.sessions() as session:
        statement = select(OutboxEvent).order_by(col(OutboxEvent.seq))
        return list((await session.exec(statement)).all())


async def user_updates(runtime: MessageService, user_id: uuid.UUID) -> list[UserUpdated]:
    events = [EVENT_ADAPTER.validate_json(row.payload) for row in await outbox_rows(runtime)]
    return [e for e in events if isinstance(e, UserUpdated) and e.user_id == user_id]


async def messages_created(runtime: MessageService) -> list[MessageCreated]:
    events = [EVENT_ADAPTER.validate_json(row.payload) for row in await outbox_rows(runtime)]
    return [e for e in events if isinstance(e, MessageCreated)]


async def invitations_created(runtime: MessageService) -> list[InvitationCreated]:
    events = [EVENT_ADAPTER.validate_json(row.payload) for row in await outbox_rows(runtime)]
    return [e for e in events if isinstance(e, InvitationCreated)]


def published(publisher_mock: Any) -> list[dict[str, Any]]:
    return [call.args[0] for call in publisher_mock.call_args_list]


def message_created(text: str = "hello") -> MessageCreated:
    """A MessageCreated about nobody in particular, for staging outbox rows directly."""
    sender = uuid.uuid4()
    return MessageCreated(
        message_id=uuid.uuid4(),
        room_id=uuid.uuid4(),
        sender_id=sender,
        recipient_ids=[uuid.uuid4()],
        message_content=text,
        sender_info=SenderInfo(user_id=sender, username="alice", display_name="Alice"),
        timestamp=utc_now(),
    )


async def inbox(client: httpx.AsyncClient, account: Account, **params: str) -> dict[str, Any]:
    response = await client.get("/users/me/notifications", params=params, headers=account.headers)
    assert response.status_code == 200, response.text
    page: dict[str, Any] = response.json()
    return page


def invitation_for(account: Account, room_id: uuid.UUID) -> InboxItem:
    """The router's item for an invitation of `account` to the room, made now (after the invite)."""
    now = utc_now()
    return InboxItem(
        user_id=account.id,
        message_id=uuid.uuid4(),  # the invitation's id
        room_id=room_id,
        trigger=Trigger.INVITATION,
        decided_at=now,
        message_created_at=now,
        deliveries=[
            InboxDelivery(
                channel=Channel.PUSH,
                device_id=uuid.uuid4(),
                state=InboxState.SENT,
                decided_at=now,
                accepted_at=now,
            )
        ],
    )


async def invite(client: httpx.AsyncClient, owner: Account, invitee: Account) -> uuid.UUID:
    response = await client.post(
        "/rooms", json={"name": "offsite", "member_ids": [str(invitee.id)]}, headers=owner.headers
    )
    assert response.status_code == 201, response.text
    return uuid.UUID(response.json()["id"])


def read_by_id(page: dict[str, Any]) -> dict[str, bool]:
    return {item["message_id"]: item["read"] for item in page["items"]}
