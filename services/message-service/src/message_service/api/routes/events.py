"""The caller's real-time stream (Server-Sent Events) and the room they have in view."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, status
from fastapi.responses import StreamingResponse

from message_service import service
from message_service.api.deps import Deps, Me, SessionDep
from message_service.api.responses import INVALID, NOT_FOUND
from message_service.api.schemas import PresenceBody
from message_service.repository import StreamPosition
from message_service.stream import InvalidPosition, parse_position

router = APIRouter(tags=["real-time"])

STREAM_DESCRIPTION = """\
A Server-Sent Events stream (`text/event-stream`) of what concerns you, as it happens:

* `event: message`: a new message in one of your rooms (yours included), shaped like an item of
  `GET /rooms/{id}/messages`;
* `event: message_edited`: its author changed a message of one of your rooms
  (`{id, room_id, content, edited_at}`);
* `event: message_deleted`: its author deleted a message of one of your rooms (`{id, room_id}`);
* `event: invitation`: you were invited to a room, shaped like an item of `GET /rooms`'s
  `invitations`;
* `event: read`: you read a room up to a message, on one of your devices (`{room_id, up_to,
  unread}`), so the others clear their unread count;
* `event: notifications`: items of your notification inbox that were added or changed state
  (`{items: [{message_id, room_id, trigger, created_at, decided_at, deliveries}], unread}`, each
  item's `deliveries` as in `GET /users/me/notifications`), within about a second of the change;
* `unread` (on `notifications` and `read`): your unread messages as the server reads the event,
  `{total, rooms: {<room id>: n}}`: in total (the app's badge) and in the rooms the event names;
* a comment line (`: heartbeat`) every 15 s.

The stream ends within a heartbeat of its session's end (signed out, on any device, or
expired); reconnecting then answers 401.

Every event has an `id`. After a lost connection, reconnect with the last one in the
`Last-Event-ID` header (browsers' `EventSource` does it by itself): you get every event after
it, in order and once, on whichever server you reach, for as long as the server keeps its
history (a day by default). Without it the stream starts from now.

While a stream is open you are online: e-mails wait until you have had no stream for 60 s, and
nothing notifies you of a message in the room in view (`active_room_id`, or `PUT
/users/me/presence`), which reached your screen.
"""


@router.get(
    "/users/me/events",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "The stream, until closed"},
        **NOT_FOUND,
        **INVALID,
    },
    description=STREAM_DESCRIPTION,
)
async def events(
    me: Me,
    deps: Deps,
    session: SessionDep,
    active_room_id: Annotated[
        uuid.UUID | None, Query(description="The room your client shows now, if any.")
    ] = None,
    last_event_id: Annotated[str | None, Header(max_length=40)] = None,
) -> StreamingResponse:
    after: StreamPosition | None = None
    if last_event_id is not None:
        try:
            after = parse_position(last_event_id)
        except InvalidPosition as exc:
            raise service.Invalid(str(exc)) from None
    if active_room_id is not None:
        await service.check_member(session=session, room_id=active_room_id, user_id=me.id)
    await session.close()  # the stream may last hours: its connection goes back to the pool
    hub = deps.streams
    stream = await hub.open(
        me.id, after=after, active_room_id=active_room_id, session_id=me.session_id
    )

    async def body() -> AsyncIterator[bytes]:
        try:
            async for frame in hub.frames(stream):
                yield frame
        finally:
            hub.close(stream)

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


@router.put(
    "/users/me/presence",
    status_code=status.HTTP_204_NO_CONTENT,
    responses={**NOT_FOUND, **INVALID},
)
async def set_presence(body: PresenceBody, me: Me, deps: Deps, session: SessionDep) -> None:
    """Say which room your client shows now (`null`: none). Nothing notifies you of a message in
    it while you have a stream open (`GET /users/me/events`)."""
    if body.active_room_id is not None:
        await service.check_member(session=session, room_id=body.active_room_id, user_id=me.id)
    await deps.streams.set_room_in_view(me.id, body.active_room_id)
