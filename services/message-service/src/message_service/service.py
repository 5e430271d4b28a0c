"""Use cases: each one is a transaction, with keyword-only arguments and the acting user's id
taken from authentication, never from a request body.

A change that notification routing cares about (registration, e-mail, display name, devices,
preferences) bumps the user's `version` and stages a full `UserUpdated` snapshot in the same
transaction; a new message stages its `MessageCreated`, an edit its `MessageEdited`, a delete
its `MessageDeleted`. The outbox relay publishes them after commit, so an event exists if and
only if its change was committed.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import uuid
import zoneinfo
from collections.abc import Callable, Collection, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum
from functools import cache
from typing import Final, Literal

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel.ext.asyncio.session import AsyncSession

from herald_shared.database import autocommit
from herald_shared.events import (
    MAX_RECIPIENTS,
    DeviceSnapshot,
    EmailBounced,
    InvitationCreated,
    Level,
    MessageCreated,
    MessageDeleted,
    MessageEdited,
    Platform,
    PreferencesSnapshot,
    QuietHoursSnapshot,
    RoomKind,
    RoomLeft,
    RoomRead,
    RoomSettingsSnapshot,
    SenderInfo,
    UserUpdated,
    WebPushKeys,
    address_digest,
    utc_now,
)
from herald_shared.webpush import endpoint_problem
from message_service import email_verification, repository
from message_service.cursor import decode_cursor, encode_cursor
from message_service.email_verification import (
    EmailVerification,
    InvalidVerificationToken,
    bounces_unverify,
    retry_after_seconds,
)
from message_service.identity import Identity
from message_service.models import (
    MEMBER,
    MUTED_FOREVER,
    AuthSession,
    Device,
    Message,
    Preferences,
    Room,
    RoomMember,
    RoomSettings,
    User,
)

MAX_ROOM_MEMBERS = MAX_RECIPIENTS
MAX_PAGE_SIZE = 100
# `@name` not preceded by a word character (so an e-mail address is not a mention).
MENTION = re.compile(r"(?<![\w@])@([A-Za-z0-9_]{3,32})(?![A-Za-z0-9_])")
# The names that mention a whole room, as `@room` or `@all`.
ROOM_MENTIONS = frozenset({"room", "all"})
# How often a registration retries after losing a race for the same push token.
_DEVICE_RACE_ATTEMPTS = 3
# Do Not Disturb is for a while (a meeting, a night, a holiday week), not for ever.
MAX_SNOOZE = timedelta(days=7)
MAX_BREAKTHROUGH_USERS = 100

logger = logging.getLogger("message_service")


class ServiceError(Exception):
    """An expected failure of a use case; `detail` is shown to the caller and holds no data of
    anyone else."""

    status_code = 400

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class Forbidden(ServiceError):
    """Something of someone else's that the caller may see but not change."""

    status_code = 403


class NotFound(ServiceError):
    status_code = 404


class Conflict(ServiceError):
    status_code = 409


class Invalid(ServiceError):
    status_code = 422


class TooSoon(ServiceError):
    """Asked again before the wait is over: 429, with `Retry-After`."""

    status_code = 429

    def __init__(self, detail: str, *, retry_after: int) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


@dataclass(frozen=True)
class CurrentUser:
    """Who is calling, as established from the bearer token: a user, in one of their
    sessions."""

    id: uuid.UUID
    username: str
    session_id: uuid.UUID


@dataclass(frozen=True)
class StartedSession:
    auth_session: AuthSession
    token: str  # shown once; only its hash is stored


@dataclass(frozen=True)
class Registration:
    user: User
    started: StartedSession


@dataclass(frozen=True)
class DeviceRegistration:
    device: Device
    created: bool
    # The user the token belonged to until now (the device changed hands), if anyone.
    moved_from: uuid.UUID | None = None


class Keep(Enum):
    """A preference left out of a change: it keeps its value (where None means "none")."""

    KEEP = "keep"


KEEP: Final = Keep.KEEP


@dataclass(frozen=True)
class QuietHours:
    """Daily, from `start` to `end` ("HH:MM") on the wall clock of `time_zone` (an IANA name);
    an `end` before `start` ends the next day."""

    start: str
    end: str
    time_zone: str


@dataclass(frozen=True)
class PreferencesView:
    push: Level
    email: Level
    push_preview: bool
    # Seconds e-mail waits, gathering one digest (`herald_shared.events.EMAIL_DELAYS`).
    email_delay: int
    # The rooms muted with no end (the older form of muting; `RoomNotificationsView` has all).
    muted_room_ids: list[uuid.UUID]
    quiet_hours: QuietHours | None
    # Do Not Disturb until then; None: not snoozed (or no longer).
    snoozed_until: datetime | None
    # Whose direct messages push at once even in quiet hours or Do Not Disturb, by id.
    breakthrough_user_ids: list[uuid.UUID]


@dataclass(frozen=True)
class RoomNotificationsView:
    """A user's settings for one room; None: their default level, or not muted."""

    room_id: uuid.UUID
    push: Level | None
    email: Level | None
    muted_until: datetime | None


@dataclass(frozen=True)
class RoomView:
    room: Room
    member_ids: list[uuid.UUID]


@dataclass(frozen=True)
class DirectRoom:
    room: RoomView
    created: bool  # False: the pair's direct room existed already


@dataclass(frozen=True)
class MembershipChange:
    room: RoomView
    added: bool


@dataclass(frozen=True)
class PostedMessage:
    message: Message
    created: bool  # False: an earlier request with the same Idempotency-Key created it


@dataclass(frozen=True)
class MessagePage:
    items: Sequence[Message]
    next_cursor: str | None


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# How stale a session's recorded last use may get before a request records it again: sliding
# the expiry costs one write a minute per active session, not one per request.
SESSION_TOUCH_INTERVAL = timedelta(minutes=1)


# --- users and sessions -------------------------------------------------------------------------


async def register_user(
    *,
    session: AsyncSession,
    username: str,
    display_name: str,
    email: str,
    password_hash: str,
    session_ttl: timedelta,
    verification: EmailVerification,
    session_name: str | None = None,
) -> Registration:
    """Create the account and its first session."""
    user = User(
        username=username,
        display_name=display_name,
        email=email,
        password_hash=password_hash,
        version=1,
    )
    try:
        await repository.add_user(session, user=user)
        await email_verification.address_set(session, user, verification, now=utc_now())
        started = await _start_session(session, user_id=user.id, ttl=session_ttl, name=session_name)
        await _stage_user_updated(session, user)
        await session.commit()
    except IntegrityError as exc:
        await session.rollback()
        raise Conflict("username is taken") from exc
    return Registration(user=user, started=started)


async def authenticate(
    *, engine: AsyncEngine, token: str, session_ttl: timedelta, now: datetime | None = None
) -> CurrentUser | None:
    """The token's user and session, if the session has not expired; a use slides its expiry to
    `session_ttl` from now (recorded at most once per `SESSION_TOUCH_INTERVAL`)."""
    now = now or utc_now()
    async with autocommit(engine) as connection:
        found = await repository.user_for_token(connection, token_hash=hash_token(token), now=now)
        if found is None:
            return None
        if now - found.last_used_at >= SESSION_TOUCH_INTERVAL:
            await repository.touch_session(
                connection, session_id=found.session_id, now=now, expires_at=now + session_ttl
            )
    return CurrentUser(id=found.user_id, username=found.username, session_id=found.session_id)


@dataclass(frozen=True)
class Credentials:
    user_id: uuid.UUID
    password_hash: str | None


def external_session_key(issuer: str, subject: str, provider_session: str | None) -> str:
    """Where an identity provider's session is found in `auth_sessions.token_hash`. It starts
    with `oidc:`, which no SHA-256 in hex (a token's hash) does, so no bearer token can ever be
    looked up as one."""
    digest = hashlib.sha256(f"{issuer}\0{subject}\0{provider_session or ''}".encode()).hexdigest()
    return f"oidc:{digest[:59]}"


async def authenticate_external(
    *,
    engine: AsyncEngine,
    sessions: Callable[[], AbstractAsyncContextManager[AsyncSession]],
    identity: Identity,
    session_ttl: timedelta,
) -> CurrentUser:
    """The user of a verified access token, made on first sight (an account and a session per
    provider session); afterwards one read, like a session token's."""
    key = external_session_key(identity.issuer, identity.subject, identity.session)
    for _ in range(3):
        now = utc_now()
        async with autocommit(engine) as connection:
            found = await repository.user_for_token(connection, token_hash=key, now=now)
            if found is not None:
                if now - found.last_used_at >= SESSION_TOUCH_INTERVAL:
                    await repository.touch_session(
                        connection,
                        session_id=found.session_id,
                        now=now,
                        expires_at=now + session_ttl,
                    )
                return CurrentUser(found.user_id, found.username, found.session_id)
        async with sessions() as session:
            try:
                await _first_sight(session, identity=identity, key=key, ttl=session_ttl)
            except IntegrityError:
                await session.rollback()  # another request made it first: read it again
    raise Conflict("the account is being created concurrently; try again")


async def _first_sight(
    session: AsyncSession, *, identity: Identity, key: str, ttl: timedelta
) -> None:
    user_id = await repository.user_of_identity(
        session, issuer=identity.issuer, subject=identity.subject
    )
    if user_id is None:
        user = User(
            username=await _free_username(session, identity.username or identity.subject),
            display_name=_display_name(identity.name or identity.username),
            email=identity.email or "",
            # The provider verified it (`email_verified`), or there is none.
            email_verified_at=utc_now() if identity.email else None,
            version=1,
        )
        await repository.add_user(session, user=user)
        await repository.add_identity(
            session, issuer=identity.issuer, subject=identity.subject, user_id=user.id
        )
        await _stage_user_updated(session, user)
        user_id = user.id
        logger.info("message_service.account.created_from_identity_provider user_id=%s", user_id)
    now = utc_now()
    await repository.add_session(
        session,
        auth_session=AuthSession(
            user_id=user_id,
            token_hash=key,
            name="identity provider",
            created_at=now,
            last_used_at=now,
            expires_at=now + ttl,
        ),
    )
    await session.commit()


async def _free_username(session: AsyncSession, hint: str) -> str:
    """A username like the provider's (`preferred_username`, else the subject) that no one has:
    lowercased, other characters made `_`, then a short random suffix if taken."""
    base = re.sub(r"[^a-z0-9_]", "_", hint.lower())[:24].strip("_") or "user"
    base = base if len(base) >= 3 else f"{base}_user"
    candidates = [base] + [f"{base}_{secrets.token_hex(3)}" for _ in range(5)]
    for candidate in candidates:
        if candidate not in ROOM_MENTIONS and not await repository.user_by_username(
            session, username=candidate
        ):
            return candidate
    raise Conflict("no free username; try again")


def _display_name(name: str | None) -> str:
    cleaned = " ".join("".join(c for c in (name or "") if c.isprintable()).split())
    return cleaned[:100] or "User"


async def credentials_of(*, session: AsyncSession, username: str) -> Credentials | None:
    """What a sign-in is checked against (by the caller, off the event loop); the transaction
    ends here, so nothing is held while the password is hashed."""
    user = await repository.user_by_username(session, username=username)
    credentials = None if user is None else Credentials(user.id, user.password_hash)
    await session.rollback()
    return credentials


async def start_session(
    *,
    session: AsyncSession,
    user_id: uuid.UUID,
    ttl: timedelta,
    name: str | None = None,
    password_hash: str | None = None,
) -> StartedSession:
    """A new session of a user whose password was checked; `password_hash`, when given,
    replaces the stored one (made with today's parameters)."""
    user = await _lock_user(session, user_id)
    if password_hash is not None:
        user.password_hash = password_hash
    started = await _start_session(session, user_id=user_id, ttl=ttl, name=name)
    await session.commit()
    return started


async def _start_session(
    session: AsyncSession, *, user_id: uuid.UUID, ttl: timedelta, name: str | None
) -> StartedSession:
    token = secrets.token_urlsafe(32)
    now = utc_now()
    auth_session = AuthSession(
        user_id=user_id,
        token_hash=hash_token(token),
        name=name,
        created_at=now,
        last_used_at=now,
        expires_at=now + ttl,
    )
    await repository.add_session(session, auth_session=auth_session)
    return StartedSession(auth_session=auth_session, token=token)


async def list_sessions(*, session: AsyncSession, user_id: uuid.UUID) -> Sequence[AuthSession]:
    return await repository.sessions_of(session, user_id=user_id)


async def rotate_session(
    *, session: AsyncSession, user_id: uuid.UUID, session_id: uuid.UUID, ttl: timedelta
) -> StartedSession:
    """A new token for the session (the old one stops working at once); its devices stay."""
    await _lock_user(session, user_id)
    auth_session = await repository.session_of(session, user_id=user_id, session_id=session_id)
    if auth_session is None:
        raise NotFound("session not found")
    token = secrets.token_urlsafe(32)
    now = utc_now()
    auth_session.token_hash = hash_token(token)
    auth_session.last_used_at = now
    auth_session.expires_at = now + ttl
    await session.commit()
    return StartedSession(auth_session=auth_session, token=token)


async def end_session(*, session: AsyncSession, user_id: uuid.UUID, session_id: uuid.UUID) -> None:
    """Sign the session out; the devices registered under it are removed with it."""
    user = await _lock_user(session, user_id)
    ended = await _end_sessions(session, user, {session_id})
    if not ended:
        await session.rollback()
        raise NotFound("session not found")
    await session.commit()


async def change_password(
    *,
    session: AsyncSession,
    user_id: uuid.UUID,
    keep_session_id: uuid.UUID,
    password_hash: str,
) -> int:
    """Set the password (its current one was checked by the caller) and sign out every other
    session, as someone who changes a password they think was stolen expects. Returns how many
    sessions ended."""
    user = await _lock_user(session, user_id)
    user.password_hash = password_hash
    others = {s.id for s in await repository.sessions_of(session, user_id=user_id)}
    others.discard(keep_session_id)
    ended = await _end_sessions(session, user, others)
    await session.commit()
    return ended


async def _end_sessions(
    session: AsyncSession, user: User, session_ids: Collection[uuid.UUID]
) -> int:
    """Delete the sessions and their devices (the user is locked); when a device went, the
    router learns it through the user's new snapshot. How many sessions ended."""
    ended, devices = await repository.delete_sessions(
        session, user_id=user.id, session_ids=session_ids
    )
    if devices:
        await _bump_and_stage(session, user)
    return ended


async def end_expired_sessions(
    *, session: AsyncSession, now: datetime, batch_size: int = 100
) -> int:
    """Delete the sessions that expired by `now`, and their devices, a batch of sessions per
    transaction (their users locked first, as every change to devices does). How many ended."""
    total = 0
    while True:
        expired = await repository.expired_sessions(session, now=now, limit=batch_size)
        if not expired:
            await session.commit()
            return total
        users = await repository.lock_users(session, user_ids=expired)
        ended = 0
        for user_id in sorted(users):
            ended += await _end_sessions(session, users[user_id], expired[user_id])
        await session.commit()
        if not ended:  # another replica ended this batch: it is sweeping, not us
            return total
        total += ended


# What a deleted account's row shows where its messages and rooms still name it.
DELETED_DISPLAY_NAME = "Deleted user"


def deleted_username(user_id: uuid.UUID) -> str:
    """A deleted account's username: frees the old one, and no one can register it (`-` is not
    allowed in usernames)."""
    return f"deleted-{user_id.hex[:24]}"


async def delete_account(*, session: AsyncSession, user_id: uuid.UUID) -> None:
    """Delete the account: its sessions (so every token of it stops working), devices,
    settings, memberships, blocks and inbox go; its row stays, emptied (a placeholder name, no
    address, no password), because the messages it wrote and the rooms it made still name it.
    The outbox rows that carry its personal data go too, and a last snapshot (`deleted`) tells
    the router to forget it."""
    user = await _lock_user(session, user_id)
    await repository.erase_user(session, user_id=user_id)
    now = utc_now()
    user.username = deleted_username(user.id)
    user.display_name = DELETED_DISPLAY_NAME
    user.email = ""
    user.email_verified_at = None
    user.email_hard_bounces = 0
    user.password_hash = None
    user.deleted_at = now
    user.version += 1
    user.updated_at = now
    await session.flush()
    event = UserUpdated(
        occurred_at=now,
        user_id=user.id,
        version=user.version,
        username=user.username,
        display_name=user.display_name,
        email=None,
        email_verified=False,
        deleted=True,
    )
    repository.add_outbox_event(session, event=event, event_type=event.type)
    purged = await repository.purge_outbox_of(
        session, user_id=user.id, keep_event_id=event.event_id
    )
    await session.commit()
    logger.info("message_service.account.deleted user_id=%s outbox_rows_purged=%d", user.id, purged)


async def get_profile(*, session: AsyncSession, user_id: uuid.UUID) -> User:
    user = await repository.get_user(session, user_id=user_id)
    if user is None:
        raise NotFound("user not found")
    return user


async def update_profile(
    *,
    session: AsyncSession,
    user_id: uuid.UUID,
    display_name: str | None = None,
    email: str | None = None,
    verification: EmailVerification,
) -> User:
    user = await _lock_user(session, user_id)
    changed = False
    if display_name is not None and display_name != user.display_name:
        user.display_name = display_name
        changed = True
    if email is not None and email != user.email:
        user.email = email
        # A new address must be confirmed again: links sent to the old one no longer verify.
        await email_verification.address_set(session, user, verification, now=utc_now())
        changed = True
    if changed:
        await _bump_and_stage(session, user)
    await session.commit()
    return user


# --- devices ------------------------------------------------------------------------------------


async def list_devices(*, session: AsyncSession, user_id: uuid.UUID) -> Sequence[Device]:
    return await repository.devices_of(session, user_id=user_id)


async def register_device(
    *,
    session: AsyncSession,
    user_id: uuid.UUID,
    session_id: uuid.UUID,
    platform: Platform,
    token: str,
    max_devices: int,
    web_push_keys: WebPushKeys | None = None,
    now: datetime | None = None,
) -> DeviceRegistration:
    """Register a push token (for Web Push: the subscription's endpoint and keys) for the user.

    The device belongs to the session `session_id`: signing it out removes the device. The same
    token again returns the existing device, moves it to this session and refreshes its
    `token_updated_at` (and keys), which the user's new snapshot carries.

    A token another user registered moves to this user: only the app on that device can read
    its push token, so whoever registers it holds the device, now signed in as someone else.
    The previous owner's session that registered it is signed out (with any other device
    registered under it), both users' snapshots are republished, and the move is logged (ids
    only) and counted by the caller (`DeviceRegistration.moved_from`)."""
    token_hash = hash_token(token)
    for _ in range(_DEVICE_RACE_ATTEMPTS):
        try:
            registration = await _register_device_once(
                session,
                user_id=user_id,
                session_id=session_id,
                platform=platform,
                token=token,
                token_hash=token_hash,
                max_devices=max_devices,
                web_push_keys=web_push_keys,
                now=now or utc_now(),
            )
        except IntegrityError:
            # Another request registered the same token between our read and our insert.
            await session.rollback()
            continue
        if registration is not None:
            return registration
    raise Conflict("the device is being registered concurrently; try again")


async def _register_device_once(
    session: AsyncSession,
    *,
    user_id: uuid.UUID,
    session_id: uuid.UUID,
    platform: Platform,
    token: str,
    token_hash: str,
    max_devices: int,
    web_push_keys: WebPushKeys | None,
    now: datetime,
) -> DeviceRegistration | None:
    """One attempt; None when the token changed hands while we were locking."""
    existing = await repository.device_by_token(
        session, platform=platform.value, token_hash=token_hash
    )
    owners = {user_id} | ({existing.user_id} if existing is not None else set())
    users = await repository.lock_users(session, user_ids=owners)
    if user_id not in users:
        raise NotFound("user not found")
    existing = await repository.device_by_token(
        session, platform=platform.value, token_hash=token_hash
    )
    if existing is not None and existing.user_id not in users:
        await session.rollback()
        return None
    p256dh, auth = (web_push_keys.p256dh, web_push_keys.auth) if web_push_keys else (None, None)
    if existing is not None and existing.user_id == user_id:
        # The client still holds this token: it stays fresh (not pruned), and the router learns
        # when it was registered (APNs' 410 rule compares that with Apple's verdict).
        existing.token_updated_at = now
        existing.session_id = session_id
        existing.web_push_p256dh, existing.web_push_auth = p256dh, auth
        await _bump_and_stage(session, users[user_id])
        await session.commit()
        return DeviceRegistration(device=existing, created=False)
    if await repository.count_devices(session, user_id=user_id) >= max_devices:
        raise Conflict(f"at most {max_devices} devices per user; remove one first")
    moved_from = None
    if existing is not None:
        previous_owner = users[existing.user_id]
        moved_from = (previous_owner.id, existing.id)
        previous_session = existing.session_id
        await session.delete(existing)
        await session.flush()
        if previous_session is not None:
            await repository.delete_sessions(
                session, user_id=previous_owner.id, session_ids={previous_session}
            )
        await _bump_and_stage(session, previous_owner)
    device = Device(
        user_id=user_id,
        session_id=session_id,
        platform=platform.value,
        token=token,
        token_hash=token_hash,
        token_updated_at=now,
        web_push_p256dh=p256dh,
        web_push_auth=auth,
    )
    await repository.add_device(session, device=device)
    await _bump_and_stage(session, users[user_id])
    await session.commit()
    if moved_from is not None:
        # The audit trail of a token changing hands (a shared or resold device, or someone
        # registering another's token): ids only, never the token.
        logger.warning(
            "message_service.device.moved platform=%s from_user_id=%s from_device_id=%s"
            " to_user_id=%s to_device_id=%s (the previous owner's session on it signed out)",
            platform.value,
            moved_from[0],
            moved_from[1],
            user_id,
            device.id,
        )
    return DeviceRegistration(
        device=device, created=True, moved_from=moved_from[0] if moved_from else None
    )


async def remove_device(*, session: AsyncSession, user_id: uuid.UUID, device_id: uuid.UUID) -> None:
    if not await _remove_device(session, user_id=user_id, device_id=device_id):
        raise NotFound("device not found")


async def remove_invalidated_device(
    *, session: AsyncSession, user_id: uuid.UUID, device_id: uuid.UUID
) -> bool:
    """The provider said the token is dead. Idempotent: False when the device is already gone
    (or belongs to someone else now)."""
    return await _remove_device(session, user_id=user_id, device_id=device_id)


async def _remove_device(
    session: AsyncSession, *, user_id: uuid.UUID, device_id: uuid.UUID
) -> bool:
    users = await repository.lock_users(session, user_ids={user_id})
    user = users.get(user_id)
    if user is None or not await repository.delete_device(
        session, user_id=user_id, device_id=device_id
    ):
        await session.rollback()
        return False
    await _bump_and_stage(session, user)
    await session.commit()
    return True


async def prune_stale_devices(
    *, session: AsyncSession, now: datetime, stale_after: timedelta, batch_size: int = 100
) -> int:
    """Remove every device whose client has not registered its token again since
    `now - stale_after` (an uninstalled app, a browser profile long gone), and publish the new
    snapshot of each user who lost one. Users are handled a batch at a time, each batch one
    transaction that locks its users first, like every other change to their devices. Returns
    how many users lost a device."""
    before = now - stale_after
    affected = 0
    while True:
        owners = await repository.stale_device_owners(session, before=before, limit=batch_size)
        if not owners:
            await session.commit()
            return affected
        users = await repository.lock_users(session, user_ids=owners)
        pruned = await repository.delete_stale_devices(session, user_ids=users, before=before)
        for user_id in sorted(pruned):
            await _bump_and_stage(session, users[user_id])
        await session.commit()
        affected += len(pruned)


def check_web_push_endpoint(endpoint: str, *, allowed_hosts: Iterable[str]) -> None:
    """Refuse a subscription push-sender would never POST to (`herald_shared.webpush`)."""
    problem = endpoint_problem(endpoint, allowed_hosts)
    if problem is not None:
        raise Invalid(problem)


# --- preferences --------------------------------------------------------------------------------


async def get_preferences(*, session: AsyncSession, user_id: uuid.UUID) -> PreferencesView:
    preferences = await repository.preferences_of(session, user_id=user_id)
    rooms = await repository.room_settings_of(session, user_id=user_id)
    breakthrough = await repository.breakthrough_users_of(session, user_id=user_id)
    return _preferences_view(preferences, rooms, breakthrough)


async def set_preferences(
    *,
    session: AsyncSession,
    user_id: uuid.UUID,
    push: Level | None = None,
    email: Level | None = None,
    push_enabled: bool | None = None,
    email_enabled: bool | None = None,
    push_preview: bool | None = None,
    email_delay: int | None = None,
    muted_room_ids: Sequence[uuid.UUID] | None = None,
    quiet_hours: QuietHours | Literal[Keep.KEEP] | None = KEEP,
    breakthrough_user_ids: Sequence[uuid.UUID] | None = None,
) -> PreferencesView:
    """Change what is given (None: unchanged; for `quiet_hours`, KEEP: unchanged and None: no
    quiet hours). A level and the older on/off flag of the same channel are mutually exclusive;
    a flag turned on restores the level it had (the default, `mentions`, if it was `none`).
    `muted_room_ids` replaces the set of rooms muted with no end; only rooms the user is a
    member of can be muted. Quiet hours need a known time zone and must not be empty;
    `breakthrough_user_ids` replaces the list, of other users that exist."""
    if push is not None and push_enabled is not None:
        raise Invalid("give either push or push_enabled, not both")
    if email is not None and email_enabled is not None:
        raise Invalid("give either email or email_enabled, not both")
    if isinstance(quiet_hours, QuietHours):
        _check_quiet_hours(quiet_hours)
    user = await _lock_user(session, user_id)
    preferences = await repository.preferences_of(session, user_id=user_id)
    rooms = await repository.room_settings_of(session, user_id=user_id)
    breakthrough = await repository.breakthrough_users_of(session, user_id=user_id)
    now = utc_now()  # one instant for both views: a snooze ending meanwhile is no change
    before = _preferences_view(preferences, rooms, breakthrough, now=now)
    preferences.push_level = str(_level(push, push_enabled, current=before.push))
    preferences.email_level = str(_level(email, email_enabled, current=before.email))
    if push_preview is not None:
        preferences.push_preview = push_preview
    if email_delay is not None:
        preferences.email_delay = email_delay
    if muted_room_ids is not None:
        wanted = set(muted_room_ids)
        unknown = wanted - await repository.rooms_of_member(
            session, user_id=user_id, room_ids=wanted
        )
        if unknown:
            raise Invalid(f"not a room of yours: {', '.join(sorted(map(str, unknown)))}")
        by_room = {settings.room_id: settings for settings in rooms}
        for room_id in wanted - by_room.keys():
            by_room[room_id] = repository.new_room_settings(
                session, user_id=user_id, room_id=room_id
            )
        for settings in by_room.values():
            if settings.room_id in wanted:
                settings.muted_until = MUTED_FOREVER
            elif settings.muted_until == MUTED_FOREVER:
                settings.muted_until = None
        rooms = list(by_room.values())
    if quiet_hours is not KEEP:
        preferences.quiet_start = None if quiet_hours is None else quiet_hours.start
        preferences.quiet_end = None if quiet_hours is None else quiet_hours.end
        preferences.quiet_time_zone = None if quiet_hours is None else quiet_hours.time_zone
    if breakthrough_user_ids is not None:
        breakthrough = await _breakthrough_users(
            session, user_id=user_id, wanted=breakthrough_user_ids
        )
        await repository.replace_breakthrough_users(
            session, user_id=user_id, breakthrough_ids=breakthrough
        )
    after = _preferences_view(preferences, rooms, breakthrough, now=now)
    if after != before:
        await _bump_and_stage(session, user)
    await session.commit()
    return after


async def snooze(
    *, session: AsyncSession, user_id: uuid.UUID, until: datetime | None
) -> PreferencesView:
    """Do Not Disturb until `until`, at most `MAX_SNOOZE` from now; None (or a time passed)
    ends it. Like any preference change it publishes `user.updated` if something changed."""
    now = utc_now()
    if until is not None and until <= now:
        until = None
    if until is not None and until - now > MAX_SNOOZE:
        raise Invalid(f"Do Not Disturb lasts at most {MAX_SNOOZE.days} days")
    user = await _lock_user(session, user_id)
    preferences = await repository.preferences_of(session, user_id=user_id)
    rooms = await repository.room_settings_of(session, user_id=user_id)
    breakthrough = await repository.breakthrough_users_of(session, user_id=user_id)
    before = _preferences_view(preferences, rooms, breakthrough, now=now)
    preferences.snoozed_until = until
    after = _preferences_view(preferences, rooms, breakthrough, now=now)
    if after != before:
        await _bump_and_stage(session, user)
    await session.commit()
    return after


@cache
def _time_zones() -> frozenset[str]:
    """The IANA time zone names this host knows. Not `localtime` (there, the host's own zone:
    another host would read it otherwise)."""
    return frozenset(zoneinfo.available_timezones() - {"localtime"})


def _check_quiet_hours(quiet_hours: QuietHours) -> None:
    if quiet_hours.start == quiet_hours.end:
        raise Invalid("quiet hours must not be empty: start and end are the same")
    if quiet_hours.time_zone not in _time_zones():
        raise Invalid(
            f"unknown time zone: {quiet_hours.time_zone!r} (an IANA name, such as Europe/Paris)"
        )


async def _breakthrough_users(
    session: AsyncSession, *, user_id: uuid.UUID, wanted: Sequence[uuid.UUID]
) -> list[uuid.UUID]:
    """`wanted`, checked (other users that exist, at most `MAX_BREAKTHROUGH_USERS`), by id."""
    ids = set(wanted)
    if user_id in ids:
        raise Invalid("you cannot be your own breakthrough user")
    if len(ids) > MAX_BREAKTHROUGH_USERS:
        raise Invalid(f"at most {MAX_BREAKTHROUGH_USERS} breakthrough users")
    unknown = ids - await repository.existing_user_ids(session, user_ids=ids)
    if unknown:
        raise Invalid(f"unknown user ids: {', '.join(sorted(map(str, unknown)))}")
    return sorted(ids)


def _level(level: Level | None, enabled: bool | None, *, current: Level) -> Level:
    if level is not None:
        return level
    if enabled is None:
        return current
    if not enabled:
        return Level.NONE
    return Level.MENTIONS if current is Level.NONE else current


def _preferences_view(
    preferences: Preferences,
    rooms: Iterable[RoomSettings],
    breakthrough_user_ids: Sequence[uuid.UUID],
    *,
    now: datetime | None = None,
) -> PreferencesView:
    quiet_hours = (
        QuietHours(
            start=preferences.quiet_start,
            end=preferences.quiet_end,
            time_zone=preferences.quiet_time_zone,
        )
        if preferences.quiet_start is not None
        and preferences.quiet_end is not None
        and preferences.quiet_time_zone is not None
        else None
    )
    snoozed_until = preferences.snoozed_until
    if snoozed_until is not None and snoozed_until <= (utc_now() if now is None else now):
        snoozed_until = None
    return PreferencesView(
        push=Level(preferences.push_level),
        email=Level(preferences.email_level),
        push_preview=preferences.push_preview,
        email_delay=preferences.email_delay,
        muted_room_ids=sorted(r.room_id for r in rooms if r.muted_until == MUTED_FOREVER),
        quiet_hours=quiet_hours,
        snoozed_until=snoozed_until,
        breakthrough_user_ids=list(breakthrough_user_ids),
    )


async def turn_email_off(*, session: AsyncSession, user_id: uuid.UUID) -> None:
    """One-click unsubscribe: e-mail notifications off, everything else as it was. Like any
    preference change it publishes `user.updated`, and only if something changed.

    A link of an account deleted since (or of none) changes nothing and is answered as any other
    valid link: it is mailed nothing anyway, a snapshot would make the router recreate it, and
    the answer must not tell whether the account exists."""
    user = (await repository.lock_users(session, user_ids={user_id})).get(user_id)
    if user is None:
        await session.rollback()
        return
    preferences = await repository.preferences_of(session, user_id=user_id)
    if preferences.email_level != Level.NONE:
        preferences.email_level = str(Level.NONE)
        await _bump_and_stage(session, user)
    await session.commit()


async def get_room_notifications(
    *, session: AsyncSession, user_id: uuid.UUID, room_id: uuid.UUID
) -> RoomNotificationsView:
    await _room_of_member(session, room_id=room_id, user_id=user_id)
    settings = await repository.room_settings(session, user_id=user_id, room_id=room_id)
    view = _room_notifications_view(settings)
    await session.rollback()  # nothing to keep: an empty row was only made to be read
    return view


async def set_room_notifications(
    *,
    session: AsyncSession,
    user_id: uuid.UUID,
    room_id: uuid.UUID,
    push: Level | None,
    email: Level | None,
    muted_until: datetime | None,
) -> RoomNotificationsView:
    """Replace the user's settings for a room they are a member of (None: their default level;
    not muted). A mute that has already ended is stored as no mute."""
    user = await _lock_user(session, user_id)
    await _room_of_member(session, room_id=room_id, user_id=user_id)
    settings = await repository.room_settings(session, user_id=user_id, room_id=room_id)
    before = _room_notifications_view(settings)
    if muted_until is not None and muted_until <= utc_now():
        muted_until = None
    settings.push_level = None if push is None else str(push)
    settings.email_level = None if email is None else str(email)
    settings.muted_until = muted_until
    after = _room_notifications_view(settings)
    if after != before:
        await _bump_and_stage(session, user)
    await session.commit()
    return after


def _room_notifications_view(settings: RoomSettings) -> RoomNotificationsView:
    return RoomNotificationsView(
        room_id=settings.room_id,
        push=None if settings.push_level is None else Level(settings.push_level),
        email=None if settings.email_level is None else Level(settings.email_level),
        muted_until=settings.muted_until,
    )


# --- rooms --------------------------------------------------------------------------------------


async def create_room(
    *, session: AsyncSession, creator_id: uuid.UUID, name: str, member_ids: Sequence[uuid.UUID]
) -> RoomView:
    members = list(dict.fromkeys([creator_id, *member_ids]))  # creator first, no duplicates
    if len(members) > MAX_ROOM_MEMBERS:
        raise Invalid(f"a room has at most {MAX_ROOM_MEMBERS} members")
    unknown = set(members) - await repository.existing_user_ids(session, user_ids=members)
    if unknown:
        raise Invalid(f"unknown user ids: {', '.join(sorted(map(str, unknown)))}")
    room = Room(name=name, created_by=creator_id)
    # The others are invited, not made members: nothing reaches them from the room until they
    # join; someone who blocked the creator is not even invited (and nobody is told so).
    blockers = await repository.blockers_among(session, user_ids=members[1:], blocked_id=creator_id)
    invited = [user_id for user_id in members[1:] if user_id not in blockers]
    await repository.add_room(session, room=room, member_ids=[creator_id], invited_ids=invited)
    if invited:
        creator = await repository.get_user(session, user_id=creator_id)
        for invitee_id in invited:
            _stage_invitation(session, room=room, inviter=creator, invitee_id=invitee_id)
    await session.commit()
    return RoomView(room=room, member_ids=[creator_id])


def direct_key(first: uuid.UUID, second: uuid.UUID) -> str:
    """The key of a pair's direct room, the same whoever opens it."""
    return ":".join(sorted((str(first), str(second))))


async def open_direct_room(
    *, session: AsyncSession, user_id: uuid.UUID, other_id: uuid.UUID
) -> DirectRoom:
    """The one direct room of the two users: made on first use, returned ever after (also when
    both open it at the same moment: the key is unique, and the loser reads the winner's)."""
    if other_id == user_id:
        raise Invalid("a direct room is with another user")
    if not await repository.existing_user_ids(session, user_ids={other_id}):
        raise Invalid(f"unknown user id: {other_id}")
    key = direct_key(user_id, other_id)
    members = sorted((user_id, other_id))
    existing = await repository.room_by_direct_key(session, key=key)
    if existing is not None:
        return DirectRoom(RoomView(room=existing, member_ids=members), created=False)
    room = Room(name="", kind=RoomKind.DIRECT, direct_key=key, created_by=user_id)
    try:
        await repository.add_room(session, room=room, member_ids=[user_id, other_id])
        await session.commit()
    except IntegrityError:
        await session.rollback()
        existing = await repository.room_by_direct_key(session, key=key)
        if existing is None:
            raise
        return DirectRoom(RoomView(room=existing, member_ids=members), created=False)
    return DirectRoom(RoomView(room=room, member_ids=members), created=True)


async def get_room(*, session: AsyncSession, room_id: uuid.UUID, user_id: uuid.UUID) -> RoomView:
    room = await _room_of_member(session, room_id=room_id, user_id=user_id)
    return RoomView(room=room, member_ids=await repository.member_ids(session, room_id=room.id))


async def add_member(
    *, session: AsyncSession, room_id: uuid.UUID, actor_id: uuid.UUID, user_id: uuid.UUID
) -> MembershipChange:
    """A member invites someone to the room (idempotent: `added` is False if they were invited
    or in already). Someone who blocked the actor is not invited, and the answer does not say
    so."""
    room = await _room_of_member(session, room_id=room_id, user_id=actor_id, lock=True)
    if room.kind == RoomKind.DIRECT:
        raise Invalid("a direct room has its two members only")
    if not await repository.existing_user_ids(session, user_ids={user_id}):
        raise Invalid(f"unknown user id: {user_id}")
    people = await repository.people_in(session, room_id=room.id)
    added = user_id not in people
    if added and not await repository.blocks(session, user_id=user_id, blocked_id=actor_id):
        if len(people) >= MAX_ROOM_MEMBERS:
            raise Conflict(f"the room already has {MAX_ROOM_MEMBERS} members")
        if await repository.invite(session, room_id=room.id, user_id=user_id, invited_by=actor_id):
            actor = await repository.get_user(session, user_id=actor_id)
            _stage_invitation(session, room=room, inviter=actor, invitee_id=user_id)
    await session.commit()
    members = await repository.member_ids(session, room_id=room.id)
    return MembershipChange(room=RoomView(room=room, member_ids=members), added=added)


def _stage_invitation(
    session: AsyncSession, *, room: Room, inviter: User | None, invitee_id: uuid.UUID
) -> None:
    """Stage the invitee's one notification from the room, in the invitation's transaction."""
    if inviter is None:  # the request's own user: deleted in the meantime
        raise NotFound("user not found")
    event = InvitationCreated(
        invitation_id=uuid.uuid4(),
        room_id=room.id,
        room_name=room.name,
        invitee_id=invitee_id,
        inviter=SenderInfo(
            user_id=inviter.id, username=inviter.username, display_name=inviter.display_name
        ),
        timestamp=utc_now(),
    )
    repository.add_outbox_event(session, event=event, event_type=event.type)


async def join_room(*, session: AsyncSession, room_id: uuid.UUID, user_id: uuid.UUID) -> RoomView:
    """Accept an invitation (a member joining again changes nothing)."""
    found = await repository.membership(session, room_id=room_id, user_id=user_id)
    if found is None:
        raise NotFound("room not found")
    room, member = found
    if member.state != MEMBER:
        member.state = MEMBER
        member.joined_at = utc_now()
        await session.commit()
    return RoomView(room=room, member_ids=await repository.member_ids(session, room_id=room.id))


async def leave_room(*, session: AsyncSession, room_id: uuid.UUID, user_id: uuid.UUID) -> None:
    """Leave a room, or decline its invitation: nothing more reaches the user from it, and the
    router cancels what still waits of it and recalls what their devices show (`RoomLeft`)."""
    found = await repository.membership(session, room_id=room_id, user_id=user_id)
    if found is None:
        raise NotFound("room not found")
    room, _ = found
    if room.kind == RoomKind.DIRECT:
        raise Invalid("a direct room cannot be left; mute it, or block the other user")
    await repository.remove_membership(session, room_id=room.id, user_id=user_id)
    event = RoomLeft(user_id=user_id, room_id=room.id, left_at=utc_now())
    repository.add_outbox_event(session, event=event, event_type=event.type)
    await session.commit()


@dataclass(frozen=True)
class Invitation:
    room: Room
    invited_by: uuid.UUID | None
    invited_at: datetime


@dataclass(frozen=True)
class MyRooms:
    rooms: list[Room]
    invitations: list[Invitation]
    unread: dict[uuid.UUID, int]


async def my_rooms(*, session: AsyncSession, user_id: uuid.UUID) -> MyRooms:
    """The rooms the user is a member of, and those they are invited to, newest first."""
    rows = await repository.rooms_of(session, user_id=user_id)
    rooms = [room for room, member in rows if member.state == MEMBER]
    return MyRooms(
        rooms=rooms,
        unread=await repository.unread_counts(
            session, user_id=user_id, room_ids=[room.id for room in rooms]
        ),
        invitations=[
            Invitation(room, member.invited_by, member.joined_at)
            for room, member in rows
            if member.state != MEMBER
        ],
    )


@dataclass(frozen=True)
class ReadMarker:
    room_id: uuid.UUID
    message_id: uuid.UUID | None
    unread: int


async def mark_read(
    *, session: AsyncSession, room_id: uuid.UUID, user_id: uuid.UUID, message_id: uuid.UUID
) -> ReadMarker:
    """Move the user's read marker in the room to `message_id`, unless it is already there or
    later (markers only move forward: a device that was behind changes nothing), and tell the
    router (`RoomRead`)."""
    found = await repository.membership(session, room_id=room_id, user_id=user_id)
    if found is None or found[1].state != MEMBER:
        raise NotFound("room not found")
    _, member = found
    message = await repository.message_in_room(session, room_id=room_id, message_id=message_id)
    if message is None:
        # The room is there; what the body names is not in it, or deleted (422, not 404: the
        # path's resource exists, and a client must not take the room for gone).
        raise Invalid("up_to names no message of this room")
    _move_marker(session, member, message)
    await session.commit()
    unread = await repository.unread_counts(session, user_id=user_id, room_ids=[room_id])
    return ReadMarker(room_id, member.read_message_id, unread.get(room_id, 0))


def _move_marker(session: AsyncSession, member: RoomMember, message: Message) -> bool:
    """Move a locked member row's read marker forward to `message` and stage its `RoomRead`;
    False when it already was there or later."""
    if member.read_up_to is not None and (message.created_at, message.id) <= (
        member.read_up_to,
        member.read_message_id or message.id,
    ):
        return False
    member.read_message_id, member.read_up_to = message.id, message.created_at
    event = RoomRead(
        user_id=member.user_id,
        room_id=member.room_id,
        message_id=message.id,
        up_to=message.created_at,
    )
    repository.add_outbox_event(session, event=event, event_type=event.type)
    return True


async def read_notifications(
    *, session: AsyncSession, user_id: uuid.UUID, message_ids: Sequence[uuid.UUID] | None
) -> list[ReadMarker]:
    """Mark inbox items read (`message_ids`; None: everything): in one transaction, each room's
    read marker moves forward to the newest of them there, so that what still waits of those
    rooms is not sent and what their pushes show is recalled (one `RoomRead` per room). The
    rooms whose marker moved, with their unread counts now."""
    moved = [
        (member.room_id, message.id)
        for member, message in await repository.messages_to_read(
            session, user_id=user_id, message_ids=message_ids
        )
        if _move_marker(session, member, message)
    ]
    await session.commit()
    unread = await repository.unread_counts(
        session, user_id=user_id, room_ids=[room_id for room_id, _ in moved]
    )
    return [ReadMarker(room_id, up_to, unread.get(room_id, 0)) for room_id, up_to in moved]


async def check_member(*, session: AsyncSession, room_id: uuid.UUID, user_id: uuid.UUID) -> None:
    """NotFound unless the user is a member of the room (the room in view must be theirs)."""
    await _room_of_member(session, room_id=room_id, user_id=user_id)


# --- blocks ---------------------------------------------------------------------------------------


async def block(*, session: AsyncSession, user_id: uuid.UUID, blocked_id: uuid.UUID) -> None:
    """From now on nothing `blocked_id` says notifies the user, and they cannot invite them."""
    if blocked_id == user_id:
        raise Invalid("you cannot block yourself")
    if not await repository.existing_user_ids(session, user_ids={blocked_id}):
        raise NotFound("user not found")
    await repository.add_block(session, user_id=user_id, blocked_id=blocked_id)
    await session.commit()


async def unblock(*, session: AsyncSession, user_id: uuid.UUID, blocked_id: uuid.UUID) -> None:
    await repository.remove_block(session, user_id=user_id, blocked_id=blocked_id)
    await session.commit()


async def blocked_users(*, session: AsyncSession, user_id: uuid.UUID) -> list[uuid.UUID]:
    return await repository.blocked_by(session, user_id=user_id)


async def _room_of_member(
    session: AsyncSession, *, room_id: uuid.UUID, user_id: uuid.UUID, lock: bool = False
) -> Room:
    room = await repository.room_for_member(session, room_id=room_id, user_id=user_id, lock=lock)
    if room is None:
        # Never 403: a non-member must not learn that the room exists.
        raise NotFound("room not found")
    return room


# --- messages -----------------------------------------------------------------------------------


async def post_message(
    *,
    engine: AsyncEngine,
    room_id: uuid.UUID,
    sender_id: uuid.UUID,
    content: str,
    idempotency_key: str | None = None,
) -> PostedMessage:
    """Store the message and stage its MessageCreated in one transaction.

    Every chat message takes this path: two reads (the room with its members, and an earlier
    message with the same key if there is one) that stand alone, then one transaction of two
    inserts, all in SQLAlchemy Core."""
    async with autocommit(engine) as connection:
        roster = await repository.room_roster(connection, room_id=room_id, sender_id=sender_id)
        sender = None if roster is None else roster.member(sender_id)
        if roster is None or sender is None:
            # Never 403: a non-member must not learn that the room exists.
            raise NotFound("room not found")
        if idempotency_key is not None:
            earlier = await repository.message_by_key(
                connection, sender_id=sender_id, idempotency_key=idempotency_key
            )
            if earlier is not None:
                return _replay(earlier, room_id=room_id, content=content)
    message = Message(
        room_id=room_id,
        sender_id=sender_id,
        content=content,
        idempotency_key=idempotency_key,
        idempotency_fingerprint=None if idempotency_key is None else fingerprint(content),
    )
    event = _message_created(message, roster, sender)
    try:
        await repository.store_message(engine, message=message, event=event, event_type=event.type)
    except IntegrityError:
        # A concurrent request with the same key won the race: answer with its message.
        if idempotency_key is None:
            raise
        async with autocommit(engine) as connection:
            earlier = await repository.message_by_key(
                connection, sender_id=sender_id, idempotency_key=idempotency_key
            )
        if earlier is None:
            raise
        return _replay(earlier, room_id=room_id, content=content)
    return PostedMessage(message=message, created=True)


def _message_created(
    message: Message, roster: repository.Roster, sender: repository.RosterMember
) -> MessageCreated:
    recipients = [
        (member.user_id, member.username)
        for member in roster.members
        if member.user_id != sender.user_id
    ]
    return MessageCreated(
        occurred_at=message.created_at,
        message_id=message.id,
        room_id=message.room_id,
        room_name=roster.room_name,
        room_kind=RoomKind(roster.room_kind),
        sender_id=sender.user_id,
        recipient_ids=[user_id for user_id, _ in recipients],
        message_content=message.content,
        sender_info=SenderInfo(
            user_id=sender.user_id, username=sender.username, display_name=sender.display_name
        ),
        mentions=mentioned(message.content, recipients),
        room_mentioned=room_mentioned(message.content),
        timestamp=message.created_at,
    )


def mentioned(content: str, members: Sequence[tuple[uuid.UUID, str]]) -> list[uuid.UUID]:
    """Ids of the members whose `@username` appears in the content, in member order."""
    names = {match.lower() for match in MENTION.findall(content)}
    return [user_id for user_id, username in members if username in names]


def room_mentioned(content: str) -> bool:
    """Whether the content names the whole room (`@room`, `@all`)."""
    return any(match.lower() in ROOM_MENTIONS for match in MENTION.findall(content))


def fingerprint(content: str) -> str:
    """What an Idempotency-Key's message keeps of the text first posted with it."""
    return hashlib.sha256(content.encode()).hexdigest()


def _replay(message: Message, *, room_id: uuid.UUID, content: str) -> PostedMessage:
    """The message an earlier request with the same key created, as it is now (edited, if its
    author edited it since), when this request is that one again."""
    if message.deleted_at is not None:
        # Answering with the message would bring back what its author deleted, and posting it
        # anew would make the key name two messages: the key is spent.
        raise Conflict("the message of this Idempotency-Key was deleted")
    posted = message.idempotency_fingerprint
    same_text = message.content == content if posted is None else posted == fingerprint(content)
    if message.room_id != room_id or not same_text:
        raise Invalid("this Idempotency-Key was already used for a different message")
    return PostedMessage(message=message, created=False)


async def list_messages(
    *,
    session: AsyncSession,
    room_id: uuid.UUID,
    user_id: uuid.UUID,
    limit: int,
    before: str | None = None,
) -> MessagePage:
    """Newest first; `next_cursor` continues with older messages (None: no more)."""
    await _room_of_member(session, room_id=room_id, user_id=user_id)
    limit = max(1, min(limit, MAX_PAGE_SIZE))
    try:
        position = None if before is None else decode_cursor(before)
    except ValueError as exc:
        raise Invalid("invalid cursor") from exc
    rows = await repository.messages_page(
        session, room_id=room_id, limit=limit + 1, before=position
    )
    items = rows[:limit]
    next_cursor = encode_cursor(items[-1].created_at, items[-1].id) if len(rows) > limit else None
    return MessagePage(items=items, next_cursor=next_cursor)


async def edit_message(
    *,
    session: AsyncSession,
    room_id: uuid.UUID,
    message_id: uuid.UUID,
    user_id: uuid.UUID,
    content: str,
) -> Message:
    """Change the text of one of the user's messages and stage its `MessageEdited`, in one
    transaction. The same text again changes nothing and stages nothing."""
    message = await _own_message(session, room_id=room_id, message_id=message_id, user_id=user_id)
    if content != message.content:
        edited_at = utc_now()
        message.content, message.edited_at = content, edited_at
        event = MessageEdited(
            occurred_at=edited_at,
            message_id=message.id,
            room_id=message.room_id,
            sender_id=message.sender_id,
            message_content=content,
            edited_at=edited_at,
        )
        repository.add_outbox_event(session, event=event, event_type=event.type)
    await session.commit()
    return message


async def delete_message(
    *, session: AsyncSession, room_id: uuid.UUID, message_id: uuid.UUID, user_id: uuid.UUID
) -> None:
    """Delete one of the user's messages and stage its `MessageDeleted`, in one transaction. The
    row stays, its text emptied (`models.Message`); from then on the message is not found."""
    message = await _own_message(session, room_id=room_id, message_id=message_id, user_id=user_id)
    deleted_at = utc_now()
    message.content, message.deleted_at = "", deleted_at
    event = MessageDeleted(
        occurred_at=deleted_at,
        message_id=message.id,
        room_id=message.room_id,
        sender_id=message.sender_id,
        deleted_at=deleted_at,
    )
    repository.add_outbox_event(session, event=event, event_type=event.type)
    await session.commit()


async def _own_message(
    session: AsyncSession, *, room_id: uuid.UUID, message_id: uuid.UUID, user_id: uuid.UUID
) -> Message:
    """The message, locked, if the user is a member of its room (else 404, like any room not
    theirs), it is there and not deleted (else 404) and they wrote it (else 403: a member sees
    the room's messages, so saying who may change one tells them nothing new)."""
    await _room_of_member(session, room_id=room_id, user_id=user_id)
    message = await repository.message_in_room(
        session, room_id=room_id, message_id=message_id, lock=True
    )
    if message is None:
        raise NotFound("message not found")
    if message.sender_id != user_id:
        raise Forbidden("only its author may edit or delete a message")
    return message


# --- user snapshots -----------------------------------------------------------------------------


async def _lock_user(session: AsyncSession, user_id: uuid.UUID) -> User:
    """The user's row, locked; `NotFound` for a deleted account too (`repository.lock_users`)."""
    user = (await repository.lock_users(session, user_ids={user_id})).get(user_id)
    if user is None:
        raise NotFound("user not found")
    return user


async def _bump_and_stage(session: AsyncSession, user: User) -> None:
    user.version += 1
    user.updated_at = utc_now()
    await session.flush()
    await _stage_user_updated(session, user)


def _device_snapshot(device: Device) -> DeviceSnapshot:
    keys = (
        WebPushKeys(p256dh=device.web_push_p256dh, auth=device.web_push_auth)
        if device.web_push_p256dh is not None and device.web_push_auth is not None
        else None
    )
    return DeviceSnapshot(
        device_id=device.id,
        platform=Platform(device.platform),
        token=device.token,
        token_updated_at=device.token_updated_at,
        web_push_keys=keys,
    )


async def _stage_user_updated(session: AsyncSession, user: User) -> None:
    """Stage the full snapshot of `user` as it is in this transaction."""
    if user.deleted_at is not None:
        # Newer than its last (`deleted`) snapshot, it would make the router recreate the user.
        raise NotFound("user not found")
    devices = await repository.devices_of(session, user_id=user.id)
    preferences = await repository.preferences_of(session, user_id=user.id)
    rooms = await repository.room_settings_of(session, user_id=user.id)
    breakthrough = await repository.breakthrough_users_of(session, user_id=user.id)
    now = utc_now()
    view = _preferences_view(preferences, rooms, breakthrough, now=now)
    event = UserUpdated(
        occurred_at=user.updated_at,
        user_id=user.id,
        version=user.version,
        username=user.username,
        display_name=user.display_name,
        email=user.email or None,  # "": none (an identity provider's user without one)
        email_verified=user.email_verified_at is not None,
        devices=[_device_snapshot(device) for device in devices],
        preferences=PreferencesSnapshot(
            # The booleans and muted_room_ids for routers older than levels.
            push_enabled=view.push is not Level.NONE,
            email_enabled=view.email is not Level.NONE,
            push_preview=view.push_preview,
            email_delay=view.email_delay,
            muted_room_ids=view.muted_room_ids,
            quiet_hours=None
            if view.quiet_hours is None
            else QuietHoursSnapshot(
                start=view.quiet_hours.start,
                end=view.quiet_hours.end,
                time_zone=view.quiet_hours.time_zone,
            ),
            snoozed_until=view.snoozed_until,
            breakthrough_user_ids=view.breakthrough_user_ids,
            push=view.push,
            email=view.email,
            rooms=[
                RoomSettingsSnapshot(
                    room_id=room.room_id,
                    push=room.push,
                    email=room.email,
                    muted_until=room.muted_until,
                )
                for room in map(_room_notifications_view, rooms)
                if room.push or room.email or (room.muted_until and room.muted_until > now)
            ],
        ),
    )
    repository.add_outbox_event(session, event=event, event_type=event.type)


# --- e-mail verification ------------------------------------------------------------------------


async def resend_email_verification(
    *, session: AsyncSession, user_id: uuid.UUID, verification: EmailVerification
) -> None:
    """Send the user's address its verification link again: `Conflict` if it is verified or
    there is none, `TooSoon` within `verification.interval` of the last one to that address."""
    user = await _lock_user(session, user_id)
    if user.email_verified_at is not None:
        raise Conflict("your e-mail address is already verified")
    if not user.email:
        # An identity provider's account may come without one: nothing to send the link to.
        raise Conflict("your account has no e-mail address")
    now = utc_now()
    last = await email_verification.request_verification(session, user, verification, now=now)
    if last is not None:
        await session.rollback()
        wait = retry_after_seconds(last, now=now, interval=verification.interval)
        raise TooSoon(
            f"a verification e-mail went to this address recently: retry after {wait} s",
            retry_after=wait,
        )
    await session.commit()


@dataclass(frozen=True)
class VerifiedEmail:
    user_id: uuid.UUID
    already: bool  # True: it was verified before (the link followed again), nothing changed


async def check_verification_link(
    *, session: AsyncSession, token: str, verification: EmailVerification
) -> VerifiedEmail:
    """Whether the link's token is good for its user's address as it is now, changing nothing
    (what the link's page shows); `InvalidVerificationToken` if not."""
    user_id = verification.tokens.user_of(token)
    user = await repository.get_user(session, user_id=user_id)
    if user is None:
        raise InvalidVerificationToken("invalid verification link")
    verification.tokens.verify(token, address=user.email, now=utc_now())
    return VerifiedEmail(user_id=user.id, already=user.email_verified_at is not None)


async def verify_email(
    *, session: AsyncSession, token: str, verification: EmailVerification
) -> VerifiedEmail:
    """Follow a verification link: its user's address, if it is still the one the link was sent
    to and the link has not expired, is verified (its bounces forgotten), and the user's new
    snapshot staged, so the router e-mails it from now on. `InvalidVerificationToken` if not;
    following it again changes nothing."""
    user_id = verification.tokens.user_of(token)
    users = await repository.lock_users(session, user_ids={user_id})
    user = users.get(user_id)
    if user is None:
        raise InvalidVerificationToken("invalid verification link")
    verification.tokens.verify(token, address=user.email, now=utc_now())
    if user.email_verified_at is not None:
        await session.rollback()  # expires `user`: not read after
        return VerifiedEmail(user_id=user_id, already=True)
    user.email_verified_at = utc_now()
    user.email_hard_bounces = 0
    await _bump_and_stage(session, user)
    await session.commit()
    return VerifiedEmail(user_id=user.id, already=False)


async def record_email_bounce(
    *, session: AsyncSession, event: EmailBounced, bounce_limit: int
) -> bool:
    """Count a bounced notification e-mail against its user's address, once per notification
    and only while the address is the one that bounced; at `bounce_limit` bounces the address
    is verified no more (the new snapshot stops the router's e-mail). Returns whether this
    bounce unverified the address."""
    users = await repository.lock_users(session, user_ids={event.user_id})
    user = users.get(event.user_id)
    if user is None or address_digest(user.email) != event.address_digest:
        await session.rollback()  # a user or an address that is gone: nothing to count
        return False
    now = utc_now()
    if not await repository.add_email_bounce(
        session, notification_id=event.notification_id, user_id=user.id, now=now
    ):
        await session.rollback()  # counted before (a redelivery)
        return False
    user.email_hard_bounces += 1
    unverified = user.email_verified_at is not None and bounces_unverify(
        user.email_hard_bounces, limit=bounce_limit
    )
    if unverified:
        user.email_verified_at = None
        await _bump_and_stage(session, user)
    await session.commit()
    return unverified


# --- the notification inbox ---------------------------------------------------------------------

# Characters of a message an inbox item previews.
INBOX_PREVIEW_CHARS = 140


@dataclass(frozen=True)
class InboxPage:
    items: Sequence[repository.InboxRow]
    next_cursor: str | None


async def list_inbox(
    *,
    engine: AsyncEngine,
    user_id: uuid.UUID,
    limit: int,
    cursor: str | None = None,
    unread_only: bool = False,
) -> InboxPage:
    """The user's inbox, newest first; `next_cursor` continues with older items."""
    limit = max(1, min(limit, MAX_PAGE_SIZE))
    try:
        position = None if cursor is None else decode_cursor(cursor)
    except ValueError as exc:
        raise Invalid("invalid cursor") from exc
    rows = await repository.inbox_page(
        engine, user_id=user_id, limit=limit + 1, before=position, unread_only=unread_only
    )
    items = rows[:limit]
    last = items[-1] if items else None
    next_cursor = (
        encode_cursor(last.message_created_at, last.message_id)
        if last is not None and len(rows) > limit
        else None
    )
    return InboxPage(items=items, next_cursor=next_cursor)


async def inbox_item(
    *, engine: AsyncEngine, user_id: uuid.UUID, message_id: uuid.UUID
) -> repository.InboxRow:
    """What Herald did about one message for the user, also when nothing was sent; another
    user's message, or one the user was never told of, is a 404."""
    row = await repository.inbox_item(engine, user_id=user_id, message_id=message_id)
    if row is None:
        raise NotFound("no notification of this message for you")
    return row
