"""The HTTP API: thin routes over `service.py`, one module per domain (`routes/`), their request
and response models (`schemas.py`) and dependencies (`deps.py`).

Every route but registration, sign-in and the unsubscribe link needs `Authorization: Bearer
<token>`, a session's token; the acting user always comes from the token.
"""

from __future__ import annotations

from fastapi import APIRouter

from message_service.api.routes import (
    devices,
    events,
    messages,
    notifications,
    preferences,
    rooms,
    sessions,
    unsubscribe,
    users,
)

router = APIRouter()
_DOMAINS = (
    users,
    sessions,
    devices,
    preferences,
    rooms,
    messages,
    notifications,
    events,
    unsubscribe,
)
for routes in _DOMAINS:
    router.include_router(routes.router)
