"""The caller's notification preferences."""

from __future__ import annotations

from fastapi import APIRouter

from message_service import service
from message_service.api.deps import Me, SessionDep
from message_service.api.responses import INVALID
from message_service.api.schemas import PreferencesBody, PreferencesOut, SnoozeBody

router = APIRouter(tags=["preferences"])


@router.get("/users/me/preferences")
async def read_preferences(me: Me, session: SessionDep) -> PreferencesOut:
    return PreferencesOut.of(await service.get_preferences(session=session, user_id=me.id))


@router.put("/users/me/preferences", responses=INVALID)
async def replace_preferences(body: PreferencesBody, me: Me, session: SessionDep) -> PreferencesOut:
    """Change your defaults: `push` and `email` levels (`all`, `mentions` - the default, DMs and
    mentions only - or `none`), `push_preview`, `email_delay`, `quiet_hours` (null removes
    them) and `breakthrough_user_ids`; fields left out keep their value. The older
    `push_enabled`, `email_enabled` and `muted_room_ids` are still taken; only rooms you are a
    member of can be muted.

    Refused with 422: a level given in both forms, a room not yours, quiet hours whose `start`
    and `end` are the same or whose `time_zone` is not a known IANA name, and a breakthrough
    user that is not an existing user other than you."""
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
        quiet_hours=body.quiet_hours_change(),
        breakthrough_user_ids=body.breakthrough_user_ids,
    )
    return PreferencesOut.of(view)


@router.put("/users/me/snooze", responses=INVALID)
async def snooze(body: SnoozeBody, me: Me, session: SessionDep) -> PreferencesOut:
    """Do Not Disturb: pushes wait until `until`, then come as one summary per room (a direct
    message from a breakthrough user pushes at once). `null`, or a time passed, ends it; more
    than 7 days ahead is refused with 422. Answers with your preferences."""
    view = await service.snooze(session=session, user_id=me.id, until=body.until)
    return PreferencesOut.of(view)
