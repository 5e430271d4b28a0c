"""The delivery ledger's claim protocol, on SQLite (tests/integration runs it on PostgreSQL)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from email_sender import repository
from email_sender.repository import AlreadyFinal, Busy, Claimed, DeliveryStatus
from herald_shared.database import make_engine, run_migrations
from herald_shared.events import utc_now
from tests.unit.email_sender.support import email_job

LEASE = timedelta(seconds=45)


@pytest.fixture
async def engine(sqlite_url: str) -> AsyncIterator[AsyncEngine]:
    engine = make_engine(sqlite_url)
    await run_migrations(
        engine, script_location="email_sender:migrations", service_name="email-sender"
    )
    yield engine
    await engine.dispose()


async def test_claim_release_finish_report(engine: AsyncEngine) -> None:
    job = email_job()
    now = utc_now()

    assert await repository.claim(engine, job, backend="smtp", now=now, lease=LEASE) == Claimed(1)
    busy = await repository.claim(engine, job, backend="smtp", now=now, lease=LEASE)
    assert isinstance(busy, Busy)
    assert busy.lease_expires_at == now + LEASE

    await repository.release(engine, job.notification_id, reason="smtp 451", now=now)
    assert await repository.claim(engine, job, backend="smtp", now=now, lease=LEASE) == Claimed(2)

    await repository.finish(
        engine, job.notification_id, status=DeliveryStatus.DELIVERED, reason=None, now=now
    )
    assert await repository.claim(
        engine, job, backend="smtp", now=now + timedelta(days=1), lease=LEASE
    ) == AlreadyFinal(DeliveryStatus.DELIVERED, None, reported=False)

    await repository.mark_reported(engine, job.notification_id, now=now)
    assert await repository.claim(engine, job, backend="smtp", now=now, lease=LEASE) == (
        AlreadyFinal(DeliveryStatus.DELIVERED, None, reported=True)
    )
    entry = await repository.get(engine, job.notification_id)
    assert entry is not None
    assert (entry.status, entry.attempts, entry.reported) == (DeliveryStatus.DELIVERED, 2, True)


async def test_an_expired_lease_is_taken_over(engine: AsyncEngine) -> None:
    job = email_job()
    then = utc_now() - LEASE - timedelta(seconds=1)
    await repository.claim(engine, job, backend="smtp", now=then, lease=LEASE)

    assert await repository.claim(engine, job, backend="smtp", now=utc_now(), lease=LEASE) == (
        Claimed(2)
    )


async def test_finish_accepts_only_final_statuses(engine: AsyncEngine) -> None:
    with pytest.raises(ValueError, match="not a final status"):
        await repository.finish(
            engine,
            email_job().notification_id,
            status=DeliveryStatus.RETRYING,
            reason=None,
            now=utc_now(),
        )


async def test_unknown_notification(engine: AsyncEngine) -> None:
    assert await repository.get(engine, email_job().notification_id) is None
