"""The HTTP API: thin routes over `service.py`, one module per domain (`routes/`), their request
and response models (`schemas.py`) and dependencies (`deps.py`).

Every route but registration, sign-in and the links of e-mails (unsubscribe, e-mail
verification) needs `Authorization: Bearer <token>`, a session's token (or an identity
provider's access token); the acting user always comes from the token.
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
router.include_router(email_verification.account)
router.include_router(email_verification.links)
