"""The caller's notification inbox: every message that concerned them, and per channel and
device what Herald did about it and why."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query

from message_service import service
from message_service.api.deps import Deps, Me, SessionDep
from message_service.api.responses import INVALID, NOT_FOUND
from message_service.api.schemas import (
    InboxItemOut,
    InboxPageOut,
    NotificationIdsRead,
    NotificationsReadBody,
    NotificationsReadOut,
    ReadOut,
)
from message_service.cursor import CURSOR_PATTERN

router = APIRouter(tags=["notifications"])


@router.get("/users/me/notifications", responses={**INVALID})
async def list_notifications(
    me: Me,
    deps: Deps,
    limit: Annotated[int, Query(ge=1, description="At most 100 are returned.")] = 50,
    cursor: Annotated[
        str | None,
        Query(
            max_length=200,
            description="A `next_cursor`: the page after it (older items).",
            pattern=CURSOR_PATTERN,
        ),
    ] = None,
    unread_only: Annotated[
        bool, Query(description="Only the items of messages you have not read.")
    ] = False,
) -> InboxPageOut:
    """Your inbox, newest first: one item per message (or invitation) that concerned you, also
    when nothing was sent, with who sent it, a preview (unless your `push_preview` is off),
    why it concerned you (`trigger`), whether you read it, and per channel and device its
    state (`pending`, `sent`, `suppressed`, `deferred`, `batched`, `cancelled`, `recalled`,
    `failed`), the reason code and the times. Items follow what happens within about a second
    (they are a projection of the router's decisions). A deleted message leaves the inbox."""
    page = await service.list_inbox(
        engine=deps.engine,
        user_id=me.id,
        limit=limit,
        cursor=cursor,
        unread_only=unread_only,
    )
    return InboxPageOut(
        items=[InboxItemOut.of(row) for row in page.items], next_cursor=page.next_cursor
    )


# `:uuid`: only an id names an item (`/users/me/notifications/read` is the route below).
@router.get("/users/me/notifications/{message_id:uuid}", responses={**NOT_FOUND})
async def get_notification(message_id: uuid.UUID, me: Me, deps: Deps) -> InboxItemOut:
    """Why (not)? What Herald did about one message for you, also when it sent nothing. A
    message you were never told of (another user's, or of a room you are not in) is a 404."""
    return InboxItemOut.of(
        await service.inbox_item(engine=deps.engine, user_id=me.id, message_id=message_id)
    )


@router.post("/users/me/notifications/read", responses={**INVALID})
async def read_notifications(
    body: NotificationsReadBody, me: Me, session: SessionDep
) -> NotificationsReadOut:
    """Mark items read (`ids`) or everything (`all: true`): in one go, each room's read marker
    moves forward to the newest of them there (as `PUT /rooms/{id}/read` does), so what still
    waits of those messages is not sent and their pushes are taken off your devices. Ids that
    are not in your inbox, or whose message was deleted, are passed over."""
    ids = body.ids if isinstance(body, NotificationIdsRead) else None
    markers = await service.read_notifications(session=session, user_id=me.id, message_ids=ids)
    return NotificationsReadOut(rooms=[ReadOut.of(marker) for marker in markers])
