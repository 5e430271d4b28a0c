"""What routes depend on, as `Annotated` aliases: `Deps` (the application's parts), `SessionDep`
(one database session per request, committed by the use case), `Me` (the caller and their
session, from the bearer token, spending the token's budget), `Poster`, `RoomCreator`, `Inviter`
and `DeviceOwner` (the caller, spending their own budget for that instead), `Registrant` and
`Anonymous` (a call without a token, spending the IP's budget), `Tokens` (the unsubscribe
links' verifier) and `Verification` (how e-mail addresses are verified).

Rate limits (`message_service.ratelimit`): each request spends one budget (`POST /rooms` with
members also spends their invitations, in the route). A missing or unknown
token spends the IP's failed-authentication budget, and an IP over it is refused (429) before its
token is looked at."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CollectorRegistry, Counter
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from herald_shared.unsubscribe import UnsubscribeTokens, unsubscribe_tokens
from message_service import service
from message_service.email_verification import EmailVerification
from message_service.identity import InvalidAccessToken, looks_like_jwt
from message_service.outbox import Nudge, session_scope
from message_service.passwords import PasswordParameters, Passwords
from message_service.ratelimit import Budget, Network, RateLimiter, client_ip
from message_service.service import CurrentUser
from message_service.settings import Settings
from message_service.stream import StreamHub

if TYPE_CHECKING:
    from message_service.oidc import OidcVerifier


class ApiMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.device_moves = Counter(
            "herald_message_device_moves",
            "Push tokens registered by another user than the one they belonged to (the device "
            "changed hands; the previous owner's session on it was signed out).",
            registry=registry,
        )


@dataclass(frozen=True)
class ApiDeps:
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    nudge: Nudge
    max_devices_per_user: int
    webpush_allowed_hosts: tuple[str, ...]
    streams: StreamHub
    limiter: RateLimiter
    trusted_proxies: tuple[Network, ...] = ()
    registration_min_seconds: float = 0.0
    session_ttl: timedelta = timedelta(days=30)
    # An identity provider's access tokens are accepted when set; `builtin_accounts=False`:
    # only they are (no registration, passwords or Herald's own session tokens).
    oidc: OidcVerifier | None = None
    builtin_accounts: bool = True
    passwords: Passwords = field(default_factory=lambda: Passwords(PasswordParameters()))
    metrics: ApiMetrics = field(default_factory=lambda: ApiMetrics(CollectorRegistry()))


# Every dependency here is a coroutine function, even where it awaits nothing: FastAPI runs a
# plain function in its thread pool: a thread hop per request.


async def _deps(request: Request) -> ApiDeps:
    deps: ApiDeps = request.app.state.api_deps
    return deps


async def _session(deps: Annotated[ApiDeps, Depends(_deps)]) -> AsyncIterator[AsyncSession]:
    async with session_scope(deps.sessions, deps.nudge) as session:
        yield session


_bearer = HTTPBearer(
    auto_error=False,
    description="A session's token: what `POST /sessions` (sign in) or `POST /users` (register)"
    " returned.",
)


def caller_ip(request: Request, deps: ApiDeps) -> str:
    """The client's address: the peer's, or the one trusted proxies forwarded."""
    peer = request.client.host if request.client is not None else None
    return client_ip(peer, request.headers.getlist("x-forwarded-for"), deps.trusted_proxies)


async def _current_user(
    request: Request,
    deps: Annotated[ApiDeps, Depends(_deps)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> CurrentUser:
    limiter = deps.limiter
    if limiter.blocking:  # some address went over its budget here: is it this one?
        limiter.refuse_if_blocked(Budget.AUTH_FAILURES, caller_ip(request, deps))
    if credentials is None:
        await limiter.hit_and_block(Budget.AUTH_FAILURES, caller_ip(request, deps))
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "not authenticated",
            headers={"WWW-Authenticate": "Bearer"},
        )
    token = credentials.credentials
    if deps.oidc is not None and looks_like_jwt(token):
        return await _external_user(request, deps, deps.oidc, token)
    user = None
    if deps.builtin_accounts:
        user = await service.authenticate(
            engine=deps.engine, token=token, session_ttl=deps.session_ttl
        )
    if user is None:
        await limiter.hit_and_block(Budget.AUTH_FAILURES, caller_ip(request, deps))
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "invalid or expired token",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    return user


async def _external_user(
    request: Request, deps: ApiDeps, oidc: OidcVerifier, token: str
) -> CurrentUser:
    """The user of an identity provider's access token (made on first sight)."""
    try:
        identity = await oidc.verify(token)
    except InvalidAccessToken as invalid:
        await deps.limiter.hit_and_block(Budget.AUTH_FAILURES, caller_ip(request, deps))
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            f"invalid access token: {invalid.reason}",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        ) from None
    return await service.authenticate_external(
        engine=deps.engine,
        sessions=lambda: session_scope(deps.sessions, deps.nudge),
        identity=identity,
        session_ttl=deps.session_ttl,
    )


async def _builtin_accounts(deps: Annotated[ApiDeps, Depends(_deps)]) -> None:
    if not deps.builtin_accounts:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            "accounts are managed by the identity provider (BUILTIN_ACCOUNTS=false)",
        )


async def _session_user(
    deps: Annotated[ApiDeps, Depends(_deps)],
    user: Annotated[CurrentUser, Depends(_current_user)],
) -> CurrentUser:
    """The caller, having spent one of their session's budget (by its id: rotating the token
    does not refill it)."""
    if deps.limiter.enabled:
        await deps.limiter.hit(Budget.SESSION, str(user.session_id))
    return user


def _user_budget(budget: Budget) -> Callable[..., Awaitable[CurrentUser]]:
    async def spend(
        deps: Annotated[ApiDeps, Depends(_deps)],
        user: Annotated[CurrentUser, Depends(_current_user)],
    ) -> CurrentUser:
        await deps.limiter.hit(budget, str(user.id))
        return user

    return spend


def _ip_budget(budget: Budget) -> Callable[..., Awaitable[None]]:
    async def spend(request: Request, deps: Annotated[ApiDeps, Depends(_deps)]) -> None:
        if deps.limiter.enabled:
            await deps.limiter.hit(budget, caller_ip(request, deps))

    return spend


async def _unsubscribe_tokens(request: Request) -> UnsubscribeTokens:
    """The verifier, built from the settings on first use."""
    state = request.app.state
    tokens: UnsubscribeTokens | None = getattr(state, "unsubscribe_tokens", None)
    if tokens is None:
        settings: Settings = state.service.settings
        tokens = state.unsubscribe_tokens = unsubscribe_tokens(settings.unsubscribe_secret)
    return tokens


Deps = Annotated[ApiDeps, Depends(_deps)]
SessionDep = Annotated[AsyncSession, Depends(_session)]
Me = Annotated[CurrentUser, Depends(_session_user)]
Poster = Annotated[CurrentUser, Depends(_user_budget(Budget.POSTING))]
RoomCreator = Annotated[CurrentUser, Depends(_user_budget(Budget.ROOMS))]
Inviter = Annotated[CurrentUser, Depends(_user_budget(Budget.INVITATIONS))]
DeviceOwner = Annotated[CurrentUser, Depends(_user_budget(Budget.DEVICES))]
Registrant = Depends(_ip_budget(Budget.REGISTRATION))
BuiltinAccounts = Depends(_builtin_accounts)
Anonymous = Depends(_ip_budget(Budget.ANONYMOUS))
Tokens = Annotated[UnsubscribeTokens, Depends(_unsubscribe_tokens)]


async def _email_verification(request: Request) -> EmailVerification:
    verification: EmailVerification = request.app.state.email_verification
    return verification


# How addresses are verified: the links' tokens and the limits (`email_verification`).
Verification = Annotated[EmailVerification, Depends(_email_verification)]
