"""The HTTP API: request and response models and thin routes over `service.py`.

Every route but registration needs `Authorization: Bearer <token>`; the acting user always comes
from the token. Request models forbid unknown fields; response models list their fields
explicitly (no push token, no one else's e-mail address).
"""

from __future__ import annotations

import html
import re
import unicodedata
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import parse_qs, urlencode

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request, Response, status
from fastapi.responses import HTMLResponse
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

from herald_shared.events import (
    MAX_MESSAGE_CONTENT,
    MAX_RECIPIENTS,
    Platform,
    WebPushKeys,
    utc_now,
)
from herald_shared.unsubscribe import InvalidUnsubscribeToken, UnsubscribeTokens, unsubscribe_tokens
from message_service import service
from message_service.models import (
    DEVICE_TOKEN_MAX,
    DISPLAY_TEXT_MAX,
    EMAIL_MAX,
    IDEMPOTENCY_KEY_MAX,
    WEB_PUSH_AUTH_MAX,
    WEB_PUSH_P256DH_MAX,
    Device,
    Message,
    User,
)
from message_service.outbox import Nudge, session_scope
from message_service.service import CurrentUser, RoomView
from message_service.settings import Settings

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
# An APNs device token: 32 bytes in hex, stored in lower case so one device is one token.
ApnsToken = Annotated[
    str,
    StringConstraints(pattern=r"^[0-9A-Fa-f]{64}$"),
    AfterValidator(str.lower),
    Field(examples=["a" * 64]),
]


def _p256dh(value: str) -> str:
    if not service.is_p256_public_key(service.decode_base64url(value)):
        raise ValueError("must be the subscription's P-256 public key (65 bytes, base64url)")
    return value.rstrip("=")


def _auth_secret(value: str) -> str:
    if len(service.decode_base64url(value)) != 16:
        raise ValueError("must be the subscription's 16-byte auth secret (base64url)")
    return value.rstrip("=")


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


class FcmDeviceCreate(RequestBody):
    platform: Literal["fcm"]
    token: DeviceToken


class ApnsDeviceCreate(RequestBody):
    platform: Literal["apns"]
    token: ApnsToken


class WebPushKeysBody(RequestBody):
    p256dh: Annotated[
        str, StringConstraints(max_length=WEB_PUSH_P256DH_MAX), AfterValidator(_p256dh)
    ]
    auth: Annotated[
        str, StringConstraints(max_length=WEB_PUSH_AUTH_MAX), AfterValidator(_auth_secret)
    ]


class WebPushDeviceCreate(RequestBody):
    """A browser's `PushSubscription.toJSON()`, plus `"platform": "webpush"`. The endpoint must
    be on a known push service (`WEBPUSH_ALLOWED_HOSTS`)."""

    platform: Literal["webpush"]
    endpoint: DeviceToken
    keys: WebPushKeysBody
    # Part of toJSON(); the push service tells us when a subscription ends (404/410).
    expiration_time: float | None = Field(default=None, alias="expirationTime")


DeviceCreate = Annotated[
    FcmDeviceCreate | ApnsDeviceCreate | WebPushDeviceCreate, Field(discriminator="platform")
]


class PreferencesBody(RequestBody):
    push_enabled: StrictBool
    email_enabled: StrictBool
    # False: pushes name the sender and the room but never show the message's text.
    push_preview: StrictBool = True
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
    push_preview: bool
    muted_room_ids: list[uuid.UUID]

    @classmethod
    def of(cls, view: service.PreferencesView) -> PreferencesOut:
        return cls(
            push_enabled=view.push_enabled,
            email_enabled=view.email_enabled,
            push_preview=view.push_preview,
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
    webpush_allowed_hosts: tuple[str, ...]


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
    responses={
        200: {"description": "Already registered (refreshed)"},
        409: {"description": "Too many"},
        **_INVALID,
    },
)
async def register_device(
    body: DeviceCreate, me: Me, session: SessionDep, deps: Deps, response: Response
) -> DeviceOut:
    """Register a push token, or a browser's Web Push subscription (201); registering the same
    one again refreshes it and returns the device (200)."""
    if isinstance(body, WebPushDeviceCreate):
        service.check_web_push_endpoint(body.endpoint, allowed_hosts=deps.webpush_allowed_hosts)
        token = body.endpoint
        keys: WebPushKeys | None = WebPushKeys(p256dh=body.keys.p256dh, auth=body.keys.auth)
    else:
        token, keys = body.token, None
    registration = await service.register_device(
        session=session,
        user_id=me.id,
        platform=Platform(body.platform),
        token=token,
        web_push_keys=keys,
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
        push_preview=body.push_preview,
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


# --- unsubscribe (the link of the e-mails' List-Unsubscribe header) -----------------------------
#
# No bearer token here: the signed, expiring token in the link is the credential, and it names
# the one user whose e-mail notifications it turns off (herald_shared.unsubscribe). GET only
# shows a confirmation form, because mail scanners and link previews open links; the change is a
# POST: RFC 8058's one-click request from the mail client, or that form.

UnsubscribeToken = Annotated[
    str, Query(max_length=200, description="The signed token from the e-mail's link.")
]

# The page holds a credential in its URL: not cached, not indexed, not leaked as a Referer.
_PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Robots-Tag": "noindex",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'",
}
_UNSUBSCRIBE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/html": {}}},
    400: {"description": "Malformed, forged or expired link", "content": {"text/html": {}}},
}


def _unsubscribe_tokens(request: Request) -> UnsubscribeTokens:
    """The verifier, built from the settings on first use."""
    state = request.app.state
    tokens: UnsubscribeTokens | None = getattr(state, "unsubscribe_tokens", None)
    if tokens is None:
        settings: Settings = state.runtime.settings
        tokens = state.unsubscribe_tokens = unsubscribe_tokens(settings.unsubscribe_secret)
    return tokens


Tokens = Annotated[UnsubscribeTokens, Depends(_unsubscribe_tokens)]


def _page(title: str, body: str, *, status_code: int = 200) -> HTMLResponse:
    document = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title></head>"
        '<body style="font-family: sans-serif; max-width: 32em; margin: 3em auto;">'
        f"<h1>{html.escape(title)}</h1>{body}</body></html>\n"
    )
    return HTMLResponse(document, status_code=status_code, headers=_PAGE_HEADERS)


def _refused(error: InvalidUnsubscribeToken) -> HTMLResponse:
    reason = html.escape(error.reason[:1].upper() + error.reason[1:])
    return _page(
        "Link not valid",
        f"<p>{reason}. Nothing was changed. You can turn e-mail notifications off in your"
        " Herald settings.</p>",
        status_code=400,
    )


def is_one_click(content_type: str, body: bytes) -> bool:
    """Whether a POST body carries RFC 8058's `List-Unsubscribe=One-Click`, form-urlencoded or
    multipart/form-data (the two encodings the RFC allows)."""
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type == "application/x-www-form-urlencoded":
        fields = parse_qs(body.decode("latin-1"), keep_blank_values=True)
        return fields.get("List-Unsubscribe") == ["One-Click"]
    if media_type == "multipart/form-data":
        return (
            re.search(rb'name="List-Unsubscribe"\r?\n(?:[^\r\n]+\r?\n)*\r?\nOne-Click\r?\n', body)
            is not None
        )
    return False


@router.get(
    "/unsubscribe",
    tags=["unsubscribe"],
    response_class=HTMLResponse,
    responses=_UNSUBSCRIBE_RESPONSES,
)
async def unsubscribe_page(token: UnsubscribeToken, tokens: Tokens) -> HTMLResponse:
    """The e-mail's unsubscribe link, opened in a browser: a confirmation form. Changes nothing."""
    try:
        tokens.verify(token, now=utc_now())
    except InvalidUnsubscribeToken as exc:
        return _refused(exc)
    action = html.escape(f"unsubscribe?{urlencode({'token': token})}")
    return _page(
        "Turn off e-mail notifications?",
        f'<form method="post" action="{action}">'
        '<input type="hidden" name="List-Unsubscribe" value="One-Click">'
        '<button type="submit">Turn off e-mail notifications</button></form>'
        "<p>Push and in-app notifications stay as they are.</p>",
    )


@router.post(
    "/unsubscribe",
    tags=["unsubscribe"],
    response_class=HTMLResponse,
    responses=_UNSUBSCRIBE_RESPONSES,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/x-www-form-urlencoded": {"example": "List-Unsubscribe=One-Click"}
            },
        }
    },
)
async def unsubscribe(
    request: Request, token: UnsubscribeToken, tokens: Tokens, session: SessionDep
) -> HTMLResponse:
    """RFC 8058 one-click unsubscribe (body `List-Unsubscribe=One-Click`): turns the link's
    user's e-mail notifications off and publishes `user.updated`. Repeating it changes nothing."""
    try:
        user_id = tokens.verify(token, now=utc_now())
    except InvalidUnsubscribeToken as exc:
        return _refused(exc)
    if not is_one_click(request.headers.get("content-type", ""), await request.body()):
        return _refused(InvalidUnsubscribeToken("the request lacks List-Unsubscribe=One-Click"))
    await service.turn_email_off(session=session, user_id=user_id)
    return _page(
        "E-mail notifications are off",
        "<p>You will get no more e-mail notifications. You can turn them on again in your"
        " Herald settings.</p>",
    )
