"""Every SQL statement of push-sender: the delivery ledger.

Idempotency comes from the primary key on notification_id and `INSERT … ON CONFLICT DO NOTHING`;
concurrency (two copies of one job at the same time, with prefetch > 1 or several replicas) from a
lease: only the worker whose conditional INSERT/UPDATE claimed the row calls the provider, and it
keeps the lease until the outcome's events are published, so a concurrent copy neither sends nor
publishes them a second time.
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

from herald_shared.events import PushRequested
from push_sender.tables import push_deliveries as deliveries


class DeliveryStatus(StrEnum):
    SENDING = "sending"  # claimed by a worker until claimed_at + lease
    RETRYING = "retrying"  # the last attempt failed transiently; free to claim
    DELIVERED = "delivered"  # final
    FAILED = "failed"  # final


class Failure(StrEnum):
    # The device's token is dead: the device was invalidated.
    TOKEN_INVALID = "token_invalid"  # noqa: S105 - a label, not a secret
    REJECTED = "rejected"  # the provider refused this push for good: dead-lettered


FINAL_STATUSES = frozenset({DeliveryStatus.DELIVERED, DeliveryStatus.FAILED})
REASON_LENGTH = 200  # the width of push_deliveries.reason


@dataclass(frozen=True)
class Claimed:
    """This worker owns the delivery and may call the provider."""

    attempt: int


@dataclass(frozen=True)
class AlreadyFinal:
    """The delivery ended before; `reported` says whether its events went out."""

    status: DeliveryStatus
    failure: Failure | None
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
    device_id: uuid.UUID
    status: DeliveryStatus
    failure: Failure | None
    provider: str
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
    job: PushRequested,
    *,
    provider: str,
    now: datetime,
    lease: timedelta,
) -> Claim:
    """Take the right to send `job`, or say why not (already final, or being sent right now).

    A `sending` row whose lease has expired belongs to a worker that died mid-send: it is taken
    over, which may push a second time (at-least-once; the collapse id makes the device replace
    the first notification). A final row whose events are not out yet is `Busy` while its lease
    lives (its worker is publishing them) and `AlreadyFinal(reported=False)` after.
    """
    async with engine.begin() as connection:
        inserted = await connection.execute(
            _insert(connection)
            .values(
                notification_id=job.notification_id,
                message_id=job.message_id,
                recipient_id=job.recipient_id,
                device_id=job.device_id,
                status=DeliveryStatus.SENDING,
                provider=provider,
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
                provider=provider,
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
                    deliveries.c.failure,
                    deliveries.c.reason,
                    deliveries.c.claimed_at,
                    deliveries.c.reported_at,
                ).where(deliveries.c.notification_id == job.notification_id)
            )
        ).one()
    status = DeliveryStatus(row.status)
    lease_expires_at = _aware(row.claimed_at) + lease if row.claimed_at is not None else None
    if lease_expires_at is not None and lease_expires_at > now and row.reported_at is None:
        return Busy(lease_expires_at=lease_expires_at)
    if status in FINAL_STATUSES:
        return AlreadyFinal(
            status=status,
            failure=Failure(row.failure) if row.failure is not None else None,
            reason=row.reason,
            reported=row.reported_at is not None,
        )
    # Unreachable in practice: a row that is neither final nor retrying is sending, and its lease
    # either lives (Busy above) or has expired (taken over above).
    return Busy(lease_expires_at=lease_expires_at or now)


async def finish(
    engine: AsyncEngine,
    notification_id: uuid.UUID,
    *,
    status: DeliveryStatus,
    failure: Failure | None,
    reason: str | None,
    now: datetime,
) -> None:
    """Record the final outcome (committed before any event is published and before the ack).
    The lease stays until `mark_reported` or `unclaim`."""
    if status not in FINAL_STATUSES:
        raise ValueError(f"{status} is not a final status")
    async with engine.begin() as connection:
        await connection.execute(
            update(deliveries)
            .where(deliveries.c.notification_id == notification_id)
            .values(
                status=status,
                failure=failure,
                reason=reason[:REASON_LENGTH] if reason is not None else None,
                finished_at=now,
                updated_at=now,
            )
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
            .values(
                status=DeliveryStatus.RETRYING,
                reason=reason[:REASON_LENGTH],
                claimed_at=None,
                updated_at=now,
            )
        )


async def mark_reported(engine: AsyncEngine, notification_id: uuid.UUID, *, now: datetime) -> None:
    """The outcome's events are out: the job is done, and the lease with it."""
    async with engine.begin() as connection:
        await connection.execute(
            update(deliveries)
            .where(deliveries.c.notification_id == notification_id)
            .values(reported_at=now, claimed_at=None, updated_at=now)
        )


async def unclaim(engine: AsyncEngine, notification_id: uuid.UUID, *, now: datetime) -> None:
    """Drop the lease of a final row whose events could not be published, so that the retry
    publishes them at once instead of waiting for the lease to run out."""
    async with engine.begin() as connection:
        await connection.execute(
            update(deliveries)
            .where(
                deliveries.c.notification_id == notification_id,
                deliveries.c.status.in_(FINAL_STATUSES),
            )
            .values(claimed_at=None, updated_at=now)
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
        device_id=row.device_id,
        status=DeliveryStatus(row.status),
        failure=Failure(row.failure) if row.failure is not None else None,
        provider=row.provider,
        attempts=row.attempts,
        reason=row.reason,
        reported=row.reported_at is not None,
    )
