"""A room's messages: posting (idempotent with a key), reading, newest first, and their
author's edits and deletes."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Header, Query, Response

from message_service import service
from message_service.api.deps import Deps, Me, Poster, SessionDep
from message_service.api.responses import CONFLICT, FORBIDDEN, INVALID, NOT_FOUND
from message_service.api.schemas import (
    PRINTABLE_ASCII,
    MessageCreate,
    MessageEdit,
    MessageOut,
    MessagePageOut,
)
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
        description=(
            "Retrying with the same key returns the original message (409 if it was deleted)."
        ),
    ),
]


@router.post(
    "/rooms/{room_id}/messages",
    status_code=201,
    responses={**NOT_FOUND, **CONFLICT, **INVALID},
)
async def post_message(
    room_id: uuid.UUID,
    body: MessageCreate,
    me: Poster,
    deps: Deps,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> MessageOut:
    """Post a message. Its notifications are published afterwards, from the outbox: a broker
    outage delays them but never fails or slows this request. The `Idempotency-Key` of a
    message since deleted is spent: 409, never the message again."""
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
    """Messages newest first (deleted ones are left out)."""
    page = await service.list_messages(
        session=session, room_id=room_id, user_id=me.id, limit=limit, before=before
    )
    return MessagePageOut(
        items=[MessageOut.of(message) for message in page.items], next_cursor=page.next_cursor
    )


@router.patch(
    "/rooms/{room_id}/messages/{message_id}",
    responses={**FORBIDDEN, **NOT_FOUND, **INVALID},
)
async def edit_message(
    room_id: uuid.UUID, message_id: uuid.UUID, body: MessageEdit, me: Poster, session: SessionDep
) -> MessageOut:
    """Change the text of a message you wrote (another member's: 403). The room's members are
    told (`event: message_edited`), and what still waits to notify of it tells the new text.
    The same text again changes nothing. Spends the posting budget."""
    message = await service.edit_message(
        session=session, room_id=room_id, message_id=message_id, user_id=me.id, content=body.content
    )
    return MessageOut.of(message)


@router.delete(
    "/rooms/{room_id}/messages/{message_id}",
    status_code=204,
    responses={**FORBIDDEN, **NOT_FOUND},
)
async def delete_message(
    room_id: uuid.UUID, message_id: uuid.UUID, me: Poster, session: SessionDep
) -> None:
    """Delete a message you wrote (another member's: 403): its text is erased, it is no longer
    listed nor counted unread, the room's members are told (`event: message_deleted`), and what
    still waits to notify of it is not sent. A message deleted already is a 404. Spends the
    posting budget."""
    await service.delete_message(
        session=session, room_id=room_id, message_id=message_id, user_id=me.id
    )
