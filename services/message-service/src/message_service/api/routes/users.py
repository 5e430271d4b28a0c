"""Accounts: registration (the only route without a token) and the caller's profile."""

from __future__ import annotations

from fastapi import APIRouter

from message_service import service
from message_service.api.deps import Me, SessionDep
from message_service.api.schemas import Registered, UserCreate, UserOut, UserPatch

router = APIRouter(tags=["users"])


@router.post("/users", status_code=201, responses={409: {"description": "Taken"}})
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


@router.get("/users/me")
async def read_me(me: Me, session: SessionDep) -> UserOut:
    return UserOut.of(await service.get_profile(session=session, user_id=me.id))


@router.patch("/users/me")
async def update_me(body: UserPatch, me: Me, session: SessionDep) -> UserOut:
    user = await service.update_profile(
        session=session, user_id=me.id, display_name=body.display_name, email=body.email
    )
    return UserOut.of(user)
