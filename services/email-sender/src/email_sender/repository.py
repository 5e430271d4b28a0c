"""Every SQL statement of email-sender: the delivery ledger.

Idempotency comes from the primary key on notification_id and `INSERT … ON CONFLICT DO NOTHING`;
concurrency (two deliveries of one job at the same time, with prefetch > 1 or several replicas)
from a lease: only the worker whose conditional INSERT/UPDATE claimed the row sends.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from email_sender.tables import email_deliveries as deliveries
from herald_shared.events import EmailRequested


class DeliveryStatus(StrEnum):
    SENDING = "sending"  # claimed by a worker until claimed_at + lease
    RETRYING = "retrying"  # the last attempt failed transiently; free to claim
    DELIVERED = "delivered"  # final
    FAILED = "failed"  # final: refused by the provider, or impossible to build


FINAL_STATUSES = frozenset({DeliveryStatus.DELIVERED, DeliveryStatus.FAILED})


@dataclass(frozen=True)
class Claimed:
    """This worker owns the delivery and may send."""

    attempt: int


@dataclass(frozen=True)
class AlreadyFinal:
    """The delivery ended before; `reported` says whether its report went out."""

    status: DeliveryStatus
    reason: str | None
    reported: bool


@dataclass(frozen=True)
class Busy:
    """Another worker holds a live lease (it is sending this very notification)."""

    lease_expires_at: datetime


Claim = Claimed | AlreadyFinal | Busy


@dataclass(frozen=True)
class LedgerEntry:
    notification_id: uuid.UUID
    status: DeliveryStatus
    backend: str
    attempts: int
    reason: str | None
    reported: bool


def _insert(connection: AsyncConnection) -> Any:
    """The dialect's INSERT with ON CONFLICT support."""
    if connection.dialect.name == "postgresql":
        return postgresql.insert(deliveries)
    return sqlite.insert(deliveries)


def _aware(value: datetime) -> datetime:
    # SQLite hands timestamps back without a zone; everything this table stores is UTC.
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


async def claim(
    engine: AsyncEngine,
    job: EmailRequested,
    *,
    backend: str,
    now: datetime,
    lease: timedelta,
) -> Claim:
    """Take the right to send `job`, or say why not (already final, or being sent right now).

    A `sending` row whose lease has expired belongs to a worker that died mid-send: it is taken
    over, which may send that e-mail a second time (at-least-once; its Message-ID is stable).
    """
    async with engine.begin() as connection:
        inserted = await connection.execute(
            _insert(connection)
            .values(
                notification_id=job.notification_id,
                message_id=job.message_id,
                recipient_id=job.recipient_id,
                status=DeliveryStatus.SENDING,
                backend=backend,
                attempts=1,
                created_at=now,
                updated_at=now,
                claimed_at=now,
            )
            .on_conflict_do_nothing(index_elements=[deliveries.c.notification_id])
            .returning(deliveries.c.attempts)
        )
        if (attempts := inserted.scalar_one_or_none()) is not None:
            return Claimed(attempt=attempts)

        taken = await connection.execute(
            update(deliveries)
            .where(
                deliveries.c.notification_id == job.notification_id,
                or_(
                    deliveries.c.status == DeliveryStatus.RETRYING,
                    and_(
                        deliveries.c.status == DeliveryStatus.SENDING,
                        deliveries.c.claimed_at < now - lease,
                    ),
                ),
            )
            .values(
                status=DeliveryStatus.SENDING,
                backend=backend,
                attempts=deliveries.c.attempts + 1,
                claimed_at=now,
                updated_at=now,
            )
            .returning(deliveries.c.attempts)
        )
        if (attempts := taken.scalar_one_or_none()) is not None:
            return Claimed(attempt=attempts)

        row = (
            await connection.execute(
                select(
                    deliveries.c.status,
                    deliveries.c.reason,
                    deliveries.c.claimed_at,
                    deliveries.c.reported_at,
                ).where(deliveries.c.notification_id == job.notification_id)
            )
        ).one()
    status = DeliveryStatus(row.status)
    if status in FINAL_STATUSES:
        return AlreadyFinal(status=status, reason=row.reason, reported=row.reported_at is not None)
    return Busy(lease_expires_at=_aware(row.claimed_at) + lease)


async def finish(
    engine: AsyncEngine,
    notification_id: uuid.UUID,
    *,
    status: DeliveryStatus,
    reason: str | None,
    now: datetime,
) -> None:
    """Record the final outcome (committed before any report is published)."""
    if status not in FINAL_STATUSES:
        raise ValueError(f"{status} is not a final status")
    async with engine.begin() as connection:
        await connection.execute(
            update(deliveries)
            .where(deliveries.c.notification_id == notification_id)
            .values(status=status, reason=reason, claimed_at=None, finished_at=now, updated_at=now)
        )


async def release(
    engine: AsyncEngine, notification_id: uuid.UUID, *, reason: str, now: datetime
) -> None:
    """Give the lease back after a transient failure, so the retry can claim at once."""
    async with engine.begin() as connection:
        await connection.execute(
            update(deliveries)
            .where(
                deliveries.c.notification_id == notification_id,
                deliveries.c.status == DeliveryStatus.SENDING,
            )
            .values(status=DeliveryStatus.RETRYING, reason=reason, claimed_at=None, updated_at=now)
        )


async def mark_reported(engine: AsyncEngine, notification_id: uuid.UUID, *, now: datetime) -> None:
    async with engine.begin() as connection:
        await connection.execute(
            update(deliveries)
            .where(deliveries.c.notification_id == notification_id)
            .values(reported_at=now, updated_at=now)
        )


async def get(engine: AsyncEngine, notification_id: uuid.UUID) -> LedgerEntry | None:
    async with engine.connect() as connection:
        row = (
            await connection.execute(
                select(deliveries).where(deliveries.c.notification_id == notification_id)
            )
        ).one_or_none()
    if row is None:
        return None
    return LedgerEntry(
        notification_id=row.notification_id,
        status=DeliveryStatus(row.status),
        backend=row.backend,
        attempts=row.attempts,
        reason=row.reason,
        reported=row.reported_at is not None,
    )
