"""Rooms and their members; a room is visible to its members only."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Response, status

from message_service import service
from message_service.api.deps import Me, SessionDep
from message_service.api.responses import INVALID, NOT_FOUND
from message_service.api.schemas import MemberAdd, RoomCreate, RoomOut

router = APIRouter(tags=["rooms"])


@router.post("/rooms", status_code=201, responses=INVALID)
async def create_room(body: RoomCreate, me: Me, session: SessionDep) -> RoomOut:
    """Create a room; you are a member of it, with the users listed."""
    view = await service.create_room(
        session=session, creator_id=me.id, name=body.name, member_ids=body.member_ids
    )
    return RoomOut.of(view)


@router.get("/rooms/{room_id}", responses=NOT_FOUND)
async def read_room(room_id: uuid.UUID, me: Me, session: SessionDep) -> RoomOut:
    return RoomOut.of(await service.get_room(session=session, room_id=room_id, user_id=me.id))


@router.post(
    "/rooms/{room_id}/members",
    status_code=201,
    responses={200: {"description": "Already a member"}, **NOT_FOUND, **INVALID},
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
