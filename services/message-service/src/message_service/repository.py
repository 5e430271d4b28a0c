"""Every SQL statement of message-service, as keyword-only async functions over one session.

Functions never commit: the use case in `service.py` owns the transaction. Anything that takes an
object id together with the acting user checks ownership or membership in the same statement.

The paths every chat message takes (authenticating its sender, posting it, the outbox relay
publishing its event) use SQLAlchemy Core on a connection instead of the ORM session: no identity
map, no unit of work, statements compiled once; they are most of this service's CPU under load.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    ARRAY,
    Table,
    TypeDecorator,
    and_,
    bindparam,
    case,
    delete,
    func,
    insert,
    or_,
    text,
    tuple_,
    update,
)
from sqlalchemy import select as core_select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from herald_shared.database import AnyOf, autocommit
from herald_shared.events import Event, InboxItemsUpdated, Trigger, utc_now
from herald_shared.tracing import current_traceparent
from message_service.models import (
    INVITED,
    MEMBER,
    AuthSession,
    Block,
    BreakthroughUser,
    Device,
    EmailBounce,
    EmailVerificationSend,
    ExternalIdentity,
    InboxItem,
    Message,
    OutboxEvent,
    Preferences,
    Room,
    RoomMember,
    RoomSettings,
    User,
)

# Set on a session that added an outbox row; whoever closes the session nudges the relay.
OUTBOX_WRITTEN = "herald.outbox_written"


def _table(model: Any) -> Table:
    table: Table = model.__table__
    return table


_users, _sessions, _members, _rooms = (
    _table(User),
    _table(AuthSession),
    _table(RoomMember),
    _table(Room),
)
_messages, _outbox, _blocks = _table(Message), _table(OutboxEvent), _table(Block)
_inbox, _preferences = _table(InboxItem), _table(Preferences)


# --- the hot path, in SQLAlchemy Core ------------------------------------------------------------


@dataclass(frozen=True)
class SignedIn:
    """Who a session token belongs to."""

    user_id: uuid.UUID
    username: str
    session_id: uuid.UUID
    last_used_at: datetime


# Built once, values bound at execution (`p_*`): SQLAlchemy then neither builds the clause
# objects nor walks a new statement for its cache key on every request (the three statements
# below were a sixth of message-service's profile when built per call).
_USER_FOR_TOKEN = (
    core_select(
        _users.c.id,
        _users.c.username,
        _sessions.c.id.label("session_id"),
        _sessions.c.last_used_at,
    )
    .join(_sessions, _sessions.c.user_id == _users.c.id)
    .where(
        _sessions.c.token_hash == bindparam("p_token_hash"),
        _sessions.c.expires_at > bindparam("p_now"),
    )
)


async def user_for_token(
    connection: AsyncConnection, *, token_hash: str, now: datetime
) -> SignedIn | None:
    """The user and session of a token whose session has not expired by `now`."""
    row = (
        await connection.execute(_USER_FOR_TOKEN, {"p_token_hash": token_hash, "p_now": now})
    ).first()
    if row is None:
        return None
    return SignedIn(
        user_id=row.id,
        username=row.username,
        session_id=row.session_id,
        last_used_at=row.last_used_at,
    )


async def touch_session(
    connection: AsyncConnection, *, session_id: uuid.UUID, now: datetime, expires_at: datetime
) -> None:
    """Record a use of the session, sliding its expiry (unless it expired meanwhile)."""
    await connection.execute(
        update(_sessions)
        .where(_sessions.c.id == session_id, _sessions.c.expires_at > now)
        .values(last_used_at=now, expires_at=expires_at)
    )


@dataclass(frozen=True)
class RosterMember:
    user_id: uuid.UUID
    username: str
    display_name: str


@dataclass(frozen=True)
class Roster:
    """A room's name and kind, and its members in the order they joined."""

    room_name: str
    room_kind: str
    members: list[RosterMember]

    def member(self, user_id: uuid.UUID) -> RosterMember | None:
        return next((member for member in self.members if member.user_id == user_id), None)


# Members only (not the invited), and not those who blocked the sender.
_ROOM_ROSTER = (
    core_select(
        _rooms.c.name,
        _rooms.c.kind,
        _users.c.id,
        _users.c.username,
        _users.c.display_name,
    )
    .join(_members, _members.c.room_id == _rooms.c.id)
    .join(_users, _users.c.id == _members.c.user_id)
    .where(
        _rooms.c.id == bindparam("p_room"),
        _members.c.state == MEMBER,
        ~core_select(_blocks.c.user_id)
        .where(
            _blocks.c.user_id == _members.c.user_id,
            _blocks.c.blocked_id == bindparam("p_sender"),
        )
        .exists(),
    )
    .order_by(_members.c.joined_at, _users.c.id)
)


async def room_roster(
    connection: AsyncConnection, *, room_id: uuid.UUID, sender_id: uuid.UUID
) -> Roster | None:
    """The room and its members in one query (None: no such room, or no member left to list):
    members only (not the invited), and not those who blocked `sender_id`."""
    rows = (
        await connection.execute(_ROOM_ROSTER, {"p_room": room_id, "p_sender": sender_id})
    ).all()
    if not rows:
        return None
    return Roster(
        room_name=rows[0].name,
        room_kind=rows[0].kind,
        members=[RosterMember(row.id, row.username, row.display_name) for row in rows],
    )


async def message_by_key(
    connection: AsyncConnection, *, sender_id: uuid.UUID, idempotency_key: str
) -> Message | None:
    row = (
        await connection.execute(
            core_select(_messages).where(
                _messages.c.sender_id == sender_id,
                _messages.c.idempotency_key == idempotency_key,
            )
        )
    ).first()
    return None if row is None else Message(**row._mapping)


_MESSAGE_COLUMNS = (
    "id",
    "room_id",
    "sender_id",
    "content",
    "created_at",
    "idempotency_key",
    "idempotency_fingerprint",
)
_OUTBOX_COLUMNS = ("event_id", "event_type", "payload", "created_at", "attempts", "traceparent")
_STORE_MESSAGE = insert(_messages).values(
    {name: bindparam(f"m_{name}") for name in _MESSAGE_COLUMNS}
)
_STAGE_EVENT = insert(_outbox).values({name: bindparam(f"o_{name}") for name in _OUTBOX_COLUMNS})
# PostgreSQL: the message's insert a data-modifying WITH of the outbox row's.
_STORE_MESSAGE_AND_EVENT = _STAGE_EVENT.add_cte(_STORE_MESSAGE.cte("stored_message"))


async def store_message(
    engine: AsyncEngine, *, message: Message, event: Event, event_type: str
) -> None:
    """The message and its event's outbox row, both or neither.

    On PostgreSQL that is one statement, the message's insert a data-modifying WITH of the
    outbox row's (atomic on its own: one round trip instead of BEGIN, two inserts and COMMIT);
    on SQLite, two inserts in one transaction."""
    stored = {f"m_{name}": getattr(message, name) for name in _MESSAGE_COLUMNS}
    staged = {f"o_{name}": value for name, value in _outbox_values(event, event_type).items()}
    if engine.dialect.name == "postgresql":
        async with autocommit(engine) as connection:
            await connection.execute(_STORE_MESSAGE_AND_EVENT, stored | staged)
        return
    async with engine.begin() as connection:
        await connection.execute(_STORE_MESSAGE, stored)
        await connection.execute(_STAGE_EVENT, staged)


def _outbox_values(event: Event, event_type: str) -> dict[str, Any]:
    """An outbox row for `event`, with the trace context of the request staging it."""
    return {
        "event_id": event.event_id,
        "event_type": event_type,
        "payload": event.model_dump_json(),
        "created_at": utc_now(),
        "attempts": 0,
        "traceparent": current_traceparent(),
    }


async def _dialect(session: AsyncSession) -> str:
    connection = await session.connection()
    return connection.dialect.name


# --- users and sessions -------------------------------------------------------------------------


async def add_user(session: AsyncSession, *, user: User) -> None:
    session.add(user)
    await session.flush()  # the ORM does not order inserts by foreign keys without relationships
    session.add(Preferences(user_id=user.id))
    await session.flush()


async def user_by_username(session: AsyncSession, *, username: str) -> User | None:
    return (await session.exec(select(User).where(User.username == username))).first()


async def user_of_identity(session: AsyncSession, *, issuer: str, subject: str) -> uuid.UUID | None:
    statement = select(ExternalIdentity.user_id).where(
        ExternalIdentity.issuer == issuer, ExternalIdentity.subject == subject
    )
    return (await session.exec(statement)).first()


async def add_identity(
    session: AsyncSession, *, issuer: str, subject: str, user_id: uuid.UUID
) -> None:
    session.add(ExternalIdentity(issuer=issuer, subject=subject, user_id=user_id))
    await session.flush()


async def add_session(session: AsyncSession, *, auth_session: AuthSession) -> None:
    session.add(auth_session)
    await session.flush()


async def sessions_of(session: AsyncSession, *, user_id: uuid.UUID) -> Sequence[AuthSession]:
    statement = (
        select(AuthSession)
        .where(AuthSession.user_id == user_id)
        .order_by(col(AuthSession.created_at), col(AuthSession.id))
    )
    return (await session.exec(statement)).all()


async def session_of(
    session: AsyncSession, *, user_id: uuid.UUID, session_id: uuid.UUID
) -> AuthSession | None:
    """The user's session with this id; None when it is not theirs (or gone)."""
    statement = select(AuthSession).where(
        AuthSession.id == session_id, AuthSession.user_id == user_id
    )
    return (await session.exec(statement)).first()


async def delete_sessions(
    session: AsyncSession, *, user_id: uuid.UUID, session_ids: Collection[uuid.UUID]
) -> tuple[int, int]:
    """Delete these sessions of the user and the devices registered under them: (sessions,
    devices) deleted."""
    if not session_ids:
        return 0, 0
    devices = await session.exec(
        delete(Device).where(
            col(Device.user_id) == user_id, col(Device.session_id).in_(session_ids)
        )
    )
    ended = await session.exec(
        delete(AuthSession).where(
            col(AuthSession.user_id) == user_id, col(AuthSession.id).in_(session_ids)
        )
    )
    return ended.rowcount, devices.rowcount


async def expired_sessions(
    session: AsyncSession, *, now: datetime, limit: int
) -> dict[uuid.UUID, list[uuid.UUID]]:
    """Up to `limit` sessions that expired by `now`, by user."""
    statement = (
        select(AuthSession.user_id, AuthSession.id)
        .where(col(AuthSession.expires_at) <= now)
        .order_by(col(AuthSession.expires_at))
        .limit(limit)
    )
    expired: dict[uuid.UUID, list[uuid.UUID]] = {}
    for user_id, session_id in (await session.exec(statement)).all():
        expired.setdefault(user_id, []).append(session_id)
    return expired


async def get_user(session: AsyncSession, *, user_id: uuid.UUID) -> User | None:
    return await session.get(User, user_id)


async def lock_users(
    session: AsyncSession, *, user_ids: Iterable[uuid.UUID]
) -> dict[uuid.UUID, User]:
    """Lock the users' rows (PostgreSQL; SQLite transactions are exclusive anyway) in id order, so
    two transactions that lock the same users cannot deadlock, and read their latest state.

    A deleted account is left out, as if it did not exist: nothing may change it or stage a
    snapshot of it after its last (`deleted`) one, which the router would take as newer and so
    make the user again. On PostgreSQL, an account that another transaction deleted while we
    waited for its lock is checked again once that one commits, and left out too."""
    statement = (
        select(User)
        .where(col(User.id).in_(sorted(set(user_ids))), col(User.deleted_at).is_(None))
        .order_by(col(User.id))
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    return {user.id: user for user in (await session.exec(statement)).all()}


async def existing_user_ids(
    session: AsyncSession, *, user_ids: Iterable[uuid.UUID]
) -> set[uuid.UUID]:
    """Which of these users exist (a deleted account does not)."""
    wanted = set(user_ids)
    if not wanted:
        return set()
    statement = select(User.id).where(col(User.id).in_(wanted), col(User.deleted_at).is_(None))
    return set((await session.exec(statement)).all())


async def erase_user(session: AsyncSession, *, user_id: uuid.UUID) -> None:
    """Delete what is the user's alone (sessions, devices, settings, inbox) and their part in
    others' things (memberships and invitations, blocks and breakthrough lists either way); the
    row of `users` is the caller's to empty."""
    statements = (
        delete(Device).where(col(Device.user_id) == user_id),
        delete(AuthSession).where(col(AuthSession.user_id) == user_id),
        delete(Preferences).where(col(Preferences.user_id) == user_id),
        delete(RoomSettings).where(col(RoomSettings.user_id) == user_id),
        # Either way: kept in another's list, the id of no one would make their next save of
        # that list a 422 (their snapshot in the router may keep it: it matches no one's DMs).
        delete(BreakthroughUser).where(
            or_(
                col(BreakthroughUser.user_id) == user_id,
                col(BreakthroughUser.breakthrough_id) == user_id,
            )
        ),
        delete(Block).where(or_(col(Block.user_id) == user_id, col(Block.blocked_id) == user_id)),
        delete(RoomMember).where(col(RoomMember.user_id) == user_id),
        delete(InboxItem).where(col(InboxItem.user_id) == user_id),
        delete(EmailBounce).where(col(EmailBounce.user_id) == user_id),
        # Signing in at the provider again makes a new account.
        delete(ExternalIdentity).where(col(ExternalIdentity.user_id) == user_id),
    )
    for statement in statements:
        await session.exec(statement)


async def purge_outbox_of(
    session: AsyncSession, *, user_id: uuid.UUID, keep_event_id: uuid.UUID
) -> int:
    """Delete the outbox rows, published or not, that carry the user's personal data: their
    snapshots (address, device tokens, names) but `keep_event_id`, their verification e-mails
    (address, name), and the events of what they wrote or sent (their name as its sender). What
    they carry is found in the JSON each row holds (`Event.model_dump_json`, no spaces); a scan
    of the outbox, which keeps a day at most."""
    user = str(user_id)
    statement = delete(OutboxEvent).where(
        or_(
            and_(
                col(OutboxEvent.event_type).in_(("user_updated", "email_verification_requested")),
                col(OutboxEvent.payload).contains(f'"user_id":"{user}"'),
                col(OutboxEvent.event_id) != keep_event_id,
            ),
            and_(
                col(OutboxEvent.event_type) == "new_message",
                col(OutboxEvent.payload).contains(f'"sender_id":"{user}"'),
            ),
            and_(
                col(OutboxEvent.event_type) == "invitation_created",
                col(OutboxEvent.payload).contains(f'"inviter":{{"user_id":"{user}"'),
            ),
        )
    )
    result = await session.exec(statement)
    return int(result.rowcount)


# One array parameter on PostgreSQL (`AnyOf`): an inbox event names up to 500 users, and as an
# expanding IN each number of them would be a statement of its own, prepared again on every
# pooled connection and taking a place in its statement cache.
_DELETED_USERS = core_select(_users.c.id).where(
    AnyOf(_users.c.id, "ids"), _users.c.deleted_at.is_not(None)
)


async def deleted_user_ids(
    session: AsyncSession, *, user_ids: Collection[uuid.UUID]
) -> set[uuid.UUID]:
    if not user_ids:
        return set()
    connection = await session.connection()
    rows = await connection.execute(_DELETED_USERS, {"ids": list(set(user_ids))})
    return {row.id for row in rows}


# --- devices ------------------------------------------------------------------------------------


async def devices_of(session: AsyncSession, *, user_id: uuid.UUID) -> Sequence[Device]:
    statement = (
        select(Device)
        .where(Device.user_id == user_id)
        .order_by(col(Device.created_at), col(Device.id))
    )
    return (await session.exec(statement)).all()


async def device_by_token(
    session: AsyncSession, *, platform: str, token_hash: str
) -> Device | None:
    statement = (
        select(Device)
        .where(Device.platform == platform, Device.token_hash == token_hash)
        .execution_options(populate_existing=True)
    )
    return (await session.exec(statement)).first()


async def count_devices(session: AsyncSession, *, user_id: uuid.UUID) -> int:
    statement = select(func.count()).select_from(Device).where(Device.user_id == user_id)
    return (await session.exec(statement)).one()


async def add_device(session: AsyncSession, *, device: Device) -> None:
    session.add(device)
    await session.flush()


async def delete_device(session: AsyncSession, *, user_id: uuid.UUID, device_id: uuid.UUID) -> bool:
    """Delete the device if it is this user's; False when there was none."""
    statement = delete(Device).where(col(Device.id) == device_id, col(Device.user_id) == user_id)
    result = await session.exec(statement)
    return bool(result.rowcount)


async def stale_device_owners(
    session: AsyncSession, *, before: datetime, limit: int
) -> list[uuid.UUID]:
    """Up to `limit` users with a device whose token was last registered before `before`."""
    statement = (
        select(Device.user_id)
        .where(col(Device.token_updated_at) < before)
        .group_by(col(Device.user_id))
        .order_by(col(Device.user_id))
        .limit(limit)
    )
    return list((await session.exec(statement)).all())


async def delete_stale_devices(
    session: AsyncSession, *, user_ids: Iterable[uuid.UUID], before: datetime
) -> set[uuid.UUID]:
    """Delete these users' devices not registered again since `before`, in one statement; the
    users who lost one."""
    wanted = set(user_ids)
    if not wanted:
        return set()
    statement = (
        delete(Device)
        .where(col(Device.user_id).in_(wanted), col(Device.token_updated_at) < before)
        .returning(col(Device.user_id))
    )
    result = await session.exec(statement)
    return set(result.scalars().all())


# --- preferences --------------------------------------------------------------------------------


async def preferences_of(session: AsyncSession, *, user_id: uuid.UUID) -> Preferences:
    """The user's preferences row (created with the user; recreated with defaults if missing)."""
    preferences = await session.get(Preferences, user_id, populate_existing=True)
    if preferences is None:
        preferences = Preferences(user_id=user_id)
        session.add(preferences)
        await session.flush()
    return preferences


async def breakthrough_users_of(session: AsyncSession, *, user_id: uuid.UUID) -> list[uuid.UUID]:
    """Whose direct messages push to the user even in quiet hours or Do Not Disturb, by id."""
    statement = (
        select(BreakthroughUser.breakthrough_id)
        .where(BreakthroughUser.user_id == user_id)
        .order_by(col(BreakthroughUser.breakthrough_id))
    )
    return list((await session.exec(statement)).all())


async def replace_breakthrough_users(
    session: AsyncSession, *, user_id: uuid.UUID, breakthrough_ids: Iterable[uuid.UUID]
) -> None:
    """Make the user's breakthrough users exactly `breakthrough_ids` (existing users)."""
    wanted = set(breakthrough_ids)
    current = set(await breakthrough_users_of(session, user_id=user_id))
    if current - wanted:
        await session.exec(
            delete(BreakthroughUser).where(
                col(BreakthroughUser.user_id) == user_id,
                col(BreakthroughUser.breakthrough_id).in_(current - wanted),
            )
        )
    session.add_all(
        BreakthroughUser(user_id=user_id, breakthrough_id=breakthrough_id)
        for breakthrough_id in sorted(wanted - current)
    )
    await session.flush()


async def room_settings_of(session: AsyncSession, *, user_id: uuid.UUID) -> list[RoomSettings]:
    """The user's settings of every room they set something for, by room id."""
    statement = (
        select(RoomSettings)
        .where(RoomSettings.user_id == user_id)
        .order_by(col(RoomSettings.room_id))
        .execution_options(populate_existing=True)
    )
    return list((await session.exec(statement)).all())


async def room_settings(
    session: AsyncSession, *, user_id: uuid.UUID, room_id: uuid.UUID
) -> RoomSettings:
    """The user's settings of one room (a new, empty row if they set nothing there yet)."""
    settings = await session.get(RoomSettings, (user_id, room_id), populate_existing=True)
    return settings or new_room_settings(session, user_id=user_id, room_id=room_id)


def new_room_settings(
    session: AsyncSession, *, user_id: uuid.UUID, room_id: uuid.UUID
) -> RoomSettings:
    """An empty settings row for a room the user set nothing for yet (written at flush)."""
    settings = RoomSettings(user_id=user_id, room_id=room_id)
    session.add(settings)
    return settings


# --- rooms and members --------------------------------------------------------------------------


async def add_room(
    session: AsyncSession,
    *,
    room: Room,
    member_ids: Sequence[uuid.UUID],
    invited_ids: Sequence[uuid.UUID] = (),
) -> None:
    """The room with its members, and invitations from its creator to `invited_ids`."""
    session.add(room)
    await session.flush()
    session.add_all(
        RoomMember(room_id=room.id, user_id=user_id, joined_at=room.created_at)
        for user_id in member_ids
    )
    session.add_all(
        RoomMember(
            room_id=room.id,
            user_id=user_id,
            joined_at=room.created_at,
            state=INVITED,
            invited_by=room.created_by,
        )
        for user_id in invited_ids
    )
    await session.flush()


async def room_by_direct_key(session: AsyncSession, *, key: str) -> Room | None:
    statement = select(Room).where(col(Room.direct_key) == key)
    return (await session.exec(statement)).first()


async def room_for_member(
    session: AsyncSession, *, room_id: uuid.UUID, user_id: uuid.UUID, lock: bool = False
) -> Room | None:
    """The room, if `user_id` is one of its members (not merely invited): one query, so no one
    learns that a room exists without being in it. `lock` serialises changes to its membership
    (PostgreSQL)."""
    statement = (
        select(Room)
        .join(RoomMember, col(RoomMember.room_id) == col(Room.id))
        .where(
            col(Room.id) == room_id,
            col(RoomMember.user_id) == user_id,
            col(RoomMember.state) == MEMBER,
        )
    )
    if lock:
        statement = statement.with_for_update(of=Room)
    return (await session.exec(statement)).first()


async def membership(
    session: AsyncSession, *, room_id: uuid.UUID, user_id: uuid.UUID
) -> tuple[Room, RoomMember] | None:
    """The room and the user's row in it, member or invited (locked on PostgreSQL)."""
    statement = (
        select(Room, RoomMember)
        .join(RoomMember, col(RoomMember.room_id) == col(Room.id))
        .where(col(Room.id) == room_id, col(RoomMember.user_id) == user_id)
        .with_for_update(of=RoomMember)
        .execution_options(populate_existing=True)
    )
    row = (await session.exec(statement)).first()
    return None if row is None else (row[0], row[1])


async def remove_membership(
    session: AsyncSession, *, room_id: uuid.UUID, user_id: uuid.UUID
) -> None:
    await session.exec(
        delete(RoomMember).where(
            col(RoomMember.room_id) == room_id, col(RoomMember.user_id) == user_id
        )
    )


async def member_ids(session: AsyncSession, *, room_id: uuid.UUID) -> list[uuid.UUID]:
    """The room's members (not the invited), by join time."""
    statement = (
        select(RoomMember.user_id)
        .where(RoomMember.room_id == room_id, col(RoomMember.state) == MEMBER)
        .order_by(col(RoomMember.joined_at), col(RoomMember.user_id))
    )
    return list((await session.exec(statement)).all())


async def people_in(session: AsyncSession, *, room_id: uuid.UUID) -> set[uuid.UUID]:
    """Everyone in the room: its members and the invited."""
    statement = select(RoomMember.user_id).where(RoomMember.room_id == room_id)
    return set((await session.exec(statement)).all())


async def invite(
    session: AsyncSession, *, room_id: uuid.UUID, user_id: uuid.UUID, invited_by: uuid.UUID
) -> bool:
    """Idempotent: True if the user was invited now, False if already invited or a member."""
    values: dict[str, Any] = {
        "room_id": room_id,
        "user_id": user_id,
        "joined_at": utc_now(),
        "state": INVITED,
        "invited_by": invited_by,
    }
    table = RoomMember.__table__  # type: ignore[attr-defined]
    if await _dialect(session) == "postgresql":
        statement: Any = postgresql.insert(table).values(values).on_conflict_do_nothing()
    else:
        statement = sqlite.insert(table).values(values).on_conflict_do_nothing()
    result = await session.exec(statement)
    return bool(result.rowcount)


async def rooms_of_member(
    session: AsyncSession, *, user_id: uuid.UUID, room_ids: Iterable[uuid.UUID]
) -> set[uuid.UUID]:
    """Which of `room_ids` the user is a member of."""
    wanted = set(room_ids)
    if not wanted:
        return set()
    statement = select(RoomMember.room_id).where(
        RoomMember.user_id == user_id,
        col(RoomMember.room_id).in_(wanted),
        col(RoomMember.state) == MEMBER,
    )
    return set((await session.exec(statement)).all())


async def rooms_of(
    session: AsyncSession, *, user_id: uuid.UUID
) -> Sequence[tuple[Room, RoomMember]]:
    """Every room the user is in or invited to, with their row, newest first."""
    statement = (
        select(Room, RoomMember)
        .join(RoomMember, col(RoomMember.room_id) == col(Room.id))
        .where(col(RoomMember.user_id) == user_id)
        .order_by(col(RoomMember.joined_at).desc(), col(Room.id))
    )
    return [(room, member) for room, member in (await session.exec(statement)).all()]


async def message_in_room(
    session: AsyncSession, *, room_id: uuid.UUID, message_id: uuid.UUID, lock: bool = False
) -> Message | None:
    """The message, if it is in this room and not deleted. `lock` serialises its author's edits
    and deletes (PostgreSQL)."""
    statement = select(Message).where(
        Message.id == message_id,
        Message.room_id == room_id,
        col(Message.deleted_at).is_(None),
    )
    if lock:
        statement = statement.with_for_update().execution_options(populate_existing=True)
    return (await session.exec(statement)).first()


async def unread_counts(
    session: AsyncSession, *, user_id: uuid.UUID, room_ids: Iterable[uuid.UUID]
) -> dict[uuid.UUID, int]:
    """Per room: the messages of others after the user's read marker (or, without one, after
    they joined), deleted ones aside."""
    wanted = list(room_ids)
    if not wanted:
        return {}
    since = func.coalesce(RoomMember.read_up_to, RoomMember.joined_at)
    statement = (
        select(Message.room_id, func.count())
        .join(
            RoomMember,
            and_(
                col(RoomMember.room_id) == col(Message.room_id),
                col(RoomMember.user_id) == user_id,
            ),
        )
        .where(
            col(Message.room_id).in_(wanted),
            col(Message.sender_id) != user_id,
            col(Message.created_at) > since,
            col(Message.deleted_at).is_(None),
        )
        .group_by(col(Message.room_id))
    )
    return {room_id: count for room_id, count in (await session.exec(statement)).all()}


# --- blocks ---------------------------------------------------------------------------------------


async def blocked_by(session: AsyncSession, *, user_id: uuid.UUID) -> list[uuid.UUID]:
    """Whom the user blocked."""
    statement = (
        select(Block.blocked_id).where(Block.user_id == user_id).order_by(col(Block.blocked_id))
    )
    return list((await session.exec(statement)).all())


async def blockers_among(
    session: AsyncSession, *, user_ids: Iterable[uuid.UUID], blocked_id: uuid.UUID
) -> set[uuid.UUID]:
    """Which of `user_ids` blocked `blocked_id`, in one query."""
    wanted = set(user_ids)
    if not wanted:
        return set()
    statement = select(Block.user_id).where(
        col(Block.user_id).in_(wanted), Block.blocked_id == blocked_id
    )
    return set((await session.exec(statement)).all())


async def blocks(session: AsyncSession, *, user_id: uuid.UUID, blocked_id: uuid.UUID) -> bool:
    """Whether `user_id` blocked `blocked_id`."""
    return await session.get(Block, (user_id, blocked_id)) is not None


async def add_block(session: AsyncSession, *, user_id: uuid.UUID, blocked_id: uuid.UUID) -> None:
    if not await blocks(session, user_id=user_id, blocked_id=blocked_id):
        session.add(Block(user_id=user_id, blocked_id=blocked_id))
        await session.flush()


async def remove_block(session: AsyncSession, *, user_id: uuid.UUID, blocked_id: uuid.UUID) -> None:
    await session.exec(
        delete(Block).where(col(Block.user_id) == user_id, col(Block.blocked_id) == blocked_id)
    )


# --- messages -----------------------------------------------------------------------------------


async def messages_page(
    session: AsyncSession,
    *,
    room_id: uuid.UUID,
    limit: int,
    before: tuple[datetime, uuid.UUID] | None,
) -> Sequence[Message]:
    """Up to `limit` messages of the room, newest first, strictly older than `before`; deleted
    ones are skipped (a cursor is the position of a message listed, so skipping some moves no
    page)."""
    statement = select(Message).where(Message.room_id == room_id, col(Message.deleted_at).is_(None))
    if before is not None:
        created_at, message_id = before
        statement = statement.where(
            or_(
                col(Message.created_at) < created_at,
                and_(col(Message.created_at) == created_at, col(Message.id) < message_id),
            )
        )
    statement = statement.order_by(col(Message.created_at).desc(), col(Message.id).desc()).limit(
        limit
    )
    return (await session.exec(statement)).all()


# --- outbox -------------------------------------------------------------------------------------


def add_outbox_event(session: AsyncSession, *, event: Event, event_type: str) -> OutboxEvent:
    """Stage an event in the caller's transaction; it is published only if that commits."""
    row = OutboxEvent(**_outbox_values(event, event_type))
    session.add(row)
    session.info[OUTBOX_WRITTEN] = True
    return row


def claims_lock_rows(connection: AsyncConnection) -> bool:
    """Whether `claim_pending` keeps its rows locked until the transaction ends."""
    return connection.dialect.name == "postgresql"


# The relay's transactions say so (`application_name`): they only update and delete outbox
# rows, never write one, so the real-time stream's horizon need not wait for them while they
# wait for the broker (`_PG_HORIZON`).
RELAY_APPLICATION_NAME = "herald-outbox-relay"


@dataclass(frozen=True)
class PendingEvent:
    """An outbox row the relay claimed: what it needs to publish the event and to say so."""

    seq: int
    event_id: uuid.UUID
    event_type: str
    payload: str
    attempts: int
    traceparent: str | None


# The relay takes every cycle, so its statements are built once, in SQLAlchemy Core: no session,
# identity map or ORM-enabled update per cycle (they were most of the relay's CPU).
_NAME_RELAY = text("SELECT set_config('application_name', :name, true)")
_CLAIM_PENDING = (
    core_select(
        _outbox.c.seq,
        _outbox.c.event_id,
        _outbox.c.event_type,
        _outbox.c.payload,
        _outbox.c.attempts,
        _outbox.c.traceparent,
    )
    .where(
        _outbox.c.published_at.is_(None),
        # Held rows (`record_failure`) are skipped: a filter on the rows the scan of
        # `ix_outbox_pending` yields in `seq` order, which stops once it has `limit` rows.
        or_(_outbox.c.retry_at.is_(None), _outbox.c.retry_at <= bindparam("now")),
    )
    .order_by(_outbox.c.seq)
    .limit(bindparam("limit"))
)
# PostgreSQL: locked until the transaction ends, and skipped by other relays meanwhile.
_CLAIM_PENDING_LOCKED = _CLAIM_PENDING.with_for_update(skip_locked=True)
_MARK_PUBLISHED = (
    update(_outbox)
    # One array parameter on PostgreSQL: one statement whatever the batch's size, where an
    # expanding IN would be a statement (prepared on every pooled connection) per size.
    .where(AnyOf(_outbox.c.seq, "seqs"))
    .values(
        published_at=bindparam("at"),
        attempts=_outbox.c.attempts + 1,
        last_error=None,
        retry_at=None,
    )
)
_RECORD_FAILURE = (
    update(_outbox)
    .where(_outbox.c.seq == bindparam("failed_seq"))
    .values(
        attempts=_outbox.c.attempts + 1,
        last_error=bindparam("error"),
        retry_at=bindparam("retry_at"),
    )
)


async def claim_pending(
    connection: AsyncConnection, *, limit: int, now: datetime
) -> list[PendingEvent]:
    """The oldest unpublished rows, but those held until after `now`. On PostgreSQL they stay
    locked until the transaction ends and other relays skip them, so two replicas never publish
    the same row at the same time."""
    if claims_lock_rows(connection):
        await connection.execute(_NAME_RELAY, {"name": RELAY_APPLICATION_NAME})
        statement = _CLAIM_PENDING_LOCKED
    else:
        statement = _CLAIM_PENDING
    result = await connection.execute(statement, {"limit": limit, "now": now})
    return [PendingEvent(**row._mapping) for row in result]


async def mark_published(connection: AsyncConnection, *, seqs: Sequence[int], at: datetime) -> None:
    if seqs:
        await connection.execute(_MARK_PUBLISHED, {"seqs": list(seqs), "at": at})


async def record_failure(
    connection: AsyncConnection, *, seq: int, error: str, retry_at: datetime | None = None
) -> None:
    """Count a failed attempt at the row; it stays pending, and is not claimed again before
    `retry_at` (None: at once, in its turn)."""
    await connection.execute(
        _RECORD_FAILURE, {"failed_seq": seq, "error": error, "retry_at": retry_at}
    )


async def pending_stats(connection: AsyncConnection) -> tuple[int, datetime | None]:
    """How many rows wait, and since when the oldest one does (held rows count: they are not
    published)."""
    statement = core_select(func.count(), func.min(_outbox.c.created_at)).where(
        _outbox.c.published_at.is_(None)
    )
    count, oldest = (await connection.execute(statement)).one()
    return int(count), oldest


async def purge_published(connection: AsyncConnection, *, before: datetime) -> int:
    result = await connection.execute(delete(_outbox).where(_outbox.c.published_at < before))
    return int(result.rowcount)


# --- the real-time stream's reads of the outbox (`stream.py`) ----------------------------------


@dataclass(frozen=True, order=True)
class StreamPosition:
    """Where a row stands in the stream: its transaction's id (0 on SQLite), then its `seq`."""

    xid: int
    seq: int


@dataclass(frozen=True)
class StreamRow:
    position: StreamPosition
    payload: str


# No transaction id or seq reaches this: "no upper bound".
_END = StreamPosition(2**62, 2**62)

# The oldest transaction of this database that may still write a row: the oldest one running
# here (the relay's aside: they never write one), or the snapshot's xmax (every id below it
# has ended, or is running and so counted) if that is older. Every row with a lower
# transaction id is committed (or never will be) once this is read, and a statement after it
# sees all of them. Only this database's transactions count (a long one in another database
# of the server holds nothing back), as `pg_stat_activity` shows them to a session of the same
# role. It shows 32-bit ids: each is widened to the 64-bit id nearest the snapshot's xmax
# (a running id is within 2^31 of it, above as often as below: xmax is the newest ended id
# plus one, and later ids may be running).
_PG_HORIZON = text(
    "WITH next AS (SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS id),"
    " running AS ("
    "   SELECT activity.backend_xid::text::bigint - (next.id & 4294967295) AS ahead"
    "   FROM next JOIN pg_stat_activity AS activity"
    "     ON activity.datname = current_database() AND activity.backend_xid IS NOT NULL"
    "     AND activity.application_name IS DISTINCT FROM :relay"
    " )"
    " SELECT next.id + least(0, coalesce(min("
    "   CASE WHEN ahead >= 2147483648 THEN ahead - 4294967296"
    "   WHEN ahead < -2147483648 THEN ahead + 4294967296 ELSE ahead END"
    " ), 0)) FROM next LEFT JOIN running ON true GROUP BY next.id"
)
# Both read the event types the stream carries (`stream.py`).
_PG_STREAM_ROWS = text(
    "SELECT xid, seq, payload FROM outbox"
    " WHERE xid IS NOT NULL AND (xid, seq) > (:xid, :seq)"
    " AND (xid, seq) <= (:until_xid, :until_seq) AND xid < :horizon"
    " AND event_type IN ('new_message', 'invitation_created', 'room_read',"
    " 'message_edited', 'message_deleted', 'inbox_items_updated')"
    " ORDER BY xid, seq LIMIT :limit"
)
_SQLITE_STREAM_ROWS = text(
    "SELECT 0 AS xid, seq, payload FROM outbox"
    " WHERE seq > :seq AND seq <= :until_seq"
    " AND event_type IN ('new_message', 'invitation_created', 'room_read',"
    " 'message_edited', 'message_deleted', 'inbox_items_updated')"
    " ORDER BY seq LIMIT :limit"
)


async def live_sessions(
    engine: AsyncEngine, session_ids: Collection[uuid.UUID], *, now: datetime
) -> set[uuid.UUID]:
    """Which of these sessions exist and have not expired by `now`."""
    async with autocommit(engine) as connection:
        rows = await connection.execute(
            core_select(_sessions.c.id).where(
                _sessions.c.id.in_(session_ids), _sessions.c.expires_at > now
            )
        )
        return {row.id for row in rows}


async def stream_head(engine: AsyncEngine) -> StreamPosition:
    """The stream's "now": every row at or before it is readable, no row written later (or
    still uncommitted) will ever be."""
    async with autocommit(engine) as connection:
        if engine.dialect.name == "postgresql":
            horizon = await connection.scalar(_PG_HORIZON, {"relay": RELAY_APPLICATION_NAME})
            return StreamPosition(int(horizon), 0)
        seq = await connection.scalar(core_select(func.coalesce(func.max(_outbox.c.seq), 0)))
        return StreamPosition(0, int(seq or 0))


async def stream_rows(
    engine: AsyncEngine,
    *,
    after: StreamPosition,
    until: StreamPosition = _END,
    limit: int,
) -> list[StreamRow]:
    """The stream's rows after `after` (and at or before `until`), in stream order, at most
    `limit`; only those no uncommitted row can precede."""
    parameters = {
        "xid": after.xid,
        "seq": after.seq,
        "until_xid": until.xid,
        "until_seq": until.seq,
        "limit": limit,
    }
    async with autocommit(engine) as connection:
        if engine.dialect.name == "postgresql":
            # Two statements: the rows' snapshot is taken after the horizon was read.
            horizon = await connection.scalar(_PG_HORIZON, {"relay": RELAY_APPLICATION_NAME})
            parameters["horizon"] = int(horizon)
            result = await connection.execute(_PG_STREAM_ROWS, parameters)
        else:
            result = await connection.execute(_SQLITE_STREAM_ROWS, parameters)
        return [
            StreamRow(StreamPosition(int(row.xid), int(row.seq)), row.payload) for row in result
        ]


async def room_audiences(
    engine: AsyncEngine, *, authors: Iterable[tuple[uuid.UUID, uuid.UUID]]
) -> dict[tuple[uuid.UUID, uuid.UUID], frozenset[uuid.UUID]]:
    """Per (room, author): the room's members now (not the invited), those who blocked the
    author aside; two queries whatever the number of pairs."""
    wanted = set(authors)
    if not wanted:
        return {}
    rooms = {room_id for room_id, _ in wanted}
    senders = {sender_id for _, sender_id in wanted}
    async with autocommit(engine) as connection:
        members = (
            await connection.execute(
                core_select(_members.c.room_id, _members.c.user_id).where(
                    _members.c.room_id.in_(rooms), _members.c.state == MEMBER
                )
            )
        ).all()
        blocks = (
            await connection.execute(
                core_select(_blocks.c.user_id, _blocks.c.blocked_id).where(
                    _blocks.c.blocked_id.in_(senders)
                )
            )
        ).all()
    in_room: dict[uuid.UUID, set[uuid.UUID]] = {}
    for row in members:
        in_room.setdefault(row.room_id, set()).add(row.user_id)
    blockers: dict[uuid.UUID, set[uuid.UUID]] = {}
    for row in blocks:
        blockers.setdefault(row.blocked_id, set()).add(row.user_id)
    return {
        (room_id, sender_id): frozenset(
            in_room.get(room_id, set()) - blockers.get(sender_id, set())
        )
        for room_id, sender_id in wanted
    }


# --- the notification inbox ---------------------------------------------------------------------


# The outbox rows that carry inbox items to their users' real-time streams: never published
# (written as published), only read by the streams' tail (`stream.py`).
INBOX_STREAM_EVENT_TYPE = "inbox_items_updated"


_INBOX_UPSERT_COLUMNS = (
    "user_id",
    "message_id",
    "room_id",
    "trigger",
    "message_created_at",
    "decided_at",
    "deliveries",
    "version",
)


def _inbox_upsert(statement: Any) -> Any:
    """Each item only over an older version of it; the keys of the rows that changed."""
    return statement.on_conflict_do_update(
        index_elements=[_inbox.c.user_id, _inbox.c.message_id],
        set_={
            name: statement.excluded[name]
            for name in ("trigger", "message_created_at", "decided_at", "deliveries", "version")
        },
        where=_inbox.c.version < statement.excluded.version,
    ).returning(_inbox.c.user_id, _inbox.c.message_id)


def _array_of(column: Any) -> ARRAY[Any]:
    item = column.type.impl if isinstance(column.type, TypeDecorator) else column.type
    return ARRAY(item)


_incoming = (
    func.unnest(
        *(bindparam(name, type_=_array_of(_inbox.c[name])) for name in _INBOX_UPSERT_COLUMNS)
    )
    .table_valued(*_INBOX_UPSERT_COLUMNS)
    .render_derived(name="incoming")
)
_INBOX_UPSERT_POSTGRES = _inbox_upsert(
    postgresql.insert(_inbox).from_select(
        list(_INBOX_UPSERT_COLUMNS),
        core_select(*(_incoming.c[name] for name in _INBOX_UPSERT_COLUMNS)),
    )
)


async def apply_inbox_items(session: AsyncSession, event: InboxItemsUpdated) -> int:
    """Upsert the event's items, each only over an older version of it (a replayed or late
    event changes nothing), and put the changed ones on their users' real-time streams (one
    stream-only outbox row); how many items changed. The caller commits."""
    # A deleted account's items may still come (the router published them before it learnt):
    # they are not kept.
    gone = await deleted_user_ids(session, user_ids={item.user_id for item in event.items})
    items = {
        (item.user_id, item.message_id): item for item in event.items if item.user_id not in gone
    }
    rows = [
        {
            "user_id": item.user_id,
            "message_id": item.message_id,
            "room_id": item.room_id,
            "trigger": str(item.trigger),
            "message_created_at": item.message_created_at or item.decided_at,
            "decided_at": item.decided_at,
            "deliveries": json.dumps(
                [delivery.model_dump(mode="json") for delivery in item.deliveries]
            ),
            "version": event.version,
        }
        for item in items.values()
    ]
    connection = await session.connection()
    if not rows:
        changed: Sequence[Any] = []
    elif connection.dialect.name == "postgresql":
        # The rows travel as one array per column: one statement text whatever their number.
        # As a multi-row VALUES (what SQLAlchemy makes of many rows with RETURNING) each number
        # of rows up to 500 is a statement of its own, of up to 4,000 parameters, and asyncpg
        # keeps each one prepared on each pooled connection: most of the 60 MB message-service
        # grew by over a 12,000-message benchmark run (docs/performance.md).
        columns = {name: [row[name] for row in rows] for name in _INBOX_UPSERT_COLUMNS}
        changed = (await connection.execute(_INBOX_UPSERT_POSTGRES, columns)).all()
    else:
        changed = (await connection.execute(_inbox_upsert(sqlite.insert(_inbox)), rows)).all()
    if changed:
        # One row for all of them: the streams split it per user when they read it.
        update_event = InboxItemsUpdated(
            version=event.version, items=[items[(user, message)] for user, message in changed]
        )
        await connection.execute(
            insert(_outbox),
            _outbox_values(update_event, INBOX_STREAM_EVENT_TYPE) | {"published_at": utc_now()},
        )
    return len(changed)


@dataclass(frozen=True)
class InboxRow:
    """An inbox item with what this service knows of its message, for listing."""

    message_id: uuid.UUID
    room_id: uuid.UUID
    room_name: str | None
    trigger: str
    message_created_at: datetime
    decided_at: datetime
    deliveries: str
    sender_id: uuid.UUID | None
    sender_username: str | None
    sender_display_name: str | None
    content: str | None  # None: an invitation, or no preview wanted
    read: bool


def _inbox_select(user_id: uuid.UUID) -> tuple[Any, Any]:
    """The user's inbox items joined with what this service knows of them, and the condition
    "read", for filtering: a message's item once the room's read marker is at or past it; an
    invitation's once it no longer waits for an answer (the user joined or declined, or this is
    an earlier invitation to a room they have been invited to again: its row is newer)."""
    read_up_to = _members.c.read_up_to
    message_read = and_(read_up_to.is_not(None), _inbox.c.message_created_at <= read_up_to)
    invitation_waits = and_(
        _members.c.state == INVITED, _inbox.c.message_created_at >= _members.c.joined_at
    )
    read = case(
        (_inbox.c.trigger == Trigger.INVITATION.value, ~func.coalesce(invitation_waits, False)),
        else_=func.coalesce(message_read, False),
    )
    # The text only for a member of the room now: whoever left (or was removed) keeps the item,
    # but a room's messages, and their later edits, are its members'.
    preview = and_(func.coalesce(_preferences.c.push_preview, True), _members.c.state == MEMBER)
    return (
        core_select(
            _inbox.c.message_id,
            _inbox.c.room_id,
            _rooms.c.name.label("room_name"),
            _inbox.c.trigger,
            _inbox.c.message_created_at,
            _inbox.c.decided_at,
            _inbox.c.deliveries,
            _messages.c.sender_id,
            _users.c.username.label("sender_username"),
            _users.c.display_name.label("sender_display_name"),
            case((preview, _messages.c.content), else_=None).label("content"),
            read.label("read"),
        )
        .select_from(
            _inbox.outerjoin(_messages, _messages.c.id == _inbox.c.message_id)
            .outerjoin(_users, _users.c.id == _messages.c.sender_id)
            .outerjoin(_rooms, _rooms.c.id == _inbox.c.room_id)
            .outerjoin(
                _members,
                and_(_members.c.room_id == _inbox.c.room_id, _members.c.user_id == user_id),
            )
            .outerjoin(_preferences, _preferences.c.user_id == user_id)
        )
        # A deleted message leaves the inbox with its text.
        .where(_inbox.c.user_id == user_id, _messages.c.deleted_at.is_(None)),
        read,
    )


async def inbox_page(
    engine: AsyncEngine,
    *,
    user_id: uuid.UUID,
    limit: int,
    before: tuple[datetime, uuid.UUID] | None,
    unread_only: bool,
) -> list[InboxRow]:
    """Up to `limit` items of the user's inbox, newest first, strictly older than `before`."""
    statement, read = _inbox_select(user_id)
    if before is not None:
        created_at, message_id = before
        statement = statement.where(
            or_(
                _inbox.c.message_created_at < created_at,
                and_(_inbox.c.message_created_at == created_at, _inbox.c.message_id < message_id),
            )
        )
    if unread_only:
        statement = statement.where(~read)
    statement = statement.order_by(
        _inbox.c.message_created_at.desc(), _inbox.c.message_id.desc()
    ).limit(limit)
    async with autocommit(engine) as connection:
        return [InboxRow(**row._mapping) for row in await connection.execute(statement)]


async def inbox_item(
    engine: AsyncEngine, *, user_id: uuid.UUID, message_id: uuid.UUID
) -> InboxRow | None:
    statement, _ = _inbox_select(user_id)
    async with autocommit(engine) as connection:
        row = (await connection.execute(statement.where(_inbox.c.message_id == message_id))).first()
    return None if row is None else InboxRow(**row._mapping)


async def messages_to_read(
    session: AsyncSession, *, user_id: uuid.UUID, message_ids: Sequence[uuid.UUID] | None
) -> list[tuple[RoomMember, Message]]:
    """What "mark as read" moves, per room the user is a member of: the newest of the inbox's
    `message_ids` there, or (None: everything) the room's newest message; deleted messages and
    rooms the user only was invited to aside. The member rows come locked (PostgreSQL)."""
    ranked = select(
        Message.id,
        func.row_number()
        .over(
            partition_by=col(Message.room_id),
            order_by=(col(Message.created_at).desc(), col(Message.id).desc()),
        )
        .label("rank"),
    ).where(col(Message.deleted_at).is_(None))
    if message_ids is None:
        ranked = ranked.join(
            RoomMember,
            and_(
                col(RoomMember.room_id) == col(Message.room_id),
                col(RoomMember.user_id) == user_id,
                col(RoomMember.state) == MEMBER,
            ),
        )
    else:
        ranked = ranked.join(
            _inbox,
            and_(_inbox.c.message_id == col(Message.id), _inbox.c.user_id == user_id),
        ).where(col(Message.id).in_(list(message_ids)))
    newest = ranked.subquery()
    statement = (
        select(RoomMember, Message)
        .join(Message, col(Message.room_id) == col(RoomMember.room_id))
        .join(newest, and_(newest.c.id == col(Message.id), newest.c.rank == 1))
        .where(col(RoomMember.user_id) == user_id, col(RoomMember.state) == MEMBER)
        # In one order: two devices marking everything read at once wait, never deadlock.
        .order_by(col(RoomMember.room_id))
        .with_for_update(of=RoomMember)
        .execution_options(populate_existing=True)
    )
    return [(member, message) for member, message in (await session.exec(statement)).all()]


async def prune_inbox(engine: AsyncEngine, *, before: datetime, batch: int) -> int:
    """Delete up to `batch` inbox items of messages older than `before`, oldest first, in one
    short statement (no long lock); how many."""
    oldest = (
        core_select(_inbox.c.user_id, _inbox.c.message_id)
        .where(_inbox.c.message_created_at < before)
        .order_by(_inbox.c.message_created_at)
        .limit(batch)
    )
    async with engine.begin() as connection:
        result = await connection.execute(
            delete(_inbox).where(tuple_(_inbox.c.user_id, _inbox.c.message_id).in_(oldest))
        )
    return max(result.rowcount, 0)


async def unread_by_user(
    engine: AsyncEngine, user_ids: Collection[uuid.UUID]
) -> dict[uuid.UUID, dict[uuid.UUID, int]]:
    """Per user, per room they are a member of with something unread: the messages of others
    after their read marker (or, without one, after they joined), deleted ones aside. One query
    for them all (the badge of the real-time stream)."""
    if not user_ids:
        return {}
    member = _members
    since = func.coalesce(member.c.read_up_to, member.c.joined_at)
    statement = (
        core_select(member.c.user_id, _messages.c.room_id, func.count())
        .select_from(member.join(_messages, _messages.c.room_id == member.c.room_id))
        .where(
            member.c.user_id.in_(list(user_ids)),
            member.c.state == MEMBER,
            _messages.c.sender_id != member.c.user_id,
            _messages.c.created_at > since,
            _messages.c.deleted_at.is_(None),
        )
        .group_by(member.c.user_id, _messages.c.room_id)
    )
    counts: dict[uuid.UUID, dict[uuid.UUID, int]] = {user_id: {} for user_id in user_ids}
    async with autocommit(engine) as connection:
        for user_id, room_id, count in await connection.execute(statement):
            counts[user_id][room_id] = int(count)
    return counts


# --- e-mail verification ------------------------------------------------------------------------

_verification_sends = _table(EmailVerificationSend)
_email_bounces = _table(EmailBounce)


async def claim_verification_send(
    session: AsyncSession, *, address_key: str, now: datetime, interval: timedelta
) -> datetime | None:
    """Record that a verification e-mail goes to the address now, unless one went there less
    than `interval` ago: None when claimed, else when the last one went. One statement, so two
    registrations of one address at once send one e-mail (on PostgreSQL the second waits for
    the first's row lock, then finds its time too recent); it commits or rolls back with the
    caller's transaction, like the outbox row of the e-mail."""
    connection = await session.connection()
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    statement = dialect.insert(_verification_sends).values(address_key=address_key, sent_at=now)
    statement = statement.on_conflict_do_update(
        index_elements=[_verification_sends.c.address_key],
        set_={"sent_at": statement.excluded.sent_at},
        where=_verification_sends.c.sent_at <= now - interval,
    ).returning(_verification_sends.c.address_key)
    if (await connection.execute(statement)).first() is not None:
        return None
    last: datetime | None = (
        await connection.execute(
            core_select(_verification_sends.c.sent_at).where(
                _verification_sends.c.address_key == address_key
            )
        )
    ).scalar_one_or_none()
    return last if last is not None else now


async def add_email_bounce(
    session: AsyncSession, *, notification_id: uuid.UUID, user_id: uuid.UUID, now: datetime
) -> bool:
    """Record a bounced notification e-mail: True the first time, False for a redelivery."""
    connection = await session.connection()
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    statement = (
        dialect.insert(_email_bounces)
        .values(notification_id=notification_id, user_id=user_id, bounced_at=now)
        .on_conflict_do_nothing()
    )
    result = await connection.execute(statement)
    return bool(result.rowcount)
