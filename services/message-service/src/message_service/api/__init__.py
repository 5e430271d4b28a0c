"""The HTTP API: thin routes over `service.py`, one module per domain (`routes/`), their request
and response models (`schemas.py`) and dependencies (`deps.py`).

Every route but registration and the links of e-mails (unsubscribe, e-mail verification) needs
`Authorization: Bearer <token>`; the acting user always comes from the token.
"""

from __future__ import annotations

from fastapi import APIRouter

from message_service.api.routes import (
    devices,
    email_verification,
    events,
    messages,
    notifications,
    preferences,
    rooms,
    unsubscribe,
    users,
)

router = APIRouter()
for routes in (users, devices, preferences, rooms, messages, notifications, events, unsubscribe):
    router.include_router(routes.router)
router.include_router(email_verification.account)
router.include_router(email_verification.links)
