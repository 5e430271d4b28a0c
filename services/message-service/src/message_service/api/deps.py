"""What routes depend on, as `Annotated` aliases: `Deps` (the application's parts), `SessionDep`
(one session per request, committed by the use case), `Me` (the caller, from the bearer token)
and `Tokens` (the unsubscribe links' verifier)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from herald_shared.unsubscribe import UnsubscribeTokens, unsubscribe_tokens
from message_service import service
from message_service.outbox import Nudge, session_scope
from message_service.service import CurrentUser
from message_service.settings import Settings
from message_service.stream import StreamHub


@dataclass(frozen=True)
class ApiDeps:
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    nudge: Nudge
    max_devices_per_user: int
    webpush_allowed_hosts: tuple[str, ...]
    streams: StreamHub


def _deps(request: Request) -> ApiDeps:
    deps: ApiDeps = request.app.state.api_deps
    return deps


async def _session(deps: Annotated[ApiDeps, Depends(_deps)]) -> AsyncIterator[AsyncSession]:
    async with session_scope(deps.sessions, deps.nudge) as session:
        yield session


_bearer = HTTPBearer(auto_error=False, description="The token returned by `POST /users`.")


async def _current_user(
    deps: Annotated[ApiDeps, Depends(_deps)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> CurrentUser:
    if credentials is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "not authenticated",
            headers={"WWW-Authenticate": "Bearer"},
        )
    user = await service.authenticate(engine=deps.engine, token=credentials.credentials)
    if user is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "invalid token",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    return user


def _unsubscribe_tokens(request: Request) -> UnsubscribeTokens:
    """The verifier, built from the settings on first use."""
    state = request.app.state
    tokens: UnsubscribeTokens | None = getattr(state, "unsubscribe_tokens", None)
    if tokens is None:
        settings: Settings = state.service.settings
        tokens = state.unsubscribe_tokens = unsubscribe_tokens(settings.unsubscribe_secret)
    return tokens


Deps = Annotated[ApiDeps, Depends(_deps)]
SessionDep = Annotated[AsyncSession, Depends(_session)]
Me = Annotated[CurrentUser, Depends(_current_user)]
Tokens = Annotated[UnsubscribeTokens, Depends(_unsubscribe_tokens)]
