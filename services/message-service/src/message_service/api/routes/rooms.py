"""Rooms and their members; a room is visible to its members only."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Response, status

from herald_shared.events import Level
from message_service import service
from message_service.api.deps import Deps, Inviter, Me, RoomCreator, SessionDep
from message_service.api.responses import CONFLICT, INVALID, NOT_FOUND, ROOM_LINKS
from message_service.api.schemas import (
    DirectRoomCreate,
    MemberAdd,
    MyRoomsOut,
    ReadBody,
    ReadOut,
    RoomCreate,
    RoomNotificationsBody,
    RoomNotificationsOut,
    RoomOut,
)
from message_service.ratelimit import Budget

router = APIRouter(tags=["rooms"])


@router.post(
    "/rooms",
    status_code=201,
    responses={
        201: {"links": ROOM_LINKS},
        200: {"description": "The direct room of this pair, opened before", "links": ROOM_LINKS},
        **INVALID,
    },
)
async def create_room(
    body: RoomCreate, me: RoomCreator, deps: Deps, session: SessionDep, response: Response
) -> RoomOut:
    """Create a group room (you are a member of it, with the users listed), or open the direct
    room with one user (`kind: direct`): a pair has one, so opening it again answers 200 with
    the same room."""
    if isinstance(body, DirectRoomCreate):
        opened = await service.open_direct_room(
            session=session, user_id=me.id, other_id=body.member_ids[0]
        )
        if not opened.created:
            response.status_code = status.HTTP_200_OK
        return RoomOut.of(opened.room)
    if body.member_ids:  # each member listed is invited: one of the invitations budget each
        await deps.limiter.hit(Budget.INVITATIONS, str(me.id), cost=len(body.member_ids))
    view = await service.create_room(
        session=session, creator_id=me.id, name=body.name, member_ids=body.member_ids
    )
    return RoomOut.of(view)


@router.get("/rooms")
async def list_rooms(me: Me, session: SessionDep) -> MyRoomsOut:
    """The rooms you are a member of, and the ones you are invited to, newest first."""
    return MyRoomsOut.of(await service.my_rooms(session=session, user_id=me.id))


@router.post("/rooms/{room_id}/join", responses={200: {"links": ROOM_LINKS}, **NOT_FOUND})
async def join_room(room_id: uuid.UUID, me: Me, session: SessionDep) -> RoomOut:
    """Accept an invitation: from now on the room's messages reach you."""
    return RoomOut.of(await service.join_room(session=session, room_id=room_id, user_id=me.id))


@router.put("/rooms/{room_id}/read", responses={**NOT_FOUND, **INVALID})
async def mark_read(room_id: uuid.UUID, body: ReadBody, me: Me, session: SessionDep) -> ReadOut:
    """You have read the room up to this message (on some device): your unread count starts
    after it, and what was waiting to notify you of the room up to there is no longer sent. A
    marker only moves forward: an older one (a device that was behind) changes nothing. A
    message that is not in this room is refused with 422."""
    marker = await service.mark_read(
        session=session, room_id=room_id, user_id=me.id, message_id=body.up_to
    )
    return ReadOut.of(marker)


@router.post("/rooms/{room_id}/leave", status_code=204, responses={**NOT_FOUND, **INVALID})
async def leave_room(room_id: uuid.UUID, me: Me, session: SessionDep) -> None:
    """Leave a room, or decline its invitation: nothing more reaches you from it."""
    await service.leave_room(session=session, room_id=room_id, user_id=me.id)


@router.get("/rooms/{room_id}", responses=NOT_FOUND)
async def read_room(room_id: uuid.UUID, me: Me, session: SessionDep) -> RoomOut:
    return RoomOut.of(await service.get_room(session=session, room_id=room_id, user_id=me.id))


@router.post(
    "/rooms/{room_id}/members",
    status_code=201,
    responses={200: {"description": "Already a member"}, **NOT_FOUND, **CONFLICT, **INVALID},
)
async def add_member(
    room_id: uuid.UUID, body: MemberAdd, me: Inviter, session: SessionDep, response: Response
) -> RoomOut:
    """Invite a user to a room you are a member of (201; 200 if they already were in it or
    invited): they hear nothing from it until they join."""
    change = await service.add_member(
        session=session, room_id=room_id, actor_id=me.id, user_id=body.user_id
    )
    if not change.added:
        response.status_code = status.HTTP_200_OK
    return RoomOut.of(change.room)


@router.get("/rooms/{room_id}/notifications", responses=NOT_FOUND)
async def read_room_notifications(
    room_id: uuid.UUID, me: Me, session: SessionDep
) -> RoomNotificationsOut:
    """Your notification settings for a room you are a member of."""
    view = await service.get_room_notifications(session=session, user_id=me.id, room_id=room_id)
    return RoomNotificationsOut.of(view)


@router.put("/rooms/{room_id}/notifications", responses={**NOT_FOUND, **INVALID})
async def replace_room_notifications(
    room_id: uuid.UUID, body: RoomNotificationsBody, me: Me, session: SessionDep
) -> RoomNotificationsOut:
    """Replace your settings for a room: a level per channel (`default` follows your
    preferences) and a mute until a time (a personal mention still notifies; null: not
    muted)."""
    view = await service.set_room_notifications(
        session=session,
        user_id=me.id,
        room_id=room_id,
        push=None if body.push == "default" else Level(body.push),
        email=None if body.email == "default" else Level(body.email),
        muted_until=body.muted_until,
    )
    return RoomNotificationsOut.of(view)
