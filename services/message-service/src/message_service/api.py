"""The HTTP API: request and response models and thin routes over `service.py`.

Every route but registration needs `Authorization: Bearer <token>`; the acting user always comes
from the token. Request models forbid unknown fields; response models list their fields
explicitly (no push token, no one else's e-mail address).
"""

from __future__ import annotations

import re
import unicodedata
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request, Response, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StringConstraints,
    model_validator,
)
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from herald_shared.events import MAX_MESSAGE_CONTENT, MAX_RECIPIENTS, Platform
from message_service import service
from message_service.models import (
    DEVICE_TOKEN_MAX,
    DISPLAY_TEXT_MAX,
    EMAIL_MAX,
    IDEMPOTENCY_KEY_MAX,
    Device,
    Message,
    User,
)
from message_service.outbox import Nudge, session_scope
from message_service.service import CurrentUser, RoomView

# --- validation ---------------------------------------------------------------------------------

# Bidirectional overrides and isolates: invisible, and used to disguise names.
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
# The WHATWG HTML definition of a valid e-mail address (what browsers accept), with a dotted domain.
_EMAIL = re.compile(
    r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}"
    r"@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$"
)
_PRINTABLE_ASCII = r"^[\x21-\x7e]+$"


def _single_line(value: str) -> str:
    """Names end up in push titles and e-mail headers: no control characters, no line breaks."""
    for char in value:
        if unicodedata.category(char) in {"Cc", "Zl", "Zp"} or char in _BIDI_CONTROLS:
            raise ValueError("must not contain control characters or line breaks")
    return value


def _message_text(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be blank")
    for char in value:
        if unicodedata.category(char) == "Cc" and char not in "\t\n\r":
            raise ValueError("must not contain control characters")
    return value


def _email(value: str) -> str:
    if not _EMAIL.match(value):
        raise ValueError("is not a valid e-mail address")
    local, domain = value.rsplit("@", 1)
    return f"{local}@{domain.lower()}"


Username = Annotated[
    str, StringConstraints(pattern=r"^[a-z0-9_]{3,32}$"), Field(examples=["alice_01"])
]
DisplayText = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=DISPLAY_TEXT_MAX),
    AfterValidator(_single_line),
]
Email = Annotated[
    str,
    StringConstraints(strip_whitespace=True, max_length=EMAIL_MAX),
    AfterValidator(_email),
    Field(examples=["alice@example.com"]),
]
MessageText = Annotated[
    str,
    StringConstraints(min_length=1, max_length=MAX_MESSAGE_CONTENT),
    AfterValidator(_message_text),
]
DeviceToken = Annotated[
    str, StringConstraints(min_length=1, max_length=DEVICE_TOKEN_MAX, pattern=_PRINTABLE_ASCII)
]


class RequestBody(BaseModel):
    model_config = ConfigDict(extra="forbid")


class UserCreate(RequestBody):
    username: Username
    display_name: DisplayText
    email: Email


class UserPatch(RequestBody):
    display_name: DisplayText | None = None
    email: Email | None = None

    @model_validator(mode="after")
    def _no_nulls(self) -> UserPatch:
        for name in self.model_fields_set:
            if getattr(self, name) is None:
                raise ValueError(f"{name} cannot be null")
        return self


class DeviceCreate(RequestBody):
    platform: Literal["fcm"]
    token: DeviceToken


class PreferencesBody(RequestBody):
    push_enabled: StrictBool
    email_enabled: StrictBool
    muted_room_ids: list[uuid.UUID] = Field(max_length=MAX_RECIPIENTS)


class RoomCreate(RequestBody):
    name: DisplayText
    member_ids: list[uuid.UUID] = Field(default_factory=list, max_length=MAX_RECIPIENTS)


class MemberAdd(RequestBody):
    user_id: uuid.UUID


class MessageCreate(RequestBody):
    content: MessageText


class Registered(BaseModel):
    id: uuid.UUID
    username: str
    display_name: str
    token: str = Field(description="The API token. Shown once: only its hash is stored.")


class UserOut(BaseModel):
    id: uuid.UUID
    username: str
    display_name: str
    email: str
    created_at: datetime

    @classmethod
    def of(cls, user: User) -> UserOut:
        return cls(
            id=user.id,
            username=user.username,
            display_name=user.display_name,
            email=user.email,
            created_at=user.created_at,
        )


class DeviceOut(BaseModel):
    id: uuid.UUID
    platform: Platform
    created_at: datetime

    @classmethod
    def of(cls, device: Device) -> DeviceOut:
        return cls(id=device.id, platform=Platform(device.platform), created_at=device.created_at)


class PreferencesOut(BaseModel):
    push_enabled: bool
    email_enabled: bool
    muted_room_ids: list[uuid.UUID]

    @classmethod
    def of(cls, view: service.PreferencesView) -> PreferencesOut:
        return cls(
            push_enabled=view.push_enabled,
            email_enabled=view.email_enabled,
            muted_room_ids=view.muted_room_ids,
        )


class RoomOut(BaseModel):
    id: uuid.UUID
    name: str
    member_ids: list[uuid.UUID]
    created_at: datetime

    @classmethod
    def of(cls, view: RoomView) -> RoomOut:
        return cls(
            id=view.room.id,
            name=view.room.name,
            member_ids=view.member_ids,
            created_at=view.room.created_at,
        )


class MessageOut(BaseModel):
    id: uuid.UUID
    room_id: uuid.UUID
    sender_id: uuid.UUID
    content: str
    created_at: datetime

    @classmethod
    def of(cls, message: Message) -> MessageOut:
        return cls(
            id=message.id,
            room_id=message.room_id,
            sender_id=message.sender_id,
            content=message.content,
            created_at=message.created_at,
        )


class MessagePageOut(BaseModel):
    items: list[MessageOut]
    next_cursor: str | None = Field(
        description="Pass as `before` to get the next (older) page; null when there is none."
    )


# --- dependencies -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ApiDeps:
    sessions: async_sessionmaker[AsyncSession]
    nudge: Nudge
    max_devices_per_user: int


def _deps(request: Request) -> ApiDeps:
    deps: ApiDeps = request.app.state.api_deps
    return deps


async def _session(deps: Annotated[ApiDeps, Depends(_deps)]) -> AsyncIterator[AsyncSession]:
    async with session_scope(deps.sessions, deps.nudge) as session:
        yield session


_bearer = HTTPBearer(auto_error=False, description="The token returned by `POST /users`.")


async def _current_user(
    session: Annotated[AsyncSession, Depends(_session)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> CurrentUser:
    if credentials is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "not authenticated",
            headers={"WWW-Authenticate": "Bearer"},
        )
    user = await service.authenticate(session=session, token=credentials.credentials)
    if user is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "invalid token",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    return user


Deps = Annotated[ApiDeps, Depends(_deps)]
SessionDep = Annotated[AsyncSession, Depends(_session)]
Me = Annotated[CurrentUser, Depends(_current_user)]

_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "Not found (or not yours)"}}
_INVALID: dict[int | str, dict[str, Any]] = {422: {"description": "Invalid request"}}

router = APIRouter()

# --- users --------------------------------------------------------------------------------------


@router.post("/users", status_code=201, tags=["users"], responses={409: {"description": "Taken"}})
async def register(body: UserCreate, session: SessionDep) -> Registered:
    """Create an account. The response holds the API token, which is never shown again."""
    registration = await service.register_user(
        session=session, username=body.username, display_name=body.display_name, email=body.email
    )
    user = registration.user
    return Registered(
        id=user.id,
        username=user.username,
        display_name=user.display_name,
        token=registration.token,
    )


@router.get("/users/me", tags=["users"])
async def read_me(me: Me, session: SessionDep) -> UserOut:
    return UserOut.of(await service.get_profile(session=session, user_id=me.id))


@router.patch("/users/me", tags=["users"])
async def update_me(body: UserPatch, me: Me, session: SessionDep) -> UserOut:
    user = await service.update_profile(
        session=session, user_id=me.id, display_name=body.display_name, email=body.email
    )
    return UserOut.of(user)


@router.get("/users/me/devices", tags=["devices"])
async def list_devices(me: Me, session: SessionDep) -> list[DeviceOut]:
    devices = await service.list_devices(session=session, user_id=me.id)
    return [DeviceOut.of(device) for device in devices]


@router.post(
    "/users/me/devices",
    status_code=201,
    tags=["devices"],
    responses={200: {"description": "Already registered"}, 409: {"description": "Too many"}},
)
async def register_device(
    body: DeviceCreate, me: Me, session: SessionDep, deps: Deps, response: Response
) -> DeviceOut:
    """Register a push token (201); registering the same token again returns the device (200)."""
    registration = await service.register_device(
        session=session,
        user_id=me.id,
        platform=Platform(body.platform),
        token=body.token,
        max_devices=deps.max_devices_per_user,
    )
    if not registration.created:
        response.status_code = status.HTTP_200_OK
    return DeviceOut.of(registration.device)


@router.delete(
    "/users/me/devices/{device_id}", status_code=204, tags=["devices"], responses=_NOT_FOUND
)
async def delete_device(device_id: uuid.UUID, me: Me, session: SessionDep) -> None:
    await service.remove_device(session=session, user_id=me.id, device_id=device_id)


@router.get("/users/me/preferences", tags=["preferences"])
async def read_preferences(me: Me, session: SessionDep) -> PreferencesOut:
    return PreferencesOut.of(await service.get_preferences(session=session, user_id=me.id))


@router.put("/users/me/preferences", tags=["preferences"], responses=_INVALID)
async def replace_preferences(body: PreferencesBody, me: Me, session: SessionDep) -> PreferencesOut:
    """Replace all preferences; only rooms you are a member of can be muted."""
    view = await service.set_preferences(
        session=session,
        user_id=me.id,
        push_enabled=body.push_enabled,
        email_enabled=body.email_enabled,
        muted_room_ids=body.muted_room_ids,
    )
    return PreferencesOut.of(view)


# --- rooms --------------------------------------------------------------------------------------


@router.post("/rooms", status_code=201, tags=["rooms"], responses=_INVALID)
async def create_room(body: RoomCreate, me: Me, session: SessionDep) -> RoomOut:
    """Create a room; you are a member of it, with the users listed."""
    view = await service.create_room(
        session=session, creator_id=me.id, name=body.name, member_ids=body.member_ids
    )
    return RoomOut.of(view)


@router.get("/rooms/{room_id}", tags=["rooms"], responses=_NOT_FOUND)
async def read_room(room_id: uuid.UUID, me: Me, session: SessionDep) -> RoomOut:
    return RoomOut.of(await service.get_room(session=session, room_id=room_id, user_id=me.id))


@router.post(
    "/rooms/{room_id}/members",
    status_code=201,
    tags=["rooms"],
    responses={200: {"description": "Already a member"}, **_NOT_FOUND, **_INVALID},
)
async def add_member(
    room_id: uuid.UUID, body: MemberAdd, me: Me, session: SessionDep, response: Response
) -> RoomOut:
    """Add a user to a room you are a member of (201; 200 if they already were)."""
    change = await service.add_member(
        session=session, room_id=room_id, actor_id=me.id, user_id=body.user_id
    )
    if not change.added:
        response.status_code = status.HTTP_200_OK
    return RoomOut.of(change.room)


# --- messages -----------------------------------------------------------------------------------


@router.post(
    "/rooms/{room_id}/messages",
    status_code=201,
    tags=["messages"],
    responses={**_NOT_FOUND, **_INVALID},
)
async def post_message(
    room_id: uuid.UUID,
    body: MessageCreate,
    me: Me,
    session: SessionDep,
    response: Response,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=IDEMPOTENCY_KEY_MAX,
            pattern=_PRINTABLE_ASCII,
            description="Retrying with the same key returns the original message.",
        ),
    ] = None,
) -> MessageOut:
    """Post a message. Its notifications are published afterwards, from the outbox: a broker
    outage delays them but never fails or slows this request."""
    posted = await service.post_message(
        session=session,
        room_id=room_id,
        sender_id=me.id,
        content=body.content,
        idempotency_key=idempotency_key,
    )
    if not posted.created:
        response.headers["Idempotent-Replayed"] = "true"
    return MessageOut.of(posted.message)


@router.get("/rooms/{room_id}/messages", tags=["messages"], responses={**_NOT_FOUND, **_INVALID})
async def list_messages(
    room_id: uuid.UUID,
    me: Me,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, description="At most 100 are returned.")] = 50,
    before: Annotated[str | None, Query(max_length=200, description="A `next_cursor`.")] = None,
) -> MessagePageOut:
    """Messages newest first."""
    page = await service.list_messages(
        session=session, room_id=room_id, user_id=me.id, limit=limit, before=before
    )
    return MessagePageOut(
        items=[MessageOut.of(message) for message in page.items], next_cursor=page.next_cursor
    )
