"""The delivery ledger on PostgreSQL: concurrent copies of one job, claimed at the same moment,
leave exactly one worker sending, and exactly one publishing events that did not go out."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta

import pytest
from sqlalchemy import MetaData

from herald_shared.database import make_engine
from herald_shared.events import utc_now
from herald_shared.ledger import (
    AlreadyFinal,
    Busy,
    Claim,
    Claimed,
    DeliveryLedger,
    DeliveryStatus,
    delivery_ledger_table,
)

LEASE = timedelta(seconds=45)
COPIES = 10

metadata = MetaData()
deliveries = delivery_ledger_table("test_deliveries", metadata, failures=("bounced",))


@dataclass(frozen=True)
class Job:
    notification_id: uuid.UUID = field(default_factory=uuid.uuid4)
    message_id: uuid.UUID = field(default_factory=uuid.uuid4)
    recipient_id: uuid.UUID = field(default_factory=uuid.uuid4)


@pytest.fixture
async def ledger(pg_url: str) -> AsyncIterator[DeliveryLedger]:
    engine = make_engine(pg_url, pool_size=COPIES)
    async with engine.begin() as connection:
        await connection.run_sync(metadata.create_all)
    yield DeliveryLedger(engine, deliveries)
    await engine.dispose()


async def copies(ledger: DeliveryLedger, job: Job) -> list[Claim]:
    now = utc_now()
    return list(
        await asyncio.gather(
            *(ledger.claim(job, provider="smtp", now=now, lease=LEASE) for _ in range(COPIES))
        )
    )


async def test_concurrent_claims_let_exactly_one_worker_send(ledger: DeliveryLedger) -> None:
    claims = await copies(ledger, Job())

    assert [claim for claim in claims if isinstance(claim, Claimed)] == [Claimed(1)]
    assert sum(isinstance(claim, Busy) for claim in claims) == COPIES - 1


async def test_concurrent_retries_let_exactly_one_worker_send(ledger: DeliveryLedger) -> None:
    job = Job()
    now = utc_now()
    await ledger.claim(job, provider="smtp", now=now, lease=LEASE)
    await ledger.release(job.notification_id, reason="smtp 451", now=now)

    claims = await copies(ledger, job)

    assert [claim for claim in claims if isinstance(claim, Claimed)] == [Claimed(2)]
    assert sum(isinstance(claim, Busy) for claim in claims) == COPIES - 1


async def test_concurrent_copies_of_an_unreported_job_let_exactly_one_publish(
    ledger: DeliveryLedger,
) -> None:
    job = Job()
    then = utc_now() - timedelta(hours=1)
    await ledger.claim(job, provider="smtp", now=then, lease=LEASE)
    await ledger.finish(
        job.notification_id,
        status=DeliveryStatus.FAILED,
        failure="bounced",
        reason="smtp 550 5.1.1",
        now=then,
    )

    claims = await copies(ledger, job)

    assert [claim for claim in claims if isinstance(claim, AlreadyFinal)] == [
        AlreadyFinal(DeliveryStatus.FAILED, "bounced", "smtp 550 5.1.1", reported=False)
    ]
    assert sum(isinstance(claim, Busy) for claim in claims) == COPIES - 1

    await ledger.mark_reported(job.notification_id, now=utc_now())
    assert set(await copies(ledger, job)) == {
        AlreadyFinal(DeliveryStatus.FAILED, "bounced", "smtp 550 5.1.1", reported=True)
    }


async def test_a_lease_read_back_from_postgresql_keeps_its_zone(ledger: DeliveryLedger) -> None:
    job = Job()
    now = utc_now()
    await ledger.claim(job, provider="smtp", now=now, lease=LEASE)

    assert await ledger.claim(job, provider="smtp", now=now, lease=LEASE) == Busy(now + LEASE)


async def test_concurrent_copies_of_a_batch_give_each_job_to_exactly_one_worker(
    ledger: DeliveryLedger,
) -> None:
    # Overlapping batches (a redelivered batch next to its original, a republished one with a
    # different composition), claimed at the same moment: each job is Claimed exactly once, and
    # the sorted multi-row inserts do not deadlock.
    jobs = [Job() for _ in range(30)]
    batches = [jobs, list(reversed(jobs)), jobs[::2], jobs[5:25]]
    now = utc_now()

    results = await asyncio.gather(
        *(ledger.claim_many(batch, provider="smtp", now=now, lease=LEASE) for batch in batches)
    )

    for job in jobs:
        claims = [
            claims[job.notification_id] for claims in results if job.notification_id in claims
        ]
        assert claims.count(Claimed(1)) == 1
        assert all(isinstance(claim, Busy) for claim in claims if claim != Claimed(1))
