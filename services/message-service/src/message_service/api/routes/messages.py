"""A room's messages: posting (idempotent with a key) and reading, newest first."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Header, Query, Response

from message_service import service
from message_service.api.deps import Deps, Me, Poster, SessionDep
from message_service.api.responses import INVALID, NOT_FOUND
from message_service.api.schemas import PRINTABLE_ASCII, MessageCreate, MessageOut, MessagePageOut
from message_service.cursor import CURSOR_PATTERN
from message_service.models import IDEMPOTENCY_KEY_MAX

router = APIRouter(tags=["messages"])

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=IDEMPOTENCY_KEY_MAX,
        pattern=PRINTABLE_ASCII,
        description="Retrying with the same key returns the original message.",
    ),
]


@router.post("/rooms/{room_id}/messages", status_code=201, responses={**NOT_FOUND, **INVALID})
async def post_message(
    room_id: uuid.UUID,
    body: MessageCreate,
    me: Poster,
    deps: Deps,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> MessageOut:
    """Post a message. Its notifications are published afterwards, from the outbox: a broker
    outage delays them but never fails or slows this request."""
    posted = await service.post_message(
        engine=deps.engine,
        room_id=room_id,
        sender_id=me.id,
        content=body.content,
        idempotency_key=idempotency_key,
    )
    if posted.created:
        deps.nudge()  # committed: the relay may publish it now
    else:
        response.headers["Idempotent-Replayed"] = "true"
    return MessageOut.of(posted.message)


@router.get("/rooms/{room_id}/messages", responses={**NOT_FOUND, **INVALID})
async def list_messages(
    room_id: uuid.UUID,
    me: Me,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, description="At most 100 are returned.")] = 50,
    before: Annotated[
        str | None,
        Query(
            max_length=200,
            description="A `next_cursor` (one of the older, base64url form is still taken).",
            # Documented, not checked here: `decode_cursor` also reads the older form.
            json_schema_extra={"pattern": CURSOR_PATTERN},
        ),
    ] = None,
) -> MessagePageOut:
    """Messages newest first."""
    page = await service.list_messages(
        session=session, room_id=room_id, user_id=me.id, limit=limit, before=before
    )
    return MessagePageOut(
        items=[MessageOut.of(message) for message in page.items], next_cursor=page.next_cursor
    )
