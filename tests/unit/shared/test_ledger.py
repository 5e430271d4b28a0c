"""The delivery ledger's table and claim protocol, on SQLite (tests/integration/shared runs the
concurrency on PostgreSQL). The senders' own tests cover what their handlers make of it."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import pytest
from sqlalchemy import CheckConstraint, Column, MetaData, String, Uuid, event, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from herald_shared.database import make_engine
from herald_shared.events import utc_now
from herald_shared.ledger import (
    REASON_LENGTH,
    AlreadyFinal,
    Busy,
    Claim,
    Claimed,
    DeliveryLedger,
    DeliveryStatus,
    delivery_ledger_table,
)

LEASE = timedelta(seconds=45)

metadata = MetaData()
deliveries = delivery_ledger_table(
    "test_deliveries",
    metadata,
    Column("device_id", Uuid, nullable=False),
    failures=("token_invalid", "rejected"),
)


@dataclass(frozen=True)
class Job:
    notification_id: uuid.UUID = field(default_factory=uuid.uuid4)
    message_id: uuid.UUID = field(default_factory=uuid.uuid4)
    recipient_id: uuid.UUID = field(default_factory=uuid.uuid4)
    device_id: uuid.UUID = field(default_factory=uuid.uuid4)

    @property
    def extra(self) -> dict[str, uuid.UUID]:
        return {"device_id": self.device_id}


async def claim(ledger: DeliveryLedger, job: Job, now: datetime, provider: str = "fcm") -> Claim:
    return await ledger.claim(job, provider=provider, now=now, lease=LEASE, extra=job.extra)


@pytest.fixture
async def ledger(sqlite_url: str) -> AsyncIterator[DeliveryLedger]:
    engine = make_engine(sqlite_url)
    async with engine.begin() as connection:
        await connection.run_sync(metadata.create_all)
    yield DeliveryLedger(engine, deliveries)
    await engine.dispose()


def test_the_table_has_the_common_columns_then_the_senders_own() -> None:
    assert [column.name for column in deliveries.columns] == [
        "notification_id",
        "message_id",
        "recipient_id",
        "device_id",
        "status",
        "failure",
        "provider",
        "attempts",
        "reason",
        "created_at",
        "updated_at",
        "claimed_at",
        "finished_at",
        "reported_at",
        "leased_by",
    ]
    assert [column.name for column in deliveries.primary_key] == ["notification_id"]
    assert isinstance(deliveries.c.reason.type, String)
    assert deliveries.c.reason.type.length == REASON_LENGTH
    checks = {
        constraint.name: str(constraint.sqltext)
        for constraint in deliveries.constraints
        if isinstance(constraint, CheckConstraint)
    }
    assert checks == {
        "ck_test_deliveries_status": "status IN ('sending', 'retrying', 'delivered', 'failed')",
        "ck_test_deliveries_failure": "failure IS NULL OR failure IN ('token_invalid', 'rejected')",
    }


def test_without_failure_codes_there_is_no_failure_check() -> None:
    table = delivery_ledger_table("plain_deliveries", MetaData())
    names = {c.name for c in table.constraints if isinstance(c, CheckConstraint)}
    assert names == {"ck_plain_deliveries_status"}


@pytest.mark.parametrize("codes", [("Bounced",), ("x'); DROP TABLE t; --",), ("a" * 17,)])
def test_failure_codes_are_short_snake_case_words(codes: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="failure codes"):
        delivery_ledger_table("bad_deliveries", MetaData(), failures=codes)


def test_extra_columns_cannot_replace_the_ledgers_own() -> None:
    with pytest.raises(ValueError, match="clash"):
        delivery_ledger_table("bad_deliveries", MetaData(), Column("provider", String(30)))


async def test_claim_release_finish_report(ledger: DeliveryLedger) -> None:
    job = Job()
    now = utc_now()

    assert await claim(ledger, job, now, provider="smtp") == Claimed(1)
    busy = await claim(ledger, job, now, provider="smtp")
    assert isinstance(busy, Busy)
    assert busy.lease_expires_at == now + LEASE

    await ledger.release(job.notification_id, reason="smtp 451", now=now)
    assert await claim(ledger, job, now, provider="file") == Claimed(2)

    await ledger.finish(job.notification_id, status=DeliveryStatus.DELIVERED, reason=None, now=now)
    assert await claim(ledger, job, now + timedelta(days=1)) == AlreadyFinal(
        DeliveryStatus.DELIVERED, None, None, reported=False
    )

    await ledger.mark_reported(job.notification_id, now=now)
    assert await claim(ledger, job, now, provider="smtp") == (
        AlreadyFinal(DeliveryStatus.DELIVERED, None, None, reported=True)
    )
    entry = await ledger.get(job.notification_id)
    assert entry is not None
    assert (entry.status, entry.failure, entry.provider, entry.attempts, entry.reported) == (
        DeliveryStatus.DELIVERED,
        None,
        "file",  # the provider of the attempt that claimed it last
        2,
        True,
    )
    assert entry.extra == {"device_id": job.device_id}


async def test_an_expired_lease_is_taken_over(ledger: DeliveryLedger) -> None:
    job = Job()
    then = utc_now() - LEASE - timedelta(seconds=1)
    await claim(ledger, job, then, provider="smtp")

    assert await claim(ledger, job, utc_now(), provider="smtp") == Claimed(2)


async def test_a_finished_row_stays_leased_until_its_events_are_reported(
    ledger: DeliveryLedger,
) -> None:
    job = Job()
    now = utc_now()
    await claim(ledger, job, now)
    await ledger.finish(job.notification_id, status=DeliveryStatus.DELIVERED, reason=None, now=now)

    # Its worker is publishing the report: a concurrent copy must not publish it as well.
    assert await claim(ledger, job, now) == Busy(now + LEASE)

    await ledger.mark_reported(job.notification_id, now=now)
    assert await claim(ledger, job, now) == (
        AlreadyFinal(DeliveryStatus.DELIVERED, None, None, reported=True)
    )


async def test_unreported_events_are_left_to_one_copy_once_the_lease_is_gone(
    ledger: DeliveryLedger,
) -> None:
    job = Job()
    then = utc_now() - timedelta(hours=1)
    await claim(ledger, job, then)
    await ledger.finish(
        job.notification_id,
        status=DeliveryStatus.FAILED,
        failure="token_invalid",
        reason="fcm 404 UNREGISTERED",
        now=then,
    )
    now = utc_now()

    # The worker died before publishing: the next copy publishes, under a lease of its own.
    assert await claim(ledger, job, now) == AlreadyFinal(
        DeliveryStatus.FAILED, "token_invalid", "fcm 404 UNREGISTERED", reported=False
    )
    assert await claim(ledger, job, now) == Busy(now + LEASE)
    entry = await ledger.get(job.notification_id)
    assert entry is not None
    assert entry.attempts == 1  # publishing again is not an attempt


async def test_unclaim_lets_the_retry_publish_at_once(ledger: DeliveryLedger) -> None:
    job = Job()
    now = utc_now()
    await claim(ledger, job, now)
    await ledger.finish(
        job.notification_id, status=DeliveryStatus.FAILED, failure="rejected", reason="x", now=now
    )

    await ledger.unclaim(job.notification_id, now=now)  # publishing failed

    assert await claim(ledger, job, now) == (
        AlreadyFinal(DeliveryStatus.FAILED, "rejected", "x", reported=False)
    )


async def test_unclaim_and_release_leave_other_states_alone(ledger: DeliveryLedger) -> None:
    sending, final = Job(), Job()
    now = utc_now()
    await claim(ledger, sending, now)
    await claim(ledger, final, now)
    await ledger.finish(
        final.notification_id, status=DeliveryStatus.DELIVERED, reason=None, now=now
    )

    await ledger.unclaim(sending.notification_id, now=now)  # only a final row's lease
    await ledger.release(final.notification_id, reason="late", now=now)  # only a sending row

    assert isinstance(await claim(ledger, sending, now), Busy)
    entry = await ledger.get(final.notification_id)
    assert entry is not None
    assert (entry.status, entry.reason) == (DeliveryStatus.DELIVERED, None)


async def test_reasons_are_clipped_to_the_column(ledger: DeliveryLedger) -> None:
    retried, failed = Job(), Job()
    now = utc_now()
    for job in (retried, failed):
        await claim(ledger, job, now)
    await ledger.release(retried.notification_id, reason="r" * 300, now=now)
    await ledger.finish(
        failed.notification_id, status=DeliveryStatus.FAILED, reason="f" * 300, now=now
    )

    for job, letter in ((retried, "r"), (failed, "f")):
        entry = await ledger.get(job.notification_id)
        assert entry is not None
        assert entry.reason == letter * REASON_LENGTH


async def test_finish_accepts_only_final_statuses(ledger: DeliveryLedger) -> None:
    with pytest.raises(ValueError, match="not a final status"):
        await ledger.finish(
            Job().notification_id, status=DeliveryStatus.RETRYING, reason=None, now=utc_now()
        )


async def test_the_database_refuses_unknown_codes(ledger: DeliveryLedger) -> None:
    job = Job()
    now = utc_now()
    await claim(ledger, job, now)

    with pytest.raises(IntegrityError):
        await ledger.finish(
            job.notification_id,
            status=DeliveryStatus.FAILED,
            failure="bounced",
            reason=None,
            now=now,
        )
    with pytest.raises(IntegrityError):
        await _set_status(ledger.engine, job, "lost")


async def _set_status(engine: AsyncEngine, job: Job, status: str) -> None:
    async with engine.begin() as connection:
        await connection.execute(
            update(deliveries)
            .where(deliveries.c.notification_id == job.notification_id)
            .values(status=status)
        )


async def test_unknown_notification(ledger: DeliveryLedger) -> None:
    assert await ledger.get(Job().notification_id) is None


async def claim_batch(
    ledger: DeliveryLedger, jobs: list[Job], now: datetime
) -> dict[uuid.UUID, Claim]:
    return await ledger.claim_many(
        jobs, provider="fcm", now=now, lease=LEASE, extra=lambda job: job.extra
    )


async def test_a_batch_is_claimed_finished_and_reported_together(ledger: DeliveryLedger) -> None:
    jobs = [Job() for _ in range(5)]
    now = utc_now()

    claims = await claim_batch(ledger, jobs, now)
    assert claims == {job.notification_id: Claimed(1) for job in jobs}

    ids = [job.notification_id for job in jobs]
    await ledger.finish_many(ids[:3], status=DeliveryStatus.DELIVERED, reason=None, now=now)
    await ledger.finish_many(
        ids[3:], status=DeliveryStatus.FAILED, failure="rejected", reason="fcm 400", now=now
    )
    await ledger.mark_reported_many(ids, now=now)

    again = await claim_batch(ledger, jobs, now)
    assert [again[id_] for id_ in ids] == [
        *[AlreadyFinal(DeliveryStatus.DELIVERED, None, None, reported=True)] * 3,
        *[AlreadyFinal(DeliveryStatus.FAILED, "rejected", "fcm 400", reported=True)] * 2,
    ]
    entry = await ledger.get(ids[0])
    assert entry is not None
    assert entry.extra == {"device_id": jobs[0].device_id}


async def test_a_retried_batch_claims_only_what_is_not_final(ledger: DeliveryLedger) -> None:
    delivered, transient, busy, new = Job(), Job(), Job(), Job()
    now = utc_now()
    await claim_batch(ledger, [delivered, transient, busy], now)
    await ledger.finish(
        delivered.notification_id, status=DeliveryStatus.DELIVERED, reason=None, now=now
    )
    await ledger.mark_reported(delivered.notification_id, now=now)
    await ledger.release(transient.notification_id, reason="fcm 503", now=now)

    claims = await claim_batch(ledger, [delivered, transient, busy, new], now)

    assert claims == {
        delivered.notification_id: AlreadyFinal(
            DeliveryStatus.DELIVERED, None, None, reported=True
        ),
        transient.notification_id: Claimed(2),
        busy.notification_id: Busy(now + LEASE),
        new.notification_id: Claimed(1),
    }


async def test_abandon_many_drops_only_this_workers_leases(ledger: DeliveryLedger) -> None:
    other = DeliveryLedger(ledger.engine, ledger.table)
    mine, finished, theirs = Job(), Job(), Job()
    then = utc_now() - LEASE - timedelta(seconds=1)
    await claim_batch(ledger, [mine, finished, theirs], then)
    await ledger.finish(
        finished.notification_id, status=DeliveryStatus.DELIVERED, reason=None, now=then
    )
    now = utc_now()
    assert await claim(other, theirs, now) == Claimed(2)  # my lease ran out; another took it

    await ledger.abandon_many(
        [mine.notification_id, finished.notification_id, theirs.notification_id],
        reason="fcm send interrupted",
        now=now,
    )

    assert await claim(ledger, mine, now) == Claimed(2)  # sending → retrying, free at once
    assert await claim(ledger, finished, now) == (
        AlreadyFinal(DeliveryStatus.DELIVERED, None, None, reported=False)
    )
    assert isinstance(await claim(ledger, theirs, now), Busy)


async def test_a_worker_whose_lease_was_taken_over_cannot_overwrite_the_new_owners_row(
    ledger: DeliveryLedger,
) -> None:
    """The lease ran out while the first worker sent (its renewals did not get through), a
    second worker claimed the job and ended it: whatever the first does afterwards changes
    nothing (every write is a compare-and-set on the lease's owner)."""
    late = ledger
    new_owner = DeliveryLedger(ledger.engine, ledger.table)
    job, kept = Job(), Job()
    then = utc_now() - LEASE - timedelta(seconds=1)
    await claim_batch(late, [job, kept], then)
    now = utc_now()
    assert await claim(new_owner, job, now) == Claimed(2)

    # While the new owner sends: the late worker can neither finish, release, renew nor drop it.
    ids = [job.notification_id, kept.notification_id]
    recorded = await late.finish_many(ids, status=DeliveryStatus.FAILED, reason="gone", now=now)
    assert recorded == {kept.notification_id}  # only the row it still holds
    assert not await late.finish(
        job.notification_id, status=DeliveryStatus.DELIVERED, reason=None, now=now
    )
    await late.release(job.notification_id, reason="fcm 503", now=now)
    await late.renew_many([job.notification_id], now=now + LEASE)
    await late.abandon(job.notification_id, reason="interrupted", now=now)
    assert await claim(late, job, now) == Busy(now + LEASE)  # the new owner's lease, unmoved

    # The new owner's outcome stands, and so does its lease until it reports.
    assert await new_owner.finish(
        job.notification_id, status=DeliveryStatus.DELIVERED, reason=None, now=now
    )
    await late.finish(job.notification_id, status=DeliveryStatus.FAILED, reason="x", now=now)
    await late.mark_reported(job.notification_id, now=now)
    await late.unclaim(job.notification_id, now=now)
    assert await claim(late, job, now) == Busy(now + LEASE)
    await new_owner.mark_reported(job.notification_id, now=now)
    entry = await ledger.get(job.notification_id)
    assert entry is not None
    assert (entry.status, entry.reason, entry.attempts, entry.reported) == (
        DeliveryStatus.DELIVERED,
        None,
        2,
        True,
    )


async def test_a_late_outcome_is_recorded_on_a_row_given_back_that_nobody_claimed(
    ledger: DeliveryLedger,
) -> None:
    """A worker shutting down abandons a send still running; the call then ends: its outcome
    is recorded (the next copy need not send again), and the next copy publishes its events."""
    job = Job()
    now = utc_now()
    await claim(ledger, job, now)
    await ledger.abandon(job.notification_id, reason="send interrupted", now=now)

    assert await ledger.finish(
        job.notification_id, status=DeliveryStatus.DELIVERED, reason=None, now=now
    )

    other = DeliveryLedger(ledger.engine, ledger.table)
    assert await claim(other, job, now) == (
        AlreadyFinal(DeliveryStatus.DELIVERED, None, None, reported=False)
    )


async def test_a_renewed_lease_keeps_another_worker_out(ledger: DeliveryLedger) -> None:
    other = DeliveryLedger(ledger.engine, ledger.table)
    job = Job()
    then = utc_now() - LEASE + timedelta(seconds=1)
    await claim(ledger, job, then)
    now = utc_now()

    await ledger.renew_many([job.notification_id], now=now)

    later = now + LEASE - timedelta(seconds=1)  # the first lease would have run out by then
    assert await claim(other, job, later) == Busy(now + LEASE)
    assert await claim(other, job, now + LEASE + timedelta(seconds=1)) == Claimed(2)


async def test_unclaim_many_lets_a_retry_publish_a_whole_batch_at_once(
    ledger: DeliveryLedger,
) -> None:
    jobs = [Job(), Job()]
    now = utc_now()
    await claim_batch(ledger, jobs, now)
    ids = [job.notification_id for job in jobs]
    await ledger.finish_many(ids, status=DeliveryStatus.DELIVERED, reason=None, now=now)

    await ledger.unclaim_many(ids, now=now)  # publishing the batch report failed

    claims = await claim_batch(ledger, jobs, now)
    assert set(claims.values()) == {
        AlreadyFinal(DeliveryStatus.DELIVERED, None, None, reported=False)
    }


async def test_batch_writes_of_nothing_do_nothing(ledger: DeliveryLedger) -> None:
    now = utc_now()
    assert await claim_batch(ledger, [], now) == {}
    await ledger.finish_many([], status=DeliveryStatus.DELIVERED, reason=None, now=now)
    await ledger.mark_reported_many([], now=now)
    await ledger.unclaim_many([], now=now)
    await ledger.abandon_many([], reason="x", now=now)
    await ledger.renew_many([], now=now)
    assert await ledger.finish_many([], status=DeliveryStatus.DELIVERED, reason=None, now=now) == (
        set()
    )
    with pytest.raises(ValueError, match="not a final status"):
        await ledger.finish_many(
            [uuid.uuid4()], status=DeliveryStatus.SENDING, reason=None, now=now
        )


async def test_a_retried_batch_takes_at_most_four_statements_whatever_its_size(
    ledger: DeliveryLedger,
) -> None:
    jobs = [Job() for _ in range(20)]
    now = utc_now()
    await claim_batch(ledger, jobs, now)
    ids = [job.notification_id for job in jobs]
    await ledger.finish_many(ids[:10], status=DeliveryStatus.DELIVERED, reason=None, now=now)
    await ledger.mark_reported_many(ids[:10], now=now)
    statements: list[str] = []

    def count(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        statements.append(statement.split(None, 1)[0].upper())

    event.listen(ledger.engine.sync_engine, "before_cursor_execute", count)
    try:
        claims = await claim_batch(ledger, jobs, now)
    finally:
        event.remove(ledger.engine.sync_engine, "before_cursor_execute", count)

    assert statements == ["INSERT", "UPDATE", "UPDATE", "SELECT"]
    assert [claims[id_] for id_ in ids] == [
        *[AlreadyFinal(DeliveryStatus.DELIVERED, None, None, reported=True)] * 10,
        *[Busy(now + LEASE)] * 10,
    ]
