"""Accounts: registration and the caller's profile (sessions and passwords: `sessions`)."""

from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import APIRouter

from message_service import service
from message_service.api.deps import (
    BuiltinAccounts,
    Deps,
    Me,
    Registrant,
    SessionDep,
    Verification,
)
from message_service.api.responses import (
    CONFLICT,
    FORBIDDEN_BUILTIN,
    INVALID,
    NOT_FOUND,
    link,
)
from message_service.api.schemas import BlockedOut, Registered, UserCreate, UserOut, UserPatch

router = APIRouter(tags=["users"])


@router.post(
    "/users",
    status_code=201,
    dependencies=[BuiltinAccounts, Registrant],
    responses={
        201: {
            "links": {
                "BlockUser": link(
                    "/users/me/blocked/{user_id}", "PUT", user_id="$response.body#/id"
                ),
                "UnblockUser": link(
                    "/users/me/blocked/{user_id}", "DELETE", user_id="$response.body#/id"
                ),
            }
        },
        **CONFLICT,
        **FORBIDDEN_BUILTIN,
        **INVALID,
    },
)
async def register(
    body: UserCreate, session: SessionDep, deps: Deps, verification: Verification
) -> Registered:
    """Create an account, signed in: the response holds its first session's token, which is
    never shown again. Each attempt spends one of the caller's IP's registration budget (429
    beyond it), and the answer, 201 or 409, comes no sooner than `REGISTRATION_MIN_SECONDS`
    after the request: how long it took does not tell whether the name was taken. The address
    gets a link that verifies it (`email_verified` of `GET /users/me`); until it is followed, no
    notification is e-mailed."""
    started = time.monotonic()
    try:
        password_hash = await deps.passwords.hash(body.password)
        registration = await service.register_user(
            session=session,
            username=body.username,
            display_name=body.display_name,
            email=body.email,
            password_hash=password_hash,
            session_ttl=deps.session_ttl,
            session_name=body.session_name,
            verification=verification,
        )
    finally:
        left = deps.registration_min_seconds - (time.monotonic() - started)
        if left > 0:
            await asyncio.sleep(left)
    user, first = registration.user, registration.started
    return Registered(
        id=user.id,
        username=user.username,
        display_name=user.display_name,
        token=first.token,
        session_id=first.auth_session.id,
        expires_at=first.auth_session.expires_at,
    )


@router.get("/users/me")
async def read_me(me: Me, session: SessionDep) -> UserOut:
    return UserOut.of(await service.get_profile(session=session, user_id=me.id))


@router.patch("/users/me", responses=INVALID)
async def update_me(
    body: UserPatch, me: Me, session: SessionDep, verification: Verification
) -> UserOut:
    """Change your display name or e-mail address. A new address is unverified until you follow
    the link sent to it: nothing is e-mailed to it before."""
    user = await service.update_profile(
        session=session,
        user_id=me.id,
        display_name=body.display_name,
        email=body.email,
        verification=verification,
    )
    return UserOut.of(user)


@router.delete("/users/me", status_code=204)
async def delete_me(me: Me, session: SessionDep) -> None:
    """Delete your account, at once: every session ends (its tokens stop working), your devices,
    settings, memberships, invitations, blocks and notification inbox are deleted, and every
    service forgets your address, devices and name within seconds. Your messages stay in their
    rooms, signed "Deleted user"; your username becomes free."""
    await service.delete_account(session=session, user_id=me.id)


@router.get("/users/me/blocked")
async def read_blocked(me: Me, session: SessionDep) -> BlockedOut:
    """The users you blocked."""
    return BlockedOut(user_ids=await service.blocked_users(session=session, user_id=me.id))


@router.put("/users/me/blocked/{user_id}", status_code=204, responses={**NOT_FOUND, **INVALID})
async def block_user(user_id: uuid.UUID, me: Me, session: SessionDep) -> None:
    """Block a user: their messages (direct ones too) no longer notify you, and they cannot
    invite you to rooms. They are not told."""
    await service.block(session=session, user_id=me.id, blocked_id=user_id)


@router.delete("/users/me/blocked/{user_id}", status_code=204)
async def unblock_user(user_id: uuid.UUID, me: Me, session: SessionDep) -> None:
    await service.unblock(session=session, user_id=me.id, blocked_id=user_id)
