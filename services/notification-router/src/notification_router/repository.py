"""Every SQL statement of notification-router.

Idempotency lives in unique keys: the projection's upsert only ever moves a row to a higher
version, the ledger insert is `ON CONFLICT DO NOTHING` on (message_id, recipient_id), and a
delivery report only moves a status forward. Works on PostgreSQL and SQLite.
"""

from __future__ import annotations

import uuid
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    Table,
    and_,
    bindparam,
    case,
    delete,
    func,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from herald_shared.database import AnyOf, PairsIn, autocommit, pairs_param
from herald_shared.events import Channel as EventChannel
from herald_shared.events import (
    DeliveryOutcome,
    DeliveryReported,
    DeviceSnapshot,
    EmailRequested,
    Level,
    MessageChanged,
    MessageDeleted,
    MessageEdited,
    Notifiable,
    Platform,
    PreferencesSnapshot,
    PresenceChanged,
    PushRequested,
    QuietHoursSnapshot,
    RoomLeft,
    RoomRead,
    UserUpdated,
    WebPushKeys,
)
from notification_router.routing import (
    DeliveryStatus,
    Device,
    MessageChange,
    Presence,
    QuietHours,
    RecalledPushes,
    Recipient,
    RecipientDecision,
    RoomSettings,
    ShownPush,
    SkipReason,
    WindowPlan,
    digest_notification_id,
    room_settings_of,
    statuses_replaceable_by,
)
from notification_router.tables import (
    WINDOW_WAITING,
    inbox_changes,
    inbox_relay,
    message_changes,
    notification_deliveries,
    notifications,
    presence_connections,
    read_markers,
    recipients,
    rooms_in_view,
    unread_counts,
    waiting_windows,
    window_entries,
)

REASON_MAX_CHARS = 200


def _ids(column: Any) -> Any:
    """`column IN (:ids)`, the list given at execution (`AnyOf`: one array on PostgreSQL): each
    statement below is built and compiled once, with no clause object made per id."""
    return AnyOf(column, "ids")


_deliveries = notification_deliveries.c
_LOAD_RECIPIENTS = select(recipients).where(_ids(recipients.c.user_id))
_PENDING_OF = select(_deliveries.notification_id).where(
    _ids(_deliveries.notification_id), _deliveries.status == str(DeliveryStatus.PENDING)
)
# Every ledger row of a message holds the same timestamp; MAX skips the rows written before the
# column existed (revision 0002), which hold NULL.
_message_created_at = func.max(notifications.c.message_created_at)
_CREATED_AT = (
    select(notifications.c.message_id, _message_created_at)
    .where(_ids(notifications.c.message_id))
    .group_by(notifications.c.message_id)
    .having(_message_created_at.is_not(None))
)
# A report moves a status only to one it may replace (`routing.statuses_replaceable_by`).
_APPLY_REPORT = (
    update(notification_deliveries)
    .where(
        _ids(_deliveries.notification_id),
        _deliveries.channel == bindparam("p_channel"),
        _deliveries.status.in_(bindparam("p_replaceable", expanding=True)),
    )
    .values(
        status=bindparam("p_status"), reason=bindparam("p_reason"), updated_at=bindparam("p_now")
    )
    .returning(_deliveries.notification_id, _deliveries.target)
)
_CHANNEL_OF = select(_deliveries.notification_id, _deliveries.channel).where(
    _ids(_deliveries.notification_id)
)


def _insert(connection: AsyncConnection, table: Table) -> postgresql.Insert | sqlite.Insert:
    dialect = connection.dialect.name
    if dialect == "postgresql":
        return postgresql.insert(table)
    if dialect == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"unsupported database dialect {dialect}")


# --- recipient projection -------------------------------------------------------------------


async def upsert_recipient(
    engine: AsyncEngine,
    snapshot: UserUpdated,
    *,
    now: datetime,
    push_window_due_at: datetime | None = None,
) -> bool:
    """Store the snapshot unless a row of the same or a higher version is already there, and in
    the same transaction what an applied snapshot changes beside it: a deleted account's rows go
    (`_forget_recipient`), and the user's waiting push window is due at `push_window_due_at`
    (`_reschedule_push_window`). One transaction, because a retry finds the version applied and
    would skip what a second transaction had not done.

    Returns whether it was applied. Replays and out-of-order deliveries therefore converge on
    the highest version, whatever order they arrive in (the version comparison happens under
    the row lock of the conflicting row on PostgreSQL).
    """
    values: dict[str, Any] = {
        "user_id": snapshot.user_id,
        "version": snapshot.version,
        "username": snapshot.username,
        "display_name": snapshot.display_name,
        "email": snapshot.email,
        "devices": [_device_json(device) for device in snapshot.devices],
        "push_enabled": snapshot.preferences.push_enabled,
        "email_enabled": snapshot.preferences.email_enabled,
        "push_preview": snapshot.preferences.push_preview,
        "muted_room_ids": [str(room_id) for room_id in snapshot.preferences.muted_room_ids],
        "push_level": str(snapshot.preferences.push_level),
        "email_level": str(snapshot.preferences.email_level),
        "room_settings": [
            _room_settings_json(room_id, settings)
            for room_id, settings in room_settings_of(snapshot.preferences).items()
        ],
        "time_zone": snapshot.time_zone,
        "email_delay": snapshot.preferences.email_delay,
        "quiet_hours": (
            None
            if snapshot.preferences.quiet_hours is None
            else snapshot.preferences.quiet_hours.model_dump(mode="json")
        ),
        "snoozed_until": snapshot.preferences.snoozed_until,
        "breakthrough_user_ids": [str(user) for user in snapshot.preferences.breakthrough_user_ids],
        "email_verified": snapshot.email_verified,
        "updated_at": now,
    }
    async with engine.begin() as connection:
        statement = _insert(connection, recipients).values(values)
        statement = statement.on_conflict_do_update(
            index_elements=[recipients.c.user_id],
            set_={name: statement.excluded[name] for name in values if name != "user_id"},
            where=recipients.c.version < statement.excluded.version,
        )
        result = await connection.execute(statement.returning(recipients.c.user_id))
        applied = result.first() is not None
        if applied and snapshot.deleted:
            await _forget_recipient(connection, snapshot.user_id)
        elif applied and push_window_due_at is not None:
            await _reschedule_push_window(connection, snapshot.user_id, push_window_due_at)
        return applied


async def _forget_recipient(connection: AsyncConnection, user_id: uuid.UUID) -> None:
    """A deleted account: delete what the router kept of the user beside the projection (which
    its last snapshot emptied): the windows that waited for them, with the e-mails and pushes
    composed for them (their address and device tokens), their presence, the room they had in
    view, their read markers and unread counts. The ledger's rows of them hold ids only."""
    for table in (
        waiting_windows,  # and their entries, by cascade
        presence_connections,
        rooms_in_view,
        read_markers,
        unread_counts,
    ):
        await connection.execute(delete(table).where(table.c.user_id == user_id))


class RecipientCache:
    """Recipients as last built from their projection rows, by user: a row of the version
    cached is not built again (a version names one snapshot, and a `Recipient` is immutable).
    Building one (devices, room settings, quiet hours) is most of what reading the projection
    costs the router. Bounded: the least recently used goes first."""

    def __init__(self, capacity: int = 10_000) -> None:
        self._capacity = capacity
        self._recipients: OrderedDict[uuid.UUID, Recipient] = OrderedDict()

    def built(self, row: Any) -> Recipient:
        """The recipient of a projection row, from the cache if it holds that version."""
        cached = self._recipients.get(row.user_id)
        if cached is not None and cached.version == row.version:
            self._recipients.move_to_end(row.user_id)
            return cached
        recipient = _recipient(row._mapping)
        self._recipients[row.user_id] = recipient
        self._recipients.move_to_end(row.user_id)
        if len(self._recipients) > self._capacity:
            self._recipients.popitem(last=False)
        return recipient


async def load_recipients(
    engine: AsyncEngine, user_ids: Iterable[uuid.UUID], cache: RecipientCache | None = None
) -> dict[uuid.UUID, Recipient]:
    """The projection rows of these users; users without a row are simply absent."""
    wanted = list(user_ids)
    if not wanted:
        return {}
    async with autocommit(engine) as connection:
        result = await connection.execute(_LOAD_RECIPIENTS, {"ids": wanted})
        if cache is None:
            return {row.user_id: _recipient(row._mapping) for row in result}
        return {row.user_id: cache.built(row) for row in result}


def _device_json(device: DeviceSnapshot) -> dict[str, Any]:
    keys = device.web_push_keys
    return {
        "device_id": str(device.device_id),
        "platform": str(device.platform),
        "token": device.token,
        "token_updated_at": (
            None if device.token_updated_at is None else device.token_updated_at.isoformat()
        ),
        "web_push_keys": None if keys is None else {"p256dh": keys.p256dh, "auth": keys.auth},
    }


def _device(device: dict[str, Any]) -> Device:
    # Rows written before these fields existed lack them: None, as in an older snapshot.
    updated_at = device.get("token_updated_at")
    keys = device.get("web_push_keys")
    return Device(
        device_id=uuid.UUID(device["device_id"]),
        platform=Platform(device["platform"]),
        token=device["token"],
        token_updated_at=None if updated_at is None else datetime.fromisoformat(updated_at),
        web_push_keys=None if keys is None else WebPushKeys(**keys),
    )


def _room_settings_json(room_id: uuid.UUID, settings: RoomSettings) -> dict[str, Any]:
    muted_until = settings.muted_until
    return {
        "room_id": str(room_id),
        "push": None if settings.push is None else str(settings.push),
        "email": None if settings.email is None else str(settings.email),
        "muted_until": None if muted_until is None else muted_until.isoformat(),
    }


def _room_settings(room: dict[str, Any]) -> RoomSettings:
    muted_until = room.get("muted_until")
    return RoomSettings(
        push=None if room.get("push") is None else Level(room["push"]),
        email=None if room.get("email") is None else Level(room["email"]),
        muted_until=None if muted_until is None else datetime.fromisoformat(muted_until),
    )


def _recipient(row: Any) -> Recipient:
    # Rows projected before levels existed (revision 0004) hold only the booleans and the
    # muted rooms: read them as their snapshot meant them.
    legacy = PreferencesSnapshot(
        push_enabled=row["push_enabled"],
        email_enabled=row["email_enabled"],
        muted_room_ids=[uuid.UUID(room_id) for room_id in row["muted_room_ids"]],
    )
    rooms = (
        room_settings_of(legacy)
        if row["room_settings"] is None
        else {uuid.UUID(room["room_id"]): _room_settings(room) for room in row["room_settings"]}
    )
    return Recipient(
        user_id=row["user_id"],
        version=row["version"],
        display_name=row["display_name"],
        email=row["email"],
        devices=tuple(_device(device) for device in row["devices"]),
        push_level=Level(row["push_level"]) if row["push_level"] else legacy.push_level,
        email_level=Level(row["email_level"]) if row["email_level"] else legacy.email_level,
        push_preview=row["push_preview"],
        rooms=rooms,
        time_zone=row["time_zone"],
        email_delay=timedelta(seconds=row["email_delay"]),
        quiet_hours=QuietHours.of(
            None if row["quiet_hours"] is None else QuietHoursSnapshot(**row["quiet_hours"])
        ),
        snoozed_until=None if row["snoozed_until"] is None else _utc(row["snoozed_until"]),
        breakthrough_user_ids=frozenset(
            uuid.UUID(user) for user in row["breakthrough_user_ids"] or ()
        ),
        email_verified=row["email_verified"],
    )


# --- notification ledger --------------------------------------------------------------------


@dataclass(frozen=True)
class UnreadCounts:
    """Users' unread messages: all rooms together, and per (user, room) for some rooms."""

    totals: Mapping[uuid.UUID, int]
    rooms: Mapping[tuple[uuid.UUID, uuid.UUID], int]


@dataclass(frozen=True)
class Recorded:
    """What `record_decisions` found: the (message, recipient) pairs decided for the first time
    now, the notifications (of these plans) still waiting for their sender, and the recipients'
    unread counts with these messages in."""

    new: frozenset[tuple[uuid.UUID, uuid.UUID]]
    pending_notification_ids: frozenset[uuid.UUID]
    unread: UnreadCounts = UnreadCounts({}, {})

    def new_recipient_ids(self) -> dict[uuid.UUID, set[uuid.UUID]]:
        """The recipients decided for the first time now, by message."""
        by_message: dict[uuid.UUID, set[uuid.UUID]] = defaultdict(set)
        for message_id, recipient_id in self.new:
            by_message[message_id].add(recipient_id)
        return by_message


Plan = tuple[Notifiable, Sequence[RecipientDecision]]


async def record_decisions(
    engine: AsyncEngine, plans: Sequence[Plan], *, now: datetime, email_delay_scale: float = 1.0
) -> Recorded:
    """Write one ledger row per message and recipient, and one delivery row per job, for every
    plan at once, in one transaction (three statements at most, whatever the number of
    messages).

    A recipient already in the ledger for that message (a redelivery, a retry, a concurrent
    duplicate) keeps its first decision: neither its row nor its deliveries change, even if the
    projection changed since. Returned as pending are the notifications of the plans whose
    delivery row is still `pending`, i.e. the jobs to (re)publish — the senders dedupe on
    `notification_id`. A waiting e-mail becomes an entry of its recipient's waiting digest, in
    the same transaction (`_add_to_windows`).
    """
    # One order for every transaction, so concurrent duplicates never deadlock.
    ordered = sorted(
        ((event, decision) for event, decisions in plans for decision in decisions),
        key=lambda pair: (pair[0].message_id, pair[1].recipient_id),
    )
    if not ordered:
        return Recorded(frozenset(), frozenset())
    async with engine.begin() as connection:
        # Rows as parameters rather than `.values(rows)`: one cached statement whatever the
        # batch (SQLAlchemy sends it as multi-row INSERTs), instead of a statement compiled
        # again for every batch.
        ledger = (
            _insert(connection, notifications)
            .on_conflict_do_nothing(
                index_elements=[notifications.c.message_id, notifications.c.recipient_id]
            )
            .returning(notifications.c.message_id, notifications.c.recipient_id)
        )
        inserted = await connection.execute(
            ledger,
            [
                {
                    "message_id": event.message_id,
                    "recipient_id": decision.recipient_id,
                    "room_id": event.room_id,
                    "mentioned": decision.mentioned,
                    "trigger": str(decision.trigger),
                    "push_decision": decision.push,
                    "email_decision": decision.email,
                    "decided_at": now,
                    "message_created_at": event.timestamp,
                }
                for event, decision in ordered
            ],
        )
        new = frozenset((row.message_id, row.recipient_id) for row in inserted)

        def is_new(event: Notifiable, decision: RecipientDecision) -> bool:
            return (event.message_id, decision.recipient_id) in new

        deliveries = sorted(
            (
                _delivery_row(job, now)
                for event, decision in ordered
                if is_new(event, decision)
                for job in decision.jobs
            ),
            key=lambda row: row["notification_id"],
        )
        if deliveries:
            statement = _insert(connection, notification_deliveries).on_conflict_do_nothing(
                index_elements=[notification_deliveries.c.notification_id]
            )
            await connection.execute(statement, deliveries)

        # The jobs of the recipients inserted now are pending: their rows were written just now,
        # in this transaction. Only the earlier recipients of a redelivered message need a look.
        pending = {
            job.notification_id
            for event, decision in ordered
            if is_new(event, decision)
            for job in decision.jobs
        }
        earlier = [
            job.notification_id
            for event, decision in ordered
            if not is_new(event, decision)
            for job in decision.jobs
        ]
        if earlier:
            result = await connection.execute(_PENDING_OF, {"ids": earlier})
            pending.update(result.scalars())
        waiting = [decision for event, decision in ordered if is_new(event, decision)]
        await _add_to_windows(connection, waiting, now=now, delay_scale=email_delay_scale)
        # Last: the counters' row locks (a room's members are shared by every message of the
        # room) are held for the commit only. Read back within the transaction, the counts
        # hold this batch's messages, and a room's those of every batch before (its row lock).
        # A room without a message counted now has no unread one of this batch to show.
        rooms = await _count_unread(
            connection,
            Counter(
                (decision.recipient_id, event.room_id)
                for event, decision in ordered
                if is_new(event, decision) and decision.unread
            ),
        )
        totals = await _unread_totals(
            connection, sorted({decision.recipient_id for _, decision in ordered})
        )
    return Recorded(new, frozenset(pending), UnreadCounts(totals, rooms))


@dataclass(frozen=True)
class _Waiting:
    """What one decision leaves waiting on one channel: the entry's content, and when a window
    it opens is due."""

    recipient_id: uuid.UUID
    message_id: uuid.UUID
    room_id: uuid.UUID
    channel: str  # an EventChannel, or RECALL_WINDOW
    job: dict[str, Any]
    due_at: datetime


def _waiting_of(
    decisions: Sequence[RecipientDecision], *, now: datetime, delay_scale: float
) -> list[_Waiting]:
    waiting: list[_Waiting] = []
    for decision in decisions:
        if (email := decision.waiting_email) is not None:
            waiting.append(
                _Waiting(
                    decision.recipient_id,
                    email.message_id,
                    email.room_id,
                    str(EventChannel.EMAIL),
                    email.model_dump(mode="json"),
                    now + decision.email_delay * delay_scale,
                )
            )
        if (held := decision.held_pushes) is not None and decision.push_due is not None:
            waiting.append(
                _Waiting(
                    decision.recipient_id,
                    held.message_id,
                    held.room_id,
                    str(EventChannel.PUSH),
                    held.model_dump(mode="json"),
                    decision.push_due,
                )
            )
    return waiting


async def _add_to_windows(
    connection: AsyncConnection,
    decisions: Sequence[RecipientDecision],
    *,
    now: datetime,
    delay_scale: float,
) -> None:
    """What waits joins its recipient's waiting window of that channel, opening one where there
    is none (an e-mail's due after the recipient's delay, pushes' when the quiet hours or the
    snooze end)."""
    await _enter_windows(
        connection, _waiting_of(decisions, now=now, delay_scale=delay_scale), now=now
    )


async def _enter_windows(
    connection: AsyncConnection,
    waiting: Sequence[_Waiting],
    *,
    now: datetime,
    gather: timedelta | None = None,
) -> None:
    """Each item becomes an entry of its recipient's waiting window of its channel, opening one
    where there is none (due at the item's `due_at`; an open window keeps its due time, unless
    it opened less than `gather` ago: then it is due at the item's, so that what comes in a
    burst goes out together, never later than `gather` plus one item's wait after the first).

    The upsert takes the waiting window's row lock until commit, so a dispatcher (which claims
    with SKIP LOCKED) cannot close the window under the entries being added; a window the
    dispatcher holds is no longer `waiting` once this upsert gets to it, so a new one opens.
    """
    if not waiting:
        return
    due = {(item.recipient_id, item.channel): item.due_at for item in waiting}
    insert = _insert(connection, waiting_windows)
    # A no-op change, for the row lock and RETURNING: the window keeps its due time.
    kept: dict[str, Any] = {"user_id": insert.excluded.user_id}
    gathering: dict[str, Any] = {}
    if gather is not None:
        kept = {
            "due_at": case(
                (_windows.opened_at > bindparam("p_gathering_since"), insert.excluded.due_at),
                else_=_windows.due_at,
            )
        }
        gathering = {"p_gathering_since": now - gather}
    upsert = insert.on_conflict_do_update(
        index_elements=[waiting_windows.c.user_id, waiting_windows.c.channel],
        # A literal, not a parameter: PostgreSQL matches the partial unique index by this
        # predicate, and a parameter stops matching once a prepared statement goes generic
        # (its sixth run on a connection: "no unique or exclusion constraint matching").
        index_where=text(f"state = '{WINDOW_WAITING}'"),
        set_=kept,
    ).returning(waiting_windows.c.window_id, waiting_windows.c.user_id, waiting_windows.c.channel)
    # One row per user and channel (ON CONFLICT DO UPDATE may touch a row once per statement),
    # in that order, like every transaction here.
    opened = await connection.execute(
        upsert,
        [
            {
                "window_id": uuid.uuid4(),
                "user_id": user_id,
                "channel": channel,
                "opened_at": now,
                "due_at": due_at,
                "state": WINDOW_WAITING,
                **gathering,
            }
            for (user_id, channel), due_at in sorted(due.items())
        ],
    )
    window_of = {(row.user_id, row.channel): row.window_id for row in opened}
    entries = _insert(connection, window_entries).on_conflict_do_nothing(
        index_elements=[
            window_entries.c.message_id,
            window_entries.c.recipient_id,
            window_entries.c.channel,
        ]
    )
    await connection.execute(
        entries,
        [
            {
                "message_id": item.message_id,
                "recipient_id": item.recipient_id,
                "channel": item.channel,
                "window_id": window_of[(item.recipient_id, item.channel)],
                "room_id": item.room_id,
                "job": item.job,
                "state": WINDOW_WAITING,
            }
            for item in waiting
        ],
    )


def _delivery_row(job: PushRequested | EmailRequested, now: datetime) -> dict[str, Any]:
    if isinstance(job, PushRequested):
        channel, target = EventChannel.PUSH, str(job.device_id)
    else:
        channel, target = EventChannel.EMAIL, ""
    return {
        "notification_id": job.notification_id,
        "message_id": job.message_id,
        "recipient_id": job.recipient_id,
        "channel": str(channel),
        "target": target,
        "status": str(DeliveryStatus.PENDING),
        "reason": None,
        "created_at": now,
        "updated_at": now,
    }


async def messages_created_at(
    engine: AsyncEngine, message_ids: Collection[uuid.UUID]
) -> dict[uuid.UUID, datetime]:
    """When each of these messages was created (`MessageCreated.timestamp`), where the ledger
    knows it; one query for them all."""
    if not message_ids:
        return {}
    async with autocommit(engine) as connection:
        rows = await connection.execute(_CREATED_AT, {"ids": sorted(message_ids)})
        return {message_id: _utc(value) for message_id, value in rows}


def _utc(value: datetime) -> datetime:
    # SQLite hands timestamps back without a zone; everything the ledger stores is UTC.
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


# The targets of deliveries that waited in a window (`_window_delivery_row`): an e-mail digest,
# and pushes held for quiet hours ("held:<device id>").
DIGEST_TARGET = "digest"
HELD_PUSH_PREFIX = "held:"


class ReportResult(StrEnum):
    APPLIED = "applied"
    # Applied to a notification that waited in a window on purpose (a digest, a push held for
    # quiet hours): its delay is no latency.
    APPLIED_AFTER_WAITING = "applied_after_waiting"
    # Applied to a recall: no message's latency either.
    APPLIED_RECALL = "applied_recall"
    STALE = "stale"  # the stored status is final or further along
    UNKNOWN = "unknown"  # no such notification in the ledger (on the report's channel)


async def apply_delivery_reports(
    engine: AsyncEngine, reports: Sequence[DeliveryReported], *, now: datetime
) -> dict[uuid.UUID, ReportResult]:
    """Move each reported notification's status to its outcome, where the rules allow it
    (`routing.statuses_replaceable_by`: `delivered` is never overwritten), and say per
    notification what the report did.

    One UPDATE per (channel, outcome, reason) group of reports (a batch report
    is one group unless its failures differ in reason), then one SELECT that tells the reports
    it did not apply apart: STALE if the notification is known on that channel, else UNKNOWN.
    """
    if not reports:
        return {}
    groups: defaultdict[tuple[EventChannel, DeliveryOutcome, str | None], list[uuid.UUID]] = (
        defaultdict(list)
    )
    for report in reports:
        reason = report.reason[:REASON_MAX_CHARS] if report.reason else None
        groups[report.channel, report.outcome, reason].append(report.notification_id)
    # Autocommit: each UPDATE is a compare-and-set that stands alone (a report applied twice is
    # a no-op the second time), and the SELECT only classifies; no transaction is needed.
    async with autocommit(engine) as connection:
        applied: dict[uuid.UUID, str] = {}
        for (channel, outcome, reason), notification_ids in groups.items():
            updated = await connection.execute(
                _APPLY_REPORT,
                {
                    "ids": sorted(notification_ids),
                    "p_channel": str(channel),
                    "p_replaceable": sorted(str(s) for s in statuses_replaceable_by(outcome)),
                    "p_status": str(outcome),
                    "p_reason": reason,
                    "p_now": now,
                },
            )
            applied.update({notification_id: target for notification_id, target in updated})
        rest = {report.notification_id for report in reports} - applied.keys()
        known: dict[uuid.UUID, str] = {}
        if rest:
            rows = await connection.execute(_CHANNEL_OF, {"ids": sorted(rest)})
            known = {notification_id: channel for notification_id, channel in rows}
    return {report.notification_id: _result(report, applied, known) for report in reports}


def _result(
    report: DeliveryReported, applied: Mapping[uuid.UUID, str], known: Mapping[uuid.UUID, str]
) -> ReportResult:
    if report.notification_id in applied:
        target = applied[report.notification_id]
        if target == DIGEST_TARGET or target.startswith(HELD_PUSH_PREFIX):
            return ReportResult.APPLIED_AFTER_WAITING
        if target.startswith(RECALL_PREFIX):
            return ReportResult.APPLIED_RECALL
        return ReportResult.APPLIED
    if known.get(report.notification_id) == str(report.channel):
        return ReportResult.STALE
    return ReportResult.UNKNOWN


def _device_of(target: str) -> str | None:
    """The device a delivery went to (None for an e-mail)."""
    if target in ("", DIGEST_TARGET):
        return None
    return target.removeprefix(HELD_PUSH_PREFIX).removeprefix(RECALL_PREFIX)


# --- presence projection ----------------------------------------------------------------------

# A stream that ended (or expired) this long ago no longer matters to any decision.
PRESENCE_KEPT_FOR = timedelta(hours=1)

_online_until = func.max(presence_connections.c.expires_at)
_LOAD_PRESENCE = (
    select(presence_connections.c.user_id, _online_until, rooms_in_view.c.room_id)
    .select_from(
        presence_connections.outerjoin(
            rooms_in_view, rooms_in_view.c.user_id == presence_connections.c.user_id
        )
    )
    .where(
        _ids(presence_connections.c.user_id),
        presence_connections.c.expires_at > bindparam("since"),
    )
    .group_by(presence_connections.c.user_id, rooms_in_view.c.room_id)
)


async def apply_presence(engine: AsyncEngine, event: PresenceChanged, *, now: datetime) -> None:
    """Upsert each stream's expiry and each user's room in view, unless what is stored was said
    later (`at`); and forget the streams that ended long ago."""
    connections = sorted(
        (
            {
                "user_id": entry.user_id,
                "connection_id": entry.connection_id,
                "expires_at": entry.expires_at,
                "at": entry.at,
            }
            for entry in event.connections
        ),
        key=lambda row: (row["user_id"], row["connection_id"]),
    )
    # One room per user (the latest said), in one order for every transaction.
    latest = {entry.user_id: entry for entry in sorted(event.rooms, key=lambda room: room.at)}
    rooms = [
        {"user_id": user_id, "room_id": latest[user_id].room_id, "at": latest[user_id].at}
        for user_id in sorted(latest)
    ]
    async with engine.begin() as connection:
        if connections:
            upsert = _insert(connection, presence_connections)
            await connection.execute(
                upsert.on_conflict_do_update(
                    index_elements=[
                        presence_connections.c.user_id,
                        presence_connections.c.connection_id,
                    ],
                    set_={"expires_at": upsert.excluded.expires_at, "at": upsert.excluded.at},
                    where=presence_connections.c.at < upsert.excluded.at,
                ),
                connections,
            )
        if rooms:
            upsert = _insert(connection, rooms_in_view)
            await connection.execute(
                upsert.on_conflict_do_update(
                    index_elements=[rooms_in_view.c.user_id],
                    set_={"room_id": upsert.excluded.room_id, "at": upsert.excluded.at},
                    where=rooms_in_view.c.at < upsert.excluded.at,
                ),
                rooms,
            )
        await connection.execute(
            delete(presence_connections).where(
                presence_connections.c.expires_at < now - PRESENCE_KEPT_FOR
            )
        )


async def load_presence(
    engine: AsyncEngine, user_ids: Iterable[uuid.UUID], *, since: datetime
) -> dict[uuid.UUID, Presence]:
    """The presence of those of these users who have had a stream open after `since`."""
    wanted = list(user_ids)
    if not wanted:
        return {}
    async with autocommit(engine) as connection:
        result = await connection.execute(_LOAD_PRESENCE, {"ids": wanted, "since": since})
        return {
            row.user_id: Presence(online_until=_utc(row[1]), room_in_view=row.room_id)
            for row in result
        }


# --- read markers -----------------------------------------------------------------------------

_LOAD_READ_MARKERS = select(
    read_markers.c.user_id, read_markers.c.room_id, read_markers.c.up_to
).where(_ids(read_markers.c.user_id), AnyOf(read_markers.c.room_id, "rooms"))


async def apply_read_marker(
    engine: AsyncEngine, event: RoomRead, *, now: datetime, recall_linger: timedelta
) -> int | None:
    """Store the marker unless the stored one is as far or further (None then), and in the same
    transaction recall what the read made stale and count the room again (`_room_done_up_to`);
    how many messages' pushes it put in the user's recall window."""
    values = {
        "user_id": event.user_id,
        "room_id": event.room_id,
        "up_to": event.up_to,
        "message_id": event.message_id,
    }
    async with engine.begin() as connection:
        before = await _locked_marker(connection, event.user_id, event.room_id)
        upsert = _insert(connection, read_markers).values(values)
        moved = await connection.execute(
            upsert.on_conflict_do_update(
                index_elements=[read_markers.c.user_id, read_markers.c.room_id],
                set_={"up_to": upsert.excluded.up_to, "message_id": upsert.excluded.message_id},
                where=read_markers.c.up_to < upsert.excluded.up_to,
            ).returning(read_markers.c.user_id)
        )
        if moved.first() is None:
            return None
        return await _room_done_up_to(
            connection,
            event.user_id,
            event.room_id,
            after=before,
            up_to=event.up_to,
            now=now,
            recall_linger=recall_linger,
        )


async def _locked_marker(
    connection: AsyncConnection, user_id: uuid.UUID, room_id: uuid.UUID
) -> datetime | None:
    """The user's marker of the room, its row locked: the marker's move (or the leave) and
    what it recalls are one step, and a concurrent copy of the event recalls nothing more."""
    marker = await connection.scalar(
        select(read_markers.c.up_to)
        .where(read_markers.c.user_id == user_id, read_markers.c.room_id == room_id)
        .with_for_update()
    )
    return None if marker is None else _utc(marker)


async def _room_done_up_to(
    connection: AsyncConnection,
    user_id: uuid.UUID,
    room_id: uuid.UUID,
    *,
    after: datetime | None,
    up_to: datetime,
    now: datetime,
    recall_linger: timedelta,
) -> int:
    """The user is done with the room up to `up_to` (read, or left): the pushes of its messages
    since `after` (the marker before; what it covered was recalled when it moved) that a device
    may still show go into the user's recall window, due `recall_linger` from now, and the
    room's unread messages are those after `up_to`. How many messages' pushes are recalled."""
    shown = await connection.execute(
        _SHOWN_IN_ROOM,
        {
            "p_user": user_id,
            "p_room": room_id,
            "p_after": after or _EPOCH,
            "p_up_to": up_to,
        },
    )
    recalled = await _add_to_recalls(connection, shown.all(), now=now, due_at=now + recall_linger)
    unread = await connection.scalar(
        _UNREAD_IN_ROOM, {"p_user": user_id, "p_room": room_id, "p_since": up_to}
    )
    await _set_unread(connection, user_id, room_id, int(unread or 0))
    return recalled


async def load_read_markers(
    engine: AsyncEngine, user_ids: Iterable[uuid.UUID], room_ids: Iterable[uuid.UUID]
) -> dict[tuple[uuid.UUID, uuid.UUID], datetime]:
    """(user, room) → up to when the user read the room, for these users in these rooms."""
    users, rooms = list(user_ids), list(set(room_ids))
    if not users or not rooms:
        return {}
    async with autocommit(engine) as connection:
        result = await connection.execute(_LOAD_READ_MARKERS, {"ids": users, "rooms": rooms})
        return {(row.user_id, row.room_id): _utc(row.up_to) for row in result}


async def apply_room_left(
    engine: AsyncEngine, event: RoomLeft, *, now: datetime, recall_linger: timedelta
) -> int:
    """The user left the room: in one transaction, cancel what waits of it up to `left_at`,
    recall what their devices may still show of it and count the room again (those after
    `left_at`: none, unless they joined again since; `_room_done_up_to`). A repeat finds
    nothing more to cancel or recall. How many messages' pushes it recalls."""
    user_id, room_id = event.user_id, event.room_id
    async with engine.begin() as connection:
        marker = await _locked_marker(connection, user_id, room_id)
        await connection.execute(
            update(window_entries)
            .where(
                _entries.recipient_id == user_id,
                _entries.room_id == room_id,
                _entries.state == WINDOW_WAITING,
                _entries.channel != RECALL_WINDOW,
                _entries.message_id.in_(
                    select(_n.message_id).where(
                        _n.recipient_id == user_id,
                        _n.room_id == room_id,
                        _n.message_created_at <= event.left_at,
                    )
                ),
            )
            .values(state=f"cancelled:{SkipReason.LEFT}")
        )
        return await _room_done_up_to(
            connection,
            user_id,
            room_id,
            after=marker,
            up_to=event.left_at,
            now=now,
            recall_linger=recall_linger,
        )


# --- unread counts (the badge) -----------------------------------------------------------------

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_unread = unread_counts.c
_UNREAD_TOTALS = (
    select(_unread.user_id, func.sum(_unread.unread))
    .where(_ids(_unread.user_id))
    .group_by(_unread.user_id)
)
# The room's messages to the user after `p_since`, as `routing.counts_unread` counts them:
# messages (no invitations), deleted ones aside.
_UNREAD_IN_ROOM = (
    select(func.count())
    .select_from(
        notifications.outerjoin(
            message_changes, message_changes.c.message_id == notifications.c.message_id
        )
    )
    .where(
        notifications.c.recipient_id == bindparam("p_user"),
        notifications.c.room_id == bindparam("p_room"),
        notifications.c.message_created_at > bindparam("p_since"),
        func.coalesce(notifications.c.trigger, "message") != "invitation",
        message_changes.c.deleted_at.is_(None),
    )
)


async def unread_totals(engine: AsyncEngine, user_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, int]:
    """User → their unread messages, all rooms together (users with none are left out)."""
    users = sorted(set(user_ids))
    if not users:
        return {}
    async with autocommit(engine) as connection:
        return await _unread_totals(connection, users)


async def _unread_totals(
    connection: AsyncConnection, users: Sequence[uuid.UUID]
) -> dict[uuid.UUID, int]:
    rows = await connection.execute(_UNREAD_TOTALS, {"ids": list(users)})
    return {user_id: int(total) for user_id, total in rows}


async def _count_unread(
    connection: AsyncConnection, added: Mapping[tuple[uuid.UUID, uuid.UUID], int]
) -> dict[tuple[uuid.UUID, uuid.UUID], int]:
    """Add to the (user, room) counters, in key order like every transaction here; their
    counts now."""
    if not added:
        return {}
    upsert = _insert(connection, unread_counts)
    counted = await connection.execute(
        upsert.on_conflict_do_update(
            index_elements=[_unread.user_id, _unread.room_id],
            set_={"unread": _unread.unread + upsert.excluded.unread},
        ).returning(_unread.user_id, _unread.room_id, _unread.unread),
        [
            {"user_id": user_id, "room_id": room_id, "unread": count}
            for (user_id, room_id), count in sorted(added.items())
        ],
    )
    return {(row.user_id, row.room_id): row.unread for row in counted}


async def _set_unread(
    connection: AsyncConnection, user_id: uuid.UUID, room_id: uuid.UUID, unread: int
) -> None:
    upsert = _insert(connection, unread_counts).values(
        user_id=user_id, room_id=room_id, unread=unread
    )
    await connection.execute(
        upsert.on_conflict_do_update(
            index_elements=[_unread.user_id, _unread.room_id],
            set_={"unread": upsert.excluded.unread},
        )
    )


# --- recalls: what a read or a deletion made stale on the devices --------------------------------

# Deliveries of recalls themselves ("recall:<device id>"), never recalled.
RECALL_PREFIX = "recall:"
RECALL_WINDOW = "recall"
# A recall window takes in what is read (or deleted) for this long after it opens, each read
# moving it to its own due time: rooms read in a burst (a "mark all as read", whose reads reach
# the router one by one, slower on a loaded machine) make one recall per device, at most this
# plus the recall linger after the first read. A lone read is recalled after the linger alone.
RECALL_GATHERING = timedelta(seconds=3)
_n = notifications.c
_SHOWN = select(
    _n.recipient_id,
    _n.room_id,
    _n.message_id,
    _n.message_created_at,
    _deliveries.notification_id,
    _deliveries.target,
).select_from(
    notifications.join(
        notification_deliveries,
        and_(
            _deliveries.message_id == _n.message_id,
            _deliveries.recipient_id == _n.recipient_id,
        ),
    )
)
# A push a device may still show: sent or on its way (its report may not be in yet).
_shown = (
    _deliveries.channel == str(EventChannel.PUSH),
    _deliveries.status.in_((str(DeliveryStatus.PENDING), str(DeliveryStatus.DELIVERED))),
    ~_deliveries.target.startswith(RECALL_PREFIX),
)
_SHOWN_IN_ROOM = _SHOWN.where(
    _n.recipient_id == bindparam("p_user"),
    _n.room_id == bindparam("p_room"),
    _n.message_created_at > bindparam("p_after"),
    _n.message_created_at <= bindparam("p_up_to"),
    *_shown,
)
_SHOWN_OF_MESSAGE = _SHOWN.where(_n.message_id == bindparam("p_message"), *_shown)


async def _add_to_recalls(
    connection: AsyncConnection, shown: Sequence[Any], *, now: datetime, due_at: datetime
) -> int:
    """The shown pushes (rows of `_SHOWN`) become entries of their recipients' recall windows,
    one per message and recipient; how many."""
    by_entry: defaultdict[tuple[uuid.UUID, uuid.UUID], list[Any]] = defaultdict(list)
    for row in shown:
        by_entry[(row.recipient_id, row.message_id)].append(row)
    waiting = [
        _Waiting(
            recipient_id,
            message_id,
            rows[0].room_id,
            RECALL_WINDOW,
            RecalledPushes(
                message_id=message_id,
                room_id=rows[0].room_id,
                sent_at=_utc(rows[0].message_created_at or now),
                pushes=[
                    ShownPush(
                        notification_id=row.notification_id,
                        device_id=uuid.UUID(row.target.removeprefix(HELD_PUSH_PREFIX)),
                    )
                    for row in sorted(rows, key=lambda row: row.notification_id)
                ],
            ).model_dump(mode="json"),
            due_at,
        )
        for (recipient_id, message_id), rows in sorted(by_entry.items())
    ]
    await _enter_windows(connection, waiting, now=now, gather=RECALL_GATHERING)
    return len(waiting)


# --- the schedule of e-mail that waits -------------------------------------------------------

WINDOW_SENDING = "sending"
WINDOW_SENT = "sent"
WINDOW_CANCELLED = "cancelled"
_windows = waiting_windows.c
_entries = window_entries.c


@dataclass(frozen=True)
class ClosedWindow:
    """A window the dispatcher took: its jobs to publish (none: nothing was left to tell), and
    for one closed just now, how many messages they tell of and those left out."""

    window_id: uuid.UUID
    channel: str
    jobs: tuple[PushRequested | EmailRequested, ...]
    sent: int = 0
    cancelled: Mapping[uuid.UUID, str] = dataclass_field(default_factory=dict)
    resent: bool = False  # a window already `sending`, whose publication is tried again


# (window id, channel, the recipient as projected now, the entries' content as recorded, the
# recipient's read markers by room, the entries' messages' edits and deletions, the recipient's
# unread count of now) → what the window sends.
Compose = Callable[
    [
        uuid.UUID,
        str,
        Recipient | None,
        Sequence[Any],
        Mapping[uuid.UUID, datetime],
        Mapping[uuid.UUID, MessageChange],
        int,
    ],
    WindowPlan,
]


def _job(value: dict[str, Any]) -> PushRequested | EmailRequested:
    return (
        PushRequested if value.get("type") == "push_requested" else EmailRequested
    ).model_validate(value)


async def close_due_windows(
    engine: AsyncEngine, *, now: datetime, limit: int, resend_after: timedelta, compose: Compose
) -> list[ClosedWindow]:
    """Take up to `limit` windows that ended, compose each (`compose`) and record the outcome,
    in one transaction: a window with something to tell becomes `sending`, with its jobs and
    their pending delivery rows; one with nothing becomes `cancelled`. Also taken again:
    windows `sending` for longer than `resend_after` (a dispatcher that died between this
    commit and `mark_windows_sent`), with the jobs they hold.

    `FOR UPDATE SKIP LOCKED`: several dispatchers share the due windows without waiting on one
    another, and never take a window a routing transaction is adding to.
    """
    claim = (
        select(
            _windows.window_id, _windows.user_id, _windows.channel, _windows.state, _windows.jobs
        )
        .where(
            or_(
                and_(_windows.state == WINDOW_WAITING, _windows.due_at <= now),
                and_(_windows.state == WINDOW_SENDING, _windows.closed_at <= now - resend_after),
            )
        )
        .order_by(_windows.due_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    async with engine.begin() as connection:
        claimed = (await connection.execute(claim)).all()
        if not claimed:
            return []
        resent = [
            ClosedWindow(
                row.window_id, row.channel, tuple(_job(job) for job in row.jobs), resent=True
            )
            for row in claimed
            if row.state == WINDOW_SENDING
        ]
        if resent:
            await connection.execute(
                update(waiting_windows).where(_ids(_windows.window_id)).values(closed_at=now),
                {"ids": [window.window_id for window in resent]},
            )
        due = [row for row in claimed if row.state == WINDOW_WAITING]
        closed = await _close(connection, due, now=now, compose=compose) if due else []
    return [*closed, *resent]


async def _close(
    connection: AsyncConnection, due: Sequence[Any], *, now: datetime, compose: Compose
) -> list[ClosedWindow]:
    entries = await connection.execute(
        select(_entries.window_id, _entries.job).where(
            AnyOf(_entries.window_id, "windows"),
            _entries.state == WINDOW_WAITING,
        ),
        {"windows": [row.window_id for row in due]},
    )
    waiting: defaultdict[uuid.UUID, list[Any]] = defaultdict(list)
    for row in entries:
        waiting[row.window_id].append(row.job)
    message_ids = [uuid.UUID(entry["message_id"]) for jobs in waiting.values() for entry in jobs]
    changes = {
        row.message_id: MessageChange(content=row.content, deleted=row.deleted_at is not None)
        for row in await connection.execute(_CHANGES_OF, {"ids": message_ids})
    }
    users = sorted({row.user_id for row in due})
    unread_now = await _unread_totals(connection, users)
    recipients_now = {
        row.user_id: _recipient(row._mapping)
        for row in await connection.execute(_LOAD_RECIPIENTS, {"ids": users})
    }
    rooms = {entry["room_id"] for entries in waiting.values() for entry in entries}
    markers: defaultdict[uuid.UUID, dict[uuid.UUID, datetime]] = defaultdict(dict)
    if rooms:
        read = await connection.execute(
            _LOAD_READ_MARKERS, {"ids": users, "rooms": [uuid.UUID(room) for room in rooms]}
        )
        for marker in read:
            markers[marker.user_id][marker.room_id] = _utc(marker.up_to)

    closed: list[ClosedWindow] = []
    for row in due:
        plan = compose(
            row.window_id,
            row.channel,
            recipients_now.get(row.user_id),
            waiting[row.window_id],
            markers[row.user_id],
            changes,
            unread_now.get(row.user_id, 0),
        )
        cancelled = {
            message_id: f"cancelled:{reason}" for message_id, reason in plan.cancelled.items()
        }
        await connection.execute(
            update(waiting_windows)
            .where(_windows.window_id == row.window_id)
            .values(
                state=WINDOW_SENDING if plan.jobs else WINDOW_CANCELLED,
                closed_at=now,
                jobs=[job.model_dump(mode="json") for job in plan.jobs] if plan.jobs else None,
                size=len(plan.sent),
            )
        )
        states = [
            *(("sent", message_id) for message_id in plan.sent),
            *((state, message_id) for message_id, state in cancelled.items()),
        ]
        if states:
            await connection.execute(
                update(window_entries)
                .where(
                    _entries.message_id == bindparam("p_message"),
                    _entries.recipient_id == row.user_id,
                    _entries.channel == row.channel,
                )
                .values(state=bindparam("p_state")),
                [{"p_state": state, "p_message": message_id} for state, message_id in states],
            )
        if plan.jobs:
            deliveries = [_window_delivery_row(job, now) for job in plan.jobs]
            await connection.execute(
                _insert(connection, notification_deliveries).on_conflict_do_nothing(
                    index_elements=[_deliveries.notification_id]
                ),
                sorted(deliveries, key=lambda delivery: delivery["notification_id"]),
            )
        closed.append(
            ClosedWindow(row.window_id, row.channel, plan.jobs, len(plan.sent), cancelled)
        )
    return closed


def _window_delivery_row(job: PushRequested | EmailRequested, now: datetime) -> dict[str, Any]:
    # What waited is told from what went at once by its target (`ReportResult`).
    row = _delivery_row(job, now)
    if isinstance(job, EmailRequested):
        return row | {"target": DIGEST_TARGET}
    if job.recall is not None:
        return row | {"target": f"{RECALL_PREFIX}{job.device_id}"}
    return row | {"target": f"{HELD_PUSH_PREFIX}{job.device_id}"}


_CHANGES_OF = select(
    message_changes.c.message_id, message_changes.c.content, message_changes.c.deleted_at
).where(_ids(message_changes.c.message_id))


async def apply_message_change(
    engine: AsyncEngine, event: MessageChanged, *, now: datetime, recall_linger: timedelta
) -> bool:
    """Record an edit (only a later one replaces the text) or a deletion (final); for a
    deletion, at once: cancel what waits of the message, take it off its recipients' unread
    counts, and put its pushes a device may still show into their recall windows. Whether
    anything changed."""
    changes = message_changes.c
    async with engine.begin() as connection:
        upsert = _insert(connection, message_changes)
        if isinstance(event, MessageEdited):
            statement = upsert.values(
                message_id=event.message_id,
                room_id=event.room_id,
                content=event.message_content,
                edited_at=event.edited_at,
            ).on_conflict_do_update(
                index_elements=[changes.message_id],
                set_={"content": upsert.excluded.content, "edited_at": upsert.excluded.edited_at},
                where=or_(
                    changes.edited_at.is_(None), changes.edited_at < upsert.excluded.edited_at
                ),
            )
        else:
            statement = upsert.values(
                message_id=event.message_id, room_id=event.room_id, deleted_at=event.deleted_at
            ).on_conflict_do_update(
                index_elements=[changes.message_id],
                set_={"deleted_at": upsert.excluded.deleted_at},
                where=changes.deleted_at.is_(None),
            )
        changed = (await connection.execute(statement.returning(changes.message_id))).first()
        if changed is not None and isinstance(event, MessageDeleted):
            await connection.execute(
                update(window_entries)
                .where(
                    _entries.message_id == event.message_id,
                    _entries.state == WINDOW_WAITING,
                    _entries.channel != RECALL_WINDOW,
                )
                .values(state=f"cancelled:{SkipReason.DELETED}")
            )
            # The recall windows before the counters, in the order a read takes them: a read
            # and a deletion of the same user's never wait on each other in a cycle.
            shown = await connection.execute(_SHOWN_OF_MESSAGE, {"p_message": event.message_id})
            await _add_to_recalls(connection, shown.all(), now=now, due_at=now + recall_linger)
            await _uncount_deleted(connection, event.message_id)
        return changed is not None


async def _uncount_deleted(connection: AsyncConnection, message_id: uuid.UUID) -> None:
    """A deleted message leaves the unread counts of the recipients who had not read it. (One
    deleted before the router routed it is counted when routed, until its room is read.)"""
    recipients_of_message = await connection.execute(
        select(_n.recipient_id, _n.room_id, _n.message_created_at, read_markers.c.up_to)
        .select_from(
            notifications.outerjoin(
                read_markers,
                and_(
                    read_markers.c.user_id == _n.recipient_id,
                    read_markers.c.room_id == _n.room_id,
                ),
            )
        )
        .where(
            _n.message_id == message_id,
            func.coalesce(_n.trigger, "message") != "invitation",
        )
    )
    unread = sorted(
        (row.recipient_id, row.room_id)
        for row in recipients_of_message
        if row.up_to is None
        or (row.message_created_at is not None and _utc(row.message_created_at) > _utc(row.up_to))
    )
    if unread:
        await connection.execute(
            update(unread_counts)
            .where(
                _unread.user_id == bindparam("p_user"),
                _unread.room_id == bindparam("p_room"),
                _unread.unread > 0,
            )
            .values(unread=_unread.unread - 1),
            [{"p_user": user_id, "p_room": room_id} for user_id, room_id in unread],
        )


async def _reschedule_push_window(
    connection: AsyncConnection, user_id: uuid.UUID, due_at: datetime
) -> None:
    """The user's waiting push window is due at `due_at`, sooner or later than it was: it
    holds pushes for as long as the user's quiet lasts, as they set it now."""
    await connection.execute(
        update(waiting_windows)
        .where(
            _windows.user_id == user_id,
            _windows.channel == str(EventChannel.PUSH),
            _windows.state == WINDOW_WAITING,
            _windows.due_at != due_at,
        )
        .values(due_at=due_at)
    )


async def mark_windows_sent(engine: AsyncEngine, window_ids: Collection[uuid.UUID]) -> None:
    """The jobs of these windows were published (the broker confirmed them)."""
    if not window_ids:
        return
    async with autocommit(engine) as connection:
        await connection.execute(
            update(waiting_windows)
            .where(_ids(_windows.window_id), _windows.state == WINDOW_SENDING)
            .values(state=WINDOW_SENT),
            {"ids": sorted(window_ids)},
        )


@dataclass(frozen=True)
class WindowBacklog:
    # Entries waiting, by their window's channel (email, push, recall).
    waiting_entries: Mapping[str, int]
    # How long the oldest digest past its due time has been waiting (0: none is).
    overdue_seconds: float


async def window_backlog(engine: AsyncEngine, *, now: datetime) -> WindowBacklog:
    async with autocommit(engine) as connection:
        waiting = await connection.execute(
            select(_entries.channel, func.count())
            .where(_entries.state == WINDOW_WAITING)
            .group_by(_entries.channel)
        )
        by_channel = {channel: int(count) for channel, count in waiting}
        oldest = await connection.scalar(
            select(func.min(_windows.due_at)).where(
                _windows.state.in_((WINDOW_WAITING, WINDOW_SENDING))
            )
        )
    overdue = 0.0 if oldest is None else max(0.0, (now - _utc(oldest)).total_seconds())
    return WindowBacklog(by_channel, overdue)


# --- the operators' "why (not)?" ----------------------------------------------------------------

_EXPLAIN_DECISION = select(
    notifications.c.room_id,
    notifications.c.trigger,
    notifications.c.mentioned,
    notifications.c.push_decision,
    notifications.c.email_decision,
    notifications.c.decided_at,
    notifications.c.message_created_at,
).where(
    notifications.c.message_id == bindparam("message_id"),
    notifications.c.recipient_id == bindparam("user_id"),
)
_EXPLAIN_DELIVERIES = (
    select(
        _deliveries.notification_id,
        _deliveries.channel,
        _deliveries.target,
        _deliveries.status,
        _deliveries.reason,
        _deliveries.created_at,
        _deliveries.updated_at,
    )
    .where(
        _deliveries.message_id == bindparam("message_id"),
        _deliveries.recipient_id == bindparam("user_id"),
    )
    .order_by(_deliveries.channel, _deliveries.target)
)


_EXPLAIN_WINDOWS = (
    select(
        _entries.channel,
        _entries.state,
        _windows.window_id,
        _windows.state.label("window_state"),
        _windows.opened_at,
        _windows.due_at,
        _windows.closed_at,
    )
    .join(waiting_windows, _windows.window_id == _entries.window_id)
    .where(
        _entries.message_id == bindparam("message_id"),
        _entries.recipient_id == bindparam("user_id"),
    )
    .order_by(_entries.channel)
)


async def explain(
    engine: AsyncEngine, *, message_id: uuid.UUID, user_id: uuid.UUID
) -> dict[str, Any] | None:
    """What the router decided for one user and one message (or invitation), and what became
    of each delivery: ids, reasons and times only (the ledger holds no address, token or
    text). None when it decided nothing for them."""
    parameters = {"message_id": message_id, "user_id": user_id}
    async with autocommit(engine) as connection:
        decision = (await connection.execute(_EXPLAIN_DECISION, parameters)).first()
        if decision is None:
            return None
        deliveries = (await connection.execute(_EXPLAIN_DELIVERIES, parameters)).all()
        windows = (await connection.execute(_EXPLAIN_WINDOWS, parameters)).all()
        # A digest's one delivery is listed under the window's first message only.
        digest_deliveries = {
            window.window_id: await connection.scalar(
                select(_deliveries.status).where(
                    _deliveries.notification_id == digest_notification_id(window.window_id, user_id)
                )
            )
            for window in windows
            if window.channel == str(EventChannel.EMAIL)
        }
    return {
        "message_id": str(message_id),
        "user_id": str(user_id),
        "room_id": str(decision.room_id),
        "trigger": decision.trigger,
        "mentioned": decision.mentioned,
        "decided_at": _utc(decision.decided_at).isoformat(),
        "message_created_at": (
            _utc(decision.message_created_at).isoformat() if decision.message_created_at else None
        ),
        "push": decision.push_decision,
        "email": decision.email_decision,
        "deliveries": [
            {
                "notification_id": str(row.notification_id),
                "channel": row.channel,
                "device_id": _device_of(row.target),
                "status": row.status,
                "reason": row.reason,
                "created_at": _utc(row.created_at).isoformat(),
                "updated_at": _utc(row.updated_at).isoformat(),
            }
            for row in deliveries
        ],
        # What waited (an e-mail for a digest, pushes for quiet hours): the window, and what
        # became of the message in it (`entry`: waiting, sent, cancelled:<reason>).
        "windows": [
            {
                "channel": window.channel,
                "window_id": str(window.window_id),
                "entry": window.state,
                "state": window.window_state,
                "opened_at": _utc(window.opened_at).isoformat(),
                "due_at": _utc(window.due_at).isoformat(),
                "closed_at": _utc(window.closed_at).isoformat() if window.closed_at else None,
                "digest_delivery": digest_deliveries.get(window.window_id),
            }
            for window in windows
        ],
    }


# --- the inbox's change log ----------------------------------------------------------------------


@dataclass(frozen=True)
class InboxRows:
    """What the ledger holds of some inbox items, as read for one publication: rows of
    `notifications`, of `notification_deliveries` (the items' own and their digests'), and of
    `window_entries` joined with their window."""

    decisions: Sequence[Any]
    deliveries: Sequence[Any]
    windows: Sequence[Any]
    digests: Mapping[uuid.UUID, Any]  # by window id: the digest's delivery row


InboxKey = tuple[uuid.UUID, uuid.UUID]  # (user, message)


_INBOX_DECISIONS = select(notifications).where(
    PairsIn(notifications.c.recipient_id, notifications.c.message_id, "keys")
)
_INBOX_DELIVERIES = select(notification_deliveries).where(
    PairsIn(_deliveries.recipient_id, _deliveries.message_id, "keys")
)
_INBOX_WINDOWS = (
    select(
        _entries.recipient_id,
        _entries.message_id,
        _entries.channel,
        _entries.state,
        _windows.window_id,
        _windows.due_at,
        _windows.closed_at,
    )
    .join(waiting_windows, _windows.window_id == _entries.window_id)
    .where(PairsIn(_entries.recipient_id, _entries.message_id, "keys"))
)
_INBOX_DIGESTS = select(notification_deliveries).where(_ids(_deliveries.notification_id))


async def _inbox_rows(connection: AsyncConnection, keys: Sequence[InboxKey]) -> InboxRows:
    by_keys = pairs_param(connection, "keys", keys)
    decisions = (await connection.execute(_INBOX_DECISIONS, by_keys)).all()
    deliveries = (await connection.execute(_INBOX_DELIVERIES, by_keys)).all()
    windows = (await connection.execute(_INBOX_WINDOWS, by_keys)).all()
    digest_ids = {
        digest_notification_id(row.window_id, row.recipient_id): row.window_id
        for row in windows
        if row.channel == str(EventChannel.EMAIL)
    }
    digests: dict[uuid.UUID, Any] = {}
    if digest_ids:
        found = await connection.execute(_INBOX_DIGESTS, {"ids": list(digest_ids)})
        digests = {digest_ids[row.notification_id]: row for row in found}
    return InboxRows(decisions, deliveries, windows, digests)


_INBOX_CHANGES_OF = select(inbox_changes.c.seq).where(
    PairsIn(inbox_changes.c.user_id, inbox_changes.c.message_id, "keys")
)
_FORGET_INBOX_CHANGES = delete(inbox_changes).where(_ids(inbox_changes.c.seq))
# A digest's delivery row (and a held-push summary's) names one message of its window, the
# first, and its trigger logs that message's item only; but every message of the window reads
# its state from that row (`inbox._waited`). So an item with such a row brings the window's
# other items along.
_mate_of = window_entries.alias("mate_of")
_mate = window_entries.alias("mate")
_INBOX_WINDOW_MATES = (
    select(_mate.c.recipient_id, _mate.c.message_id)
    .select_from(notification_deliveries)
    .join(
        _mate_of,
        and_(
            _mate_of.c.message_id == _deliveries.message_id,
            _mate_of.c.recipient_id == _deliveries.recipient_id,
            _mate_of.c.channel == _deliveries.channel,
        ),
    )
    .join(_mate, _mate.c.window_id == _mate_of.c.window_id)
    .where(
        PairsIn(_deliveries.recipient_id, _deliveries.message_id, "keys"),
        or_(
            _deliveries.target == DIGEST_TARGET,
            _deliveries.target.startswith(HELD_PUSH_PREFIX),
        ),
    )
    .distinct()
)
# PostgreSQL: the versions (router revision 0014). What `nextval` hands out is never handed out
# again, even if the transaction that took it rolls back. Never below the counter's next: while
# a rolling upgrade runs, a relay of the version before still bumps the counter alone.
_NEXT_INBOX_VERSION = text("SELECT GREATEST(nextval('inbox_versions'), :floor)")


@dataclass(frozen=True)
class _InboxPass:
    keys: list[InboxKey]  # the items to publish, sorted
    taken: list[int]  # their changes (`seq`), forgotten once published
    version: int


async def _take_inbox_changes(
    connection: AsyncConnection, *, limit: int, up_to: int | None
) -> _InboxPass | None:
    """The relay's lock, the due items with their windows' mates and all their changes, and the
    version of their publication (None: another relay holds the lock, or nothing is due)."""
    current = await connection.scalar(
        select(inbox_relay.c.version).where(inbox_relay.c.id == 1).with_for_update(skip_locked=True)
    )
    if current is None:
        return None
    due = select(inbox_changes.c.user_id, inbox_changes.c.message_id)
    if up_to is not None:
        due = due.where(inbox_changes.c.seq <= up_to)
    due = (
        due.group_by(inbox_changes.c.user_id, inbox_changes.c.message_id)
        .order_by(func.min(inbox_changes.c.seq))
        .limit(limit)
    )
    keys: set[InboxKey] = {(row.user_id, row.message_id) for row in await connection.execute(due)}
    if not keys:
        return None
    mates = await connection.execute(
        _INBOX_WINDOW_MATES, pairs_param(connection, "keys", sorted(keys))
    )
    keys.update((row.recipient_id, row.message_id) for row in mates)
    by_keys = pairs_param(connection, "keys", sorted(keys))
    taken = list(await connection.scalars(_INBOX_CHANGES_OF, by_keys))
    if connection.dialect.name == "postgresql":
        version = int(await connection.scalar(_NEXT_INBOX_VERSION, {"floor": current + 1}))
    else:
        version = current + 1
    await connection.execute(
        update(inbox_relay).where(inbox_relay.c.id == 1).values(version=version)
    )
    return _InboxPass(sorted(keys), taken, version)


async def relay_inbox_changes(
    engine: AsyncEngine,
    *,
    limit: int,
    publish: Callable[[int, InboxRows], Awaitable[object]],
    up_to: int | None = None,
) -> int:
    """One publication of the inbox items that changed: take up to `limit` items with a change
    at or before `up_to` (the log's `seq`; None: any), oldest first, with every change of theirs
    (a later one too: one publication covers them all) and the other items of a digest's or a
    held-push summary's window whose delivery row one of them holds, read those items as they
    are now, hand them to `publish` with a new version, and forget those changes. A failed
    publication leaves the changes for the next pass, but never its version: the broker may
    have had the events all the same (a confirm that timed out, a commit that failed, a crash
    before it), and the next pass's newer state must go out under a higher one. On PostgreSQL
    one transaction, the version from a sequence (never rolled back); on SQLite (one relay per
    file) the counter's bump is committed before the items are read and published.

    One relay at a time (the counter's row lock; another replica skips the pass): a version is
    then taken before its items are read, and a higher version never carries an older state.
    How many items."""
    async with engine.connect() as connection:
        async with connection.begin():
            relay = await _take_inbox_changes(connection, limit=limit, up_to=up_to)
            if relay is None:
                return 0
            if connection.dialect.name == "postgresql":
                await _publish_inbox_changes(connection, relay, publish)
                return len(relay.keys)
        async with connection.begin():
            await _publish_inbox_changes(connection, relay, publish)
        return len(relay.keys)


async def _publish_inbox_changes(
    connection: AsyncConnection,
    relay: _InboxPass,
    publish: Callable[[int, InboxRows], Awaitable[object]],
) -> None:
    await publish(relay.version, await _inbox_rows(connection, relay.keys))
    await connection.execute(_FORGET_INBOX_CHANGES, {"ids": relay.taken})


async def inbox_change_head(engine: AsyncEngine) -> int:
    """The newest change's `seq` (0: none)."""
    async with autocommit(engine) as connection:
        return int(await connection.scalar(select(func.max(inbox_changes.c.seq))) or 0)


async def inbox_backlog(engine: AsyncEngine) -> int:
    """Changes not published yet."""
    async with autocommit(engine) as connection:
        return int(await connection.scalar(select(func.count()).select_from(inbox_changes)) or 0)


# --- retention -----------------------------------------------------------------------------------


async def prune_decisions(engine: AsyncEngine, *, before: datetime, batch: int) -> int:
    """Delete up to `batch` ledger rows decided before `before`, oldest first, with their
    deliveries and window entries (the foreign keys cascade); how many decisions. A decision
    that still waits in a window is kept, however old: a snooze of days and a short retention
    would otherwise empty the window before it goes out."""
    still_waits = (
        select(window_entries.c.message_id)
        .join(waiting_windows, _windows.window_id == window_entries.c.window_id)
        .where(
            window_entries.c.message_id == notifications.c.message_id,
            window_entries.c.recipient_id == notifications.c.recipient_id,
            _windows.state.in_((WINDOW_WAITING, WINDOW_SENDING)),
        )
        .exists()
    )
    oldest = (
        select(notifications.c.message_id, notifications.c.recipient_id)
        .where(notifications.c.decided_at < before, ~still_waits)
        .order_by(notifications.c.decided_at)
        .limit(batch)
    )
    async with engine.begin() as connection:
        result = await connection.execute(
            delete(notifications).where(
                tuple_(notifications.c.message_id, notifications.c.recipient_id).in_(oldest)
            )
        )
    return max(result.rowcount, 0)


async def prune_windows(engine: AsyncEngine, *, before: datetime, batch: int) -> int:
    """Delete up to `batch` windows that ended (sent or cancelled) before `before`."""
    oldest = (
        select(_windows.window_id)
        .where(_windows.state.in_((WINDOW_SENT, WINDOW_CANCELLED)), _windows.closed_at < before)
        .limit(batch)
    )
    async with engine.begin() as connection:
        result = await connection.execute(
            delete(waiting_windows).where(_windows.window_id.in_(oldest))
        )
    return max(result.rowcount, 0)
