"""The caller's notification preferences."""

from __future__ import annotations

from fastapi import APIRouter

from message_service import service
from message_service.api.deps import Me, SessionDep
from message_service.api.responses import INVALID
from message_service.api.schemas import PreferencesBody, PreferencesOut

router = APIRouter(tags=["preferences"])


@router.get("/users/me/preferences")
async def read_preferences(me: Me, session: SessionDep) -> PreferencesOut:
    return PreferencesOut.of(await service.get_preferences(session=session, user_id=me.id))


@router.put("/users/me/preferences", responses=INVALID)
async def replace_preferences(body: PreferencesBody, me: Me, session: SessionDep) -> PreferencesOut:
    """Change your defaults: `push` and `email` levels (`all`, `mentions` - the default, DMs and
    mentions only - or `none`), `push_preview` and `email_delay`; fields left out keep their
    value. The older
    `push_enabled`, `email_enabled` and `muted_room_ids` are still taken; only rooms you are a
    member of can be muted."""
    view = await service.set_preferences(
        session=session,
        user_id=me.id,
        push=body.push,
        email=body.email,
        push_enabled=body.push_enabled,
        email_enabled=body.email_enabled,
        push_preview=body.push_preview,
        email_delay=body.email_delay,
        muted_room_ids=body.muted_room_ids,
    )
    return PreferencesOut.of(view)
