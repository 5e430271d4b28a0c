"""Sessions: signing in and out, the caller's sessions, token rotation, and the password.

A sign-in is refused in the same time whether the username exists or not (the password is
checked against a stand-in hash when there is no account). Its budgets: every attempt spends one
of the IP's `SIGN_INS`; a wrong password spends one of the IP's `AUTH_FAILURES` (an IP over it
is refused at once, as for bad tokens) and one of the account's `SIGN_IN_FAILURES`, which is
checked before the password is: guessing one account's password from many addresses slows down
as much as from one. Attempts on one account take turns (`RateLimiter.in_turn`), so a burst of
guesses cannot all pass that check before the first wrong one has spent. The price is that
someone who knows a username can keep its owner from signing in for the window
(`RATE_LIMIT_SIGN_IN_FAILURES`); sessions already open keep working.
"""

from __future__ import annotations

import uuid

from fastapi import APIRouter, HTTPException, Request, status

from message_service import service
from message_service.api.deps import BuiltinAccounts, Deps, Me, SessionDep, caller_ip
from message_service.api.responses import (
    FORBIDDEN,
    FORBIDDEN_BUILTIN,
    INVALID,
    NOT_FOUND,
    UNAUTHORIZED_ANSWER,
)
from message_service.api.schemas import PasswordChange, SessionCreate, SessionOut, SessionStarted
from message_service.ratelimit import Budget, RateLimited

router = APIRouter(tags=["sessions"])

_WRONG_CREDENTIALS = "wrong username or password"


@router.post(
    "/sessions",
    status_code=201,
    dependencies=[BuiltinAccounts],
    responses={
        401: {**UNAUTHORIZED_ANSWER, "description": _WRONG_CREDENTIALS},
        **FORBIDDEN_BUILTIN,
        **INVALID,
    },
)
async def sign_in(
    body: SessionCreate, request: Request, session: SessionDep, deps: Deps
) -> SessionStarted:
    """Sign in: a new session, with its token (shown once)."""
    limiter, ip = deps.limiter, caller_ip(request, deps)
    if limiter.blocking:
        limiter.refuse_if_blocked(Budget.AUTH_FAILURES, ip)
    await limiter.hit(Budget.SIGN_INS, ip)
    async with limiter.in_turn(Budget.SIGN_IN_FAILURES, body.username):
        await limiter.check(Budget.SIGN_IN_FAILURES, body.username)
        account = await service.credentials_of(session=session, username=body.username)
        stored = account.password_hash if account is not None else None
        matched = await deps.passwords.verify(stored, body.password)  # also when there is no one
        if account is None or not matched:
            await _count_failure(deps, ip=ip, username=body.username)
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                _WRONG_CREDENTIALS,
                headers={"WWW-Authenticate": "Bearer"},
            )
    rehashed = None
    if stored is not None and deps.passwords.needs_rehash(stored):
        rehashed = await deps.passwords.hash(body.password)
    started = await service.start_session(
        session=session,
        user_id=account.user_id,
        ttl=deps.session_ttl,
        name=body.name,
        password_hash=rehashed,
    )
    return SessionStarted.of(started.auth_session, started.token)


async def _count_failure(deps: Deps, *, ip: str, username: str) -> None:
    """Spend the failure budgets of the IP and of the account (both, even when the first is
    over); 429 when either is."""
    refusal: RateLimited | None = None
    try:
        await deps.limiter.hit_and_block(Budget.AUTH_FAILURES, ip)
    except RateLimited as over:
        refusal = over
    try:
        await deps.limiter.hit(Budget.SIGN_IN_FAILURES, username)
    except RateLimited as over:
        refusal = refusal or over
    if refusal is not None:
        raise refusal


@router.delete("/sessions/current", status_code=204)
async def sign_out(me: Me, session: SessionDep) -> None:
    """End this session: its token stops working and the devices registered under it are
    removed (they receive nothing more for this account)."""
    await service.end_session(session=session, user_id=me.id, session_id=me.session_id)


@router.post("/sessions/current/rotate")
async def rotate_token(me: Me, session: SessionDep, deps: Deps) -> SessionStarted:
    """A new token for this session; the one of this request stops working at once. The
    session's devices stay registered."""
    started = await service.rotate_session(
        session=session, user_id=me.id, session_id=me.session_id, ttl=deps.session_ttl
    )
    return SessionStarted.of(started.auth_session, started.token)


@router.get("/users/me/sessions")
async def list_sessions(me: Me, session: SessionDep) -> list[SessionOut]:
    """Where you are signed in."""
    sessions = await service.list_sessions(session=session, user_id=me.id)
    return [SessionOut.of(each, current_id=me.session_id) for each in sessions]


@router.delete("/users/me/sessions/{session_id}", status_code=204, responses=NOT_FOUND)
async def end_session(session_id: uuid.UUID, me: Me, session: SessionDep) -> None:
    """Sign a session out (a lost phone), with its devices."""
    await service.end_session(session=session, user_id=me.id, session_id=session_id)


@router.put(
    "/users/me/password",
    status_code=204,
    dependencies=[BuiltinAccounts],
    responses={
        403: {
            **FORBIDDEN[403],
            "description": "A wrong current password, or accounts are the identity provider's",
        },
        **INVALID,
    },
)
async def change_password(body: PasswordChange, me: Me, session: SessionDep, deps: Deps) -> None:
    """Set a new password; every other session is signed out. A wrong `current_password` (403)
    counts as a failed sign-in of the account."""
    async with deps.limiter.in_turn(Budget.SIGN_IN_FAILURES, me.username):
        await deps.limiter.check(Budget.SIGN_IN_FAILURES, me.username)
        account = await service.credentials_of(session=session, username=me.username)
        stored = account.password_hash if account is not None else None
        if stored is not None and (
            body.current_password is None
            or not await deps.passwords.verify(stored, body.current_password)
        ):
            await deps.limiter.hit(Budget.SIGN_IN_FAILURES, me.username)
            raise service.Forbidden("the current password is not right")
    new_hash = await deps.passwords.hash(body.new_password)
    await service.change_password(
        session=session, user_id=me.id, keep_session_id=me.session_id, password_hash=new_hash
    )
