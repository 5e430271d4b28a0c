"""The operators' "why (not)?": `GET /ops/notifications?message_id=&user_id=` answers what the
router decided for one user and one message (or invitation) and what became of each delivery,
from the ledger: the trigger, each channel's decision with its reason (`skipped:muted`,
`skipped:active_in_room`, …), each push device's and the e-mail's status and the provider's
reason, and when. No message text, address or token: the ledger holds none.

Protected by its own credential, `OPS_TOKEN` (a bearer token compared in constant time), never
a user's token; without one set, the endpoint does not exist (404).
"""

from __future__ import annotations

import hmac
import json
import uuid
from typing import Any
from urllib.parse import parse_qs

from faststream.asgi import AsgiResponse, get
from faststream.asgi.types import ASGIApp, Scope
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncEngine

from notification_router import repository

PATH = "/ops/notifications"


def _json(body: Any, status: int) -> AsgiResponse:
    return AsgiResponse(
        json.dumps(body).encode(),
        status,
        headers={"content-type": "application/json", "cache-control": "no-store"},
    )


def _bearer(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return ""


def explain_route(engine: AsyncEngine, token: SecretStr | None) -> tuple[str, ASGIApp]:
    expected = token.get_secret_value().encode() if token is not None else None

    @get(include_in_schema=False)
    async def explain(scope: Scope) -> AsgiResponse:
        if not expected:
            return _json({"detail": "not found"}, 404)
        if not hmac.compare_digest(_bearer(scope).encode(), expected):
            return _json({"detail": "an operator token is needed"}, 401)
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        try:
            message_id = uuid.UUID(query["message_id"][0])
            user_id = uuid.UUID(query["user_id"][0])
        except (KeyError, ValueError):
            return _json({"detail": "message_id and user_id are needed, as UUIDs"}, 400)
        found = await repository.explain(engine, message_id=message_id, user_id=user_id)
        if found is None:
            return _json({"detail": "the router decided nothing for this user and message"}, 404)
        return _json(found, 200)

    return PATH, explain
