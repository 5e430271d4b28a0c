"""The delivery ledger of a sender: one row per notification_id, so that a job is sent once per
attempt however often it is delivered, and never by two workers at the same time.

Each sender builds its own table with `delivery_ledger_table` (in its own database, with its own
extra columns) and works on it through a `DeliveryLedger`.

`status` moves sending → (retrying → sending)* → delivered | failed; delivered and failed are
final. Idempotency comes from the primary key on notification_id and `INSERT … ON CONFLICT DO
NOTHING`; concurrency (two copies of one job at once, with prefetch > 1 or several replicas) from
a lease: `leased_by` (the `DeliveryLedger` of one worker process, its `owner`) and `claimed_at`.
Only the worker whose conditional INSERT/UPDATE set them may act on the row, and only until
`claimed_at + lease` unless it renews the lease meanwhile; every later write of the row
(`finish`, `release`, `renew`, `abandon`, `mark_reported`, `unclaim`) is a compare-and-set on
`leased_by`, so a worker whose lease ran out and was taken over changes nothing of the new
owner's row (`finish_many` says which rows it recorded; it also records an outcome on a row given
back meanwhile that nobody has claimed since).

The lease rule: whoever holds the lease owns the row until the outcome's events are published.
`finish` records the outcome and keeps the lease; `mark_reported` (the events are out) ends it,
`unclaim` (publishing failed) drops it so the retry can publish at once, and `release` (a
transient failure) hands the row back for the next attempt; `abandon` (the worker was cancelled:
its connection was lost, or it is shutting down) drops its own lease whatever the row's state,
so the redelivered copy need not wait for the lease to run out. A concurrent copy is therefore
`Busy` while the row is being sent *or* reported, and never publishes the report a second time
next to the worker that is publishing it. Once the lease is gone without `reported_at` (a worker
died or failed to publish), the next copy takes the lease again and gets
`AlreadyFinal(reported=False)`: it publishes the missing events, without calling the provider;
copies racing it are `Busy`.

The consequence is at-least-once, never more often than a crash allows: a worker that dies after
the provider accepted but before `finish` leaves a `sending` row whose lease runs out, and the
next copy sends again (senders make that harmless with stable provider keys: a collapse id, a
Message-ID); one that dies after publishing but before `mark_reported` leaves events that the next
copy publishes again, with the same event ids, so consumers deduplicate them.

A dead worker's jobs are taken over once its leases run out, so leases are short (the senders'
`DELIVERY_LEASE`, 5 s) and renewed while the worker holds them (`renew_many`, one statement for
all of a worker's leases that are due): the lease row is its own heartbeat, with no table of
workers to join on the claim path. A lease that lapses while its worker lives (renewals did not
get through) costs at most a second provider call, never a ledger row overwritten.

Works on PostgreSQL and SQLite (the dialect's `insert`, chosen by `connection.dialect.name`).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Protocol

from sqlalchemy import (
    CheckConstraint,
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    Uuid,
    and_,
    bindparam,
    case,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from herald_shared.database import AnyOf, autocommit


class DeliveryStatus(StrEnum):
    SENDING = "sending"  # claimed by a worker until claimed_at + lease
    RETRYING = "retrying"  # the last attempt failed transiently; free to claim
    DELIVERED = "delivered"  # final
    FAILED = "failed"  # final; `failure` says why, in the sender's own short code


FINAL_STATUSES = frozenset({DeliveryStatus.DELIVERED, DeliveryStatus.FAILED})
REASON_LENGTH = 200  # the width of the reason column
CODE_LENGTH = 16  # the width of the status, failure and provider columns
# Percent of a ledger page that inserts fill (PostgreSQL): the rest is room for the new versions
# of its rows. Every delivery's row is updated after its insert (claimed, settled, reported), and
# on a full page each update writes the new version elsewhere and a new entry in every index;
# with room on the page it stays there, without index entries (a heap-only tuple).
# Changing it takes a new migration in each service with a ledger: a revision keeps the value it
# applied. (50 was measured too and not kept: docs/performance.md.)
LEDGER_FILLFACTOR = 70


def _key_columns() -> list[Column[Any]]:
    return [
        Column("notification_id", Uuid, primary_key=True),
        Column("message_id", Uuid, nullable=False),
        Column("recipient_id", Uuid, nullable=False),
    ]


def _state_columns() -> list[Column[Any]]:
    return [
        Column("status", String(CODE_LENGTH), nullable=False),
        Column("failure", String(CODE_LENGTH), nullable=True),
        # The sender's provider or backend that made the last attempt ("fcm", "smtp", "file"…).
        Column("provider", String(CODE_LENGTH), nullable=False),
        Column("attempts", Integer, nullable=False),
        Column("reason", String(REASON_LENGTH), nullable=True),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("updated_at", DateTime(timezone=True), nullable=False),
        Column("claimed_at", DateTime(timezone=True), nullable=True),  # the lease
        Column("finished_at", DateTime(timezone=True), nullable=True),
        Column("reported_at", DateTime(timezone=True), nullable=True),
        # Whose lease (a `DeliveryLedger.owner`): set with `claimed_at`, cleared with it.
        Column("leased_by", Uuid, nullable=True),
    ]


_COMMON_COLUMNS = frozenset(column.name for column in (*_key_columns(), *_state_columns()))
_CODE = re.compile(rf"[a-z][a-z0-9_]{{0,{CODE_LENGTH - 1}}}")


def delivery_ledger_table(
    name: str,
    metadata: MetaData,
    *extra_columns: Column[Any],
    failures: Iterable[str] = (),
) -> Table:
    """The ledger table `name` on `metadata`: the common columns, then `extra_columns`.

    `failures` are the codes the sender records in `failure` (a CHECK constraint allows these
    only); none, and the column takes any short code. The table never stores an address, a token
    or message text: `reason` is a safe description ("fcm 404 UNREGISTERED", "smtp 550 5.1.1").
    """
    codes = [str(code) for code in failures]
    if not all(_CODE.fullmatch(code) for code in codes):
        raise ValueError(f"failure codes must be short snake_case words: {codes}")
    clashes = _COMMON_COLUMNS & {column.name for column in extra_columns}
    if clashes:
        raise ValueError(f"extra columns clash with the ledger's own: {sorted(clashes)}")
    statuses = ", ".join(f"'{status}'" for status in DeliveryStatus)
    constraints = [CheckConstraint(f"status IN ({statuses})", name=f"ck_{name}_status")]
    if codes:
        allowed = ", ".join(f"'{code}'" for code in codes)
        constraints.append(
            CheckConstraint(f"failure IS NULL OR failure IN ({allowed})", name=f"ck_{name}_failure")
        )
    return Table(
        name,
        metadata,
        *_key_columns(),
        *extra_columns,
        *_state_columns(),
        *constraints,
        postgresql_with={"fillfactor": LEDGER_FILLFACTOR},
    )


class DeliveryJob(Protocol):
    """What the ledger reads from a job (`PushRequested` and `EmailRequested` have it)."""

    @property
    def notification_id(self) -> uuid.UUID: ...

    @property
    def message_id(self) -> uuid.UUID: ...

    @property
    def recipient_id(self) -> uuid.UUID: ...


@dataclass(frozen=True)
class Claimed:
    """This worker owns the delivery and may call the provider."""

    attempt: int


@dataclass(frozen=True)
class AlreadyFinal:
    """The delivery ended before. `reported=False`: its events did not go out, and this worker
    now holds the lease to publish them (then `mark_reported`, or `unclaim` if that fails)."""

    status: DeliveryStatus
    failure: str | None
    reason: str | None
    reported: bool


@dataclass(frozen=True)
class Busy:
    """Another worker holds a live lease: it is sending this very notification, or publishing
    its outcome."""

    lease_expires_at: datetime


Claim = Claimed | AlreadyFinal | Busy


@dataclass(frozen=True)
class LedgerEntry:
    notification_id: uuid.UUID
    status: DeliveryStatus
    failure: str | None
    provider: str
    attempts: int
    reason: str | None
    reported: bool
    extra: Mapping[str, Any]  # the sender's own columns


def _aware(value: datetime) -> datetime:
    # SQLite hands timestamps back without a zone; everything the ledger stores is UTC.
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _settled_or_busy(row: Any, *, now: datetime, lease: timedelta) -> AlreadyFinal | Busy:
    """A row no claim step could take: final with its events out, or held under a live lease
    (sending, or publishing its events; a row without a lease was taken by then)."""
    if row.reported_at is not None:
        return AlreadyFinal(
            status=DeliveryStatus(row.status),
            failure=row.failure,
            reason=row.reason,
            reported=True,
        )
    lease_expires_at = _aware(row.claimed_at) + lease if row.claimed_at is not None else now
    return Busy(lease_expires_at=lease_expires_at)


def _clip(reason: str | None) -> str | None:
    return reason[:REASON_LENGTH] if reason is not None else None


def _ids(column: Any) -> Any:
    """`column IN (:ids)`, the list given at execution (`AnyOf`: one array on PostgreSQL): the
    statement is built and compiled once, and no clause object is made per id."""
    return AnyOf(column, "ids")


class _Statements:
    """Every statement of the ledger on one table, built once; values are bound at execution
    (`p_*` names: SQLAlchemy keeps column names for the SET clause's own parameters)."""

    def __init__(self, t: Table) -> None:
        now: Any = bindparam("p_now")
        mine = t.c.leased_by == bindparam("p_owner")
        expired = or_(t.c.claimed_at.is_(None), t.c.claimed_at < bindparam("p_expired"))
        self._inserts = {
            name: dialect.insert(t)
            .on_conflict_do_nothing(index_elements=[t.c.notification_id])
            .returning(t.c.notification_id)
            for name, dialect in (("postgresql", postgresql), ("sqlite", sqlite))
        }
        # Retrying, or sending under a lease that ran out (its worker died): ours now.
        self.take = (
            update(t)
            .where(
                _ids(t.c.notification_id),
                or_(
                    t.c.status == DeliveryStatus.RETRYING.value,
                    and_(t.c.status == DeliveryStatus.SENDING.value, expired),
                ),
            )
            .values(
                status=DeliveryStatus.SENDING.value,
                provider=bindparam("p_provider"),
                attempts=t.c.attempts + 1,
                claimed_at=now,
                leased_by=bindparam("p_owner"),
                updated_at=now,
            )
            .returning(t.c.notification_id, t.c.attempts)
        )
        # Final rows whose events are not out and whose lease is gone: the lease to publish.
        self.take_unreported = (
            update(t)
            .where(
                _ids(t.c.notification_id),
                t.c.status.in_([status.value for status in FINAL_STATUSES]),
                t.c.reported_at.is_(None),
                expired,
            )
            .values(claimed_at=now, leased_by=bindparam("p_owner"), updated_at=now)
            .returning(t.c.notification_id, t.c.status, t.c.failure, t.c.reason)
        )
        self.read = select(
            t.c.notification_id,
            t.c.status,
            t.c.failure,
            t.c.reason,
            t.c.claimed_at,
            t.c.reported_at,
        ).where(_ids(t.c.notification_id))
        # Every write below is a compare-and-set on the lease's owner (`mine`): a worker whose
        # lease ran out and was taken over changes nothing of the new owner's row.
        self.finish = (
            update(t)
            .where(
                _ids(t.c.notification_id),
                or_(
                    and_(mine, t.c.status == DeliveryStatus.SENDING.value),
                    # Given back meanwhile (this worker abandoned it at shutdown, or a worker
                    # that had taken it over released it) and claimed by nobody since: the
                    # outcome of this call is still the truth, and spares the next copy a send.
                    and_(
                        t.c.leased_by.is_(None),
                        t.c.status == DeliveryStatus.RETRYING.value,
                    ),
                ),
            )
            .values(
                status=bindparam("p_status"),
                failure=bindparam("p_failure"),
                reason=bindparam("p_reason"),
                finished_at=now,
                updated_at=now,
            )
            .returning(t.c.notification_id)
        )
        self.release = (
            update(t)
            .where(_ids(t.c.notification_id), mine, t.c.status == DeliveryStatus.SENDING.value)
            .values(
                status=DeliveryStatus.RETRYING.value,
                reason=bindparam("p_reason"),
                claimed_at=None,
                leased_by=None,
                updated_at=now,
                attempts=t.c.attempts - bindparam("p_taken_back"),
            )
        )
        self.renew = (
            update(t).where(_ids(t.c.notification_id), mine).values(claimed_at=now, updated_at=now)
        )
        sending = t.c.status == DeliveryStatus.SENDING.value
        self.abandon = (
            update(t)
            .where(_ids(t.c.notification_id), mine)
            .values(
                status=case((sending, DeliveryStatus.RETRYING.value), else_=t.c.status),
                reason=case((sending, bindparam("p_reason")), else_=t.c.reason),
                claimed_at=None,
                leased_by=None,
                updated_at=now,
            )
        )
        self.mark_reported = (
            update(t)
            .where(_ids(t.c.notification_id), mine)
            .values(reported_at=now, claimed_at=None, leased_by=None, updated_at=now)
        )
        self.unclaim = (
            update(t)
            .where(
                _ids(t.c.notification_id),
                mine,
                t.c.status.in_([status.value for status in FINAL_STATUSES]),
            )
            .values(claimed_at=None, leased_by=None, updated_at=now)
        )

    def claim_insert(self, dialect: str) -> Any:
        return self._inserts[dialect]


class DeliveryLedger:
    """The claim protocol on one ledger table (see the module docstring for the lease rule).

    Every write is one compare-and-set statement, and a claim's later steps re-check what the
    earlier ones saw, so none needs a transaction around it: all run in autocommit.

    One `DeliveryLedger` is one lease owner (`owner`, a fresh id unless given): a worker process
    makes one, and its leases are the rows whose `leased_by` is its owner.
    """

    def __init__(
        self, engine: AsyncEngine, table: Table, *, owner: uuid.UUID | None = None
    ) -> None:
        self.engine = engine
        self.table = table
        self.owner = owner if owner is not None else uuid.uuid4()
        self._statements = _Statements(table)

    def _insert(self, connection: AsyncConnection) -> Any:
        """The dialect's INSERT … ON CONFLICT DO NOTHING RETURNING notification_id."""
        return self._statements.claim_insert(connection.dialect.name)

    async def claim(
        self,
        job: DeliveryJob,
        *,
        provider: str,
        now: datetime,
        lease: timedelta,
        extra: Mapping[str, Any] | None = None,
    ) -> Claim:
        """Take the right to send `job`, or say why not: already final (then, if its events are
        not out, the right to publish them), or in the hands of a worker right now.

        A `sending` row whose lease has expired belongs to a worker that died mid-send: it is
        taken over, which may send a second time (at-least-once). `extra` fills the sender's own
        columns when the row is created; pass it on every claim (the INSERT comes first, and the
        database checks its NOT NULL columns even when the row exists).
        """
        claims = await self.claim_many(
            [job],
            provider=provider,
            now=now,
            lease=lease,
            extra=None if extra is None else lambda _: extra,
        )
        return claims[job.notification_id]

    async def claim_many(
        self,
        jobs: Sequence[DeliveryJob],
        *,
        provider: str,
        now: datetime,
        lease: timedelta,
        extra: Callable[[Any], Mapping[str, Any]] | None = None,
    ) -> dict[uuid.UUID, Claim]:
        """`claim` for every job of a batch, by notification_id, in at most four statements
        whatever the batch's size: each step below handles the jobs the steps before left.

        A batch's first delivery is one INSERT; a retried or redelivered batch then takes back
        the rows free to send, then the final rows whose events are not out, and reads the rest.
        `extra(job)` fills the sender's own columns.
        """
        if not jobs:
            return {}
        # One order for every statement, so that two copies of a batch never deadlock.
        ordered = sorted(jobs, key=lambda job: job.notification_id)
        rows = [
            {
                "notification_id": job.notification_id,
                "message_id": job.message_id,
                "recipient_id": job.recipient_id,
                "status": DeliveryStatus.SENDING,
                "provider": provider,
                "attempts": 1,
                "created_at": now,
                "updated_at": now,
                "claimed_at": now,
                "leased_by": self.owner,
                **(extra(job) if extra is not None else {}),
            }
            for job in ordered
        ]
        statements = self._statements
        expired_before = now - lease
        claims: dict[uuid.UUID, Claim] = {}

        def unclaimed() -> list[uuid.UUID]:
            return [job.notification_id for job in ordered if job.notification_id not in claims]

        async with autocommit(self.engine) as connection:
            # Rows as parameters rather than `.values(rows)`: one cached statement whatever the
            # batch (SQLAlchemy sends it as one multi-row INSERT), instead of a statement
            # compiled again for every batch.
            inserted = await connection.execute(self._insert(connection), rows)
            claims.update({notification_id: Claimed(1) for notification_id in inserted.scalars()})

            if rest := unclaimed():
                # Retrying, or sending under a lease that ran out (its worker died): ours now.
                taken = await connection.execute(
                    statements.take,
                    {
                        "ids": rest,
                        "p_now": now,
                        "p_expired": expired_before,
                        "p_provider": provider,
                        "p_owner": self.owner,
                    },
                )
                claims.update({row.notification_id: Claimed(row.attempts) for row in taken})

            if rest := unclaimed():
                # Final rows whose events are not out and whose lease is gone: take the lease to
                # publish them, so that one copy does it rather than every copy at once.
                unreported = await connection.execute(
                    statements.take_unreported,
                    {
                        "ids": rest,
                        "p_now": now,
                        "p_expired": expired_before,
                        "p_owner": self.owner,
                    },
                )
                for row in unreported:
                    claims[row.notification_id] = AlreadyFinal(
                        status=DeliveryStatus(row.status),
                        failure=row.failure,
                        reason=row.reason,
                        reported=False,
                    )

            if rest := unclaimed():
                found = await connection.execute(statements.read, {"ids": rest})
                for row in found:
                    claims[row.notification_id] = _settled_or_busy(row, now=now, lease=lease)
        return claims

    async def finish(
        self,
        notification_id: uuid.UUID,
        *,
        status: DeliveryStatus,
        failure: str | None = None,
        reason: str | None,
        now: datetime,
    ) -> bool:
        """Record the final outcome (committed before any event is published and before the
        ack). The lease stays until `mark_reported` or `unclaim`. False: this worker's lease was
        taken over (it ran out), and the row is the new owner's, left as it is. A row given back
        meanwhile and claimed by nobody since is recorded all the same (without a lease: its
        events go out again with the next copy)."""
        recorded = await self.finish_many(
            [notification_id], status=status, failure=failure, reason=reason, now=now
        )
        return notification_id in recorded

    async def finish_many(
        self,
        notification_ids: Collection[uuid.UUID],
        *,
        status: DeliveryStatus,
        failure: str | None = None,
        reason: str | None,
        now: datetime,
    ) -> set[uuid.UUID]:
        """`finish` for notifications with the same outcome, in one statement; returns those
        recorded (the others' leases were taken over: their rows are left to the new owner)."""
        if status not in FINAL_STATUSES:
            raise ValueError(f"{status} is not a final status")
        if not notification_ids:
            return set()
        async with autocommit(self.engine) as connection:
            result = await connection.execute(
                self._statements.finish,
                {
                    "ids": sorted(notification_ids),
                    "p_owner": self.owner,
                    "p_status": status,
                    "p_failure": failure,
                    "p_reason": _clip(reason),
                    "p_now": now,
                },
            )
            return set(result.scalars())

    async def release(self, notification_id: uuid.UUID, *, reason: str, now: datetime) -> None:
        """Give the lease back after a transient failure, so the retry can claim at once."""
        await self.release_many([notification_id], reason=reason, now=now)

    async def release_many(
        self,
        notification_ids: Collection[uuid.UUID],
        *,
        reason: str,
        now: datetime,
        attempted: bool = True,
    ) -> None:
        """`release` for notifications that failed for the same reason, in one statement.
        `attempted=False`: the provider was never called (its breaker refused the job after it
        was claimed), so the claim's attempt is taken back."""
        await self._run(
            self._statements.release,
            notification_ids,
            p_reason=_clip(reason),
            p_now=now,
            p_taken_back=0 if attempted else 1,
        )

    async def renew_many(self, notification_ids: Collection[uuid.UUID], *, now: datetime) -> None:
        """Move this worker's leases of `notification_ids` to `now`, while it still holds them
        (a provider call or a wait for one takes longer than a lease): a lease that ran out and
        was taken over, or was given back, is left alone."""
        await self._run(self._statements.renew, notification_ids, p_now=now)

    async def abandon(self, notification_id: uuid.UUID, *, reason: str, now: datetime) -> None:
        """Drop this worker's lease (only its own: if it ran out and another worker holds the
        row now, nothing changes). A row being sent becomes `retrying`: the provider may have
        accepted it meanwhile, and the next copy sends again (at-least-once, with the same
        provider keys). A final row keeps its outcome; the next copy publishes its events."""
        await self.abandon_many([notification_id], reason=reason, now=now)

    async def abandon_many(
        self,
        notification_ids: Collection[uuid.UUID],
        *,
        reason: str,
        now: datetime,
    ) -> None:
        """`abandon` for many notifications, in one statement."""
        await self._run(
            self._statements.abandon,
            notification_ids,
            p_reason=_clip(reason),
            p_now=now,
        )

    async def mark_reported(self, notification_id: uuid.UUID, *, now: datetime) -> None:
        """The outcome's events are out: the job is done, and the lease with it."""
        await self.mark_reported_many([notification_id], now=now)

    async def mark_reported_many(
        self, notification_ids: Collection[uuid.UUID], *, now: datetime
    ) -> None:
        """`mark_reported` for many notifications, in one statement."""
        await self._run(self._statements.mark_reported, notification_ids, p_now=now)

    async def unclaim(self, notification_id: uuid.UUID, *, now: datetime) -> None:
        """Drop the lease of a final row whose events could not be published, so that the retry
        publishes them at once instead of waiting for the lease to run out."""
        await self.unclaim_many([notification_id], now=now)

    async def unclaim_many(self, notification_ids: Collection[uuid.UUID], *, now: datetime) -> None:
        """`unclaim` for many notifications, in one statement."""
        await self._run(self._statements.unclaim, notification_ids, p_now=now)

    async def _run(
        self, statement: Any, notification_ids: Collection[uuid.UUID], **values: Any
    ) -> None:
        """One prepared statement for `notification_ids` (sorted: one order for every
        statement, so concurrent ones never deadlock), standing alone, on this worker's leases."""
        if not notification_ids:
            return
        async with autocommit(self.engine) as connection:
            await connection.execute(
                statement, {"ids": sorted(notification_ids), "p_owner": self.owner, **values}
            )

    async def get(self, notification_id: uuid.UUID) -> LedgerEntry | None:
        async with self.engine.connect() as connection:
            row = (
                await connection.execute(
                    select(self.table).where(self.table.c.notification_id == notification_id)
                )
            ).one_or_none()
        if row is None:
            return None
        values = row._mapping
        return LedgerEntry(
            notification_id=row.notification_id,
            status=DeliveryStatus(row.status),
            failure=row.failure,
            provider=row.provider,
            attempts=row.attempts,
            reason=row.reason,
            reported=row.reported_at is not None,
            extra={name: values[name] for name in values if name not in _COMMON_COLUMNS},
        )
