"""The handler's wiring with the in-memory broker and SQLite: the ledger, the published events,
and how each provider answer ends the job. (Retries and dead letters themselves are the shared
middleware's, tested on the real broker.)"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from faststream import TestApp
from faststream.rabbit import TestRabbitBroker
from sqlalchemy import Connection, update

from herald_shared.events import DeliveryReported, DeviceInvalidated, PushRequested, utc_now
from herald_shared.ledger import DeliveryStatus
from herald_shared.retry import DeferredError, PermanentError, RetryableError
from herald_shared.topology import EXCHANGE, PUSH_SEND
from push_sender.app import PushService, build_service, specification
from push_sender.handlers import send_push
from push_sender.providers.base import ProviderAnswer
from push_sender.settings import Settings
from push_sender.tables import Failure, metadata, push_deliveries
from tests.fakes.fcm import FakeFcm
from tests.unit.push_sender.support import (
    DEVICE_TOKEN,
    RecordingProvider,
    fcm_settings,
    provider_of,
    push_job,
    unit_settings,
    use_provider,
)


@pytest.fixture
async def stack() -> AsyncIterator[AsyncExitStack]:
    async with AsyncExitStack() as stack:
        yield stack


async def start(stack: AsyncExitStack, service: PushService) -> PushService:
    """Run the service on the in-memory broker (with its real start-up: the migrations) until
    the end of the test."""
    await stack.enter_async_context(TestRabbitBroker(service.broker))
    await stack.enter_async_context(TestApp(service.app))
    return service


@pytest.fixture
async def recording(sqlite_url: str, tmp_path: Path, stack: AsyncExitStack) -> PushService:
    settings = unit_settings(tmp_path, sqlite_url)
    return await start(stack, build_service(settings, provider=RecordingProvider()))


@pytest.fixture
async def with_fcm(
    sqlite_url: str, tmp_path: Path, fcm: FakeFcm, credentials: Path, stack: AsyncExitStack
) -> PushService:
    settings = fcm_settings(
        tmp_path, sqlite_url, credentials=credentials, base_url=fcm.base_url, timeout=0.5
    )
    return await start(stack, build_service(settings))


async def publish(service: PushService, job: PushRequested) -> None:
    await service.broker.publish(job, exchange=EXCHANGE, routing_key=PUSH_SEND)


def published(publisher_mock: Any) -> list[dict[str, Any]]:
    return [call.args[0] for call in publisher_mock.call_args_list]


def events_published(service: PushService) -> dict[str, list[dict[str, Any]]]:
    return {
        "delivered": published(service.deps.delivered.mock),
        "failed": published(service.deps.failed.mock),
        "invalidated": published(service.deps.invalidated.mock),
    }


def counter(service: PushService, outcome: str) -> float:
    labels = {"provider": provider_of(service).name, "outcome": outcome}
    return service.registry.get_sample_value("herald_pushes_total", labels) or 0.0


async def test_a_push_is_sent_recorded_and_reported(recording: PushService) -> None:
    provider = provider_of(recording)
    assert isinstance(provider, RecordingProvider)
    job = push_job()

    await publish(recording, job)

    assert [sent.notification_id for sent in provider.sent] == [job.notification_id]
    entry = await recording.deps.sender.ledger.get(job.notification_id)
    assert entry is not None
    assert (entry.status, entry.failure, entry.attempts, entry.reported) == (
        DeliveryStatus.DELIVERED,
        None,
        1,
        True,
    )
    assert entry.extra == {"device_id": job.device_id}
    [report] = events_published(recording)["delivered"]
    assert DeliveryReported.model_validate(report).model_dump(
        include={"notification_id", "message_id", "recipient_id", "channel", "outcome", "reason"}
    ) == {
        "notification_id": job.notification_id,
        "message_id": job.message_id,
        "recipient_id": job.recipient_id,
        "channel": "push",
        "outcome": "delivered",
        "reason": None,
    }
    assert events_published(recording)["failed"] == []
    assert counter(recording, "delivered") == 1
    histogram = recording.registry.get_sample_value(
        "herald_push_provider_duration_seconds_count", {"provider": "recording"}
    )
    assert histogram == 1


async def test_a_redelivered_job_does_not_call_the_provider_again(
    recording: PushService,
) -> None:
    provider = provider_of(recording)
    assert isinstance(provider, RecordingProvider)
    job = push_job()

    await publish(recording, job)
    await publish(recording, job)  # a redelivery, or the router publishing the job again

    assert len(provider.sent) == 1
    assert len(events_published(recording)["delivered"]) == 1
    assert counter(recording, "duplicate") == 1
    entry = await recording.deps.sender.ledger.get(job.notification_id)
    assert entry is not None
    assert entry.attempts == 1


async def test_events_that_did_not_go_out_are_published_by_the_next_copy(
    recording: PushService,
) -> None:
    provider = provider_of(recording)
    assert isinstance(provider, RecordingProvider)
    job = push_job()
    await publish(recording, job)
    # As if the worker died after committing the outcome, before publishing the report.
    async with recording.engine.begin() as connection:
        await connection.execute(
            update(push_deliveries).values(
                reported_at=None, claimed_at=utc_now() - timedelta(hours=1)
            )
        )

    await publish(recording, job)

    assert len(provider.sent) == 1  # the provider is not asked again
    first, second = events_published(recording)["delivered"]
    assert first["event_id"] == second["event_id"]  # the same report: consumers dedupe
    entry = await recording.deps.sender.ledger.get(job.notification_id)
    assert entry is not None
    assert entry.reported


class UnreachableBroker:
    """A publisher whose broker is gone (publish_event's timeout, a nack, an unroutable key)."""

    async def publish(self, *args: Any, **kwargs: Any) -> None:
        raise TimeoutError


async def test_events_that_could_not_be_published_go_out_with_the_retry(
    recording: PushService,
) -> None:
    provider = provider_of(recording)
    assert isinstance(provider, RecordingProvider)
    job = push_job()
    broken = dataclasses.replace(recording.deps, delivered=cast(Any, UnreachableBroker()))

    with pytest.raises(TimeoutError):
        await send_push(job, broken)

    entry = await recording.deps.sender.ledger.get(job.notification_id)
    assert entry is not None
    assert (entry.status, entry.reported) == (DeliveryStatus.DELIVERED, False)

    await send_push(job, recording.deps)  # the retry: at once, not after the lease

    assert len(provider.sent) == 1
    assert len(events_published(recording)["delivered"]) == 1
    entry = await recording.deps.sender.ledger.get(job.notification_id)
    assert entry is not None
    assert entry.reported


async def test_a_job_another_worker_is_sending_comes_back_later_without_spending_an_attempt(
    recording: PushService,
) -> None:
    provider = provider_of(recording)
    assert isinstance(provider, RecordingProvider)
    job = push_job()
    lease = recording.deps.sender.lease_for(job)
    await recording.deps.sender.ledger.claim(
        job, provider="other", now=utc_now(), lease=lease, extra={"device_id": job.device_id}
    )

    with pytest.raises(DeferredError, match="in progress") as raised:
        await send_push(job, recording.deps)

    assert provider.sent == []
    assert raised.value.retry_after is not None
    assert 0 < raised.value.retry_after <= lease.total_seconds()
    assert counter(recording, "in_progress") == 1


async def test_a_provider_bug_frees_the_claim_and_raises(recording: PushService) -> None:
    class Broken(RecordingProvider):
        async def send(self, job: PushRequested) -> Any:
            raise ZeroDivisionError

    use_provider(recording, Broken())
    job = push_job()

    with pytest.raises(ZeroDivisionError):
        await send_push(job, recording.deps)

    entry = await recording.deps.sender.ledger.get(job.notification_id)
    assert entry is not None
    assert (entry.status, entry.reason) == (
        DeliveryStatus.RETRYING,
        "recording error (ZeroDivisionError)",
    )


async def test_a_dead_token_invalidates_the_device_and_is_acknowledged(
    with_fcm: PushService, fcm: FakeFcm
) -> None:
    fcm.fail(DEVICE_TOKEN, 404, "UNREGISTERED")
    job = push_job()

    await send_push(job, with_fcm.deps)  # no exception: acknowledged, never retried

    events = events_published(with_fcm)
    [invalidation] = events["invalidated"]
    assert DeviceInvalidated.model_validate(invalidation).model_dump(
        include={"user_id", "device_id", "reason"}
    ) == {"user_id": job.recipient_id, "device_id": job.device_id, "reason": "fcm 404 UNREGISTERED"}
    [report] = events["failed"]
    assert (report["outcome"], report["reason"]) == ("failed", "fcm 404 UNREGISTERED")
    assert events["delivered"] == []
    entry = await with_fcm.deps.sender.ledger.get(job.notification_id)
    assert entry is not None
    assert (entry.status, entry.failure, entry.reported) == (
        DeliveryStatus.FAILED,
        Failure.TOKEN_INVALID,
        True,
    )

    await send_push(job, with_fcm.deps)  # a copy: nothing more
    assert fcm.send_requests == 1
    assert len(events_published(with_fcm)["invalidated"]) == 1


async def test_an_invalid_token_argument_invalidates_the_device(
    with_fcm: PushService, fcm: FakeFcm
) -> None:
    fcm.fail(DEVICE_TOKEN, 400, "INVALID_ARGUMENT", field="message.token")

    await send_push(push_job(), with_fcm.deps)

    assert len(events_published(with_fcm)["invalidated"]) == 1
    assert len(events_published(with_fcm)["failed"]) == 1


async def test_a_refused_push_is_reported_then_dead_lettered(
    with_fcm: PushService, fcm: FakeFcm
) -> None:
    fcm.fail(DEVICE_TOKEN, 400, "INVALID_ARGUMENT")
    job = push_job()

    with pytest.raises(PermanentError, match="fcm 400 INVALID_ARGUMENT"):
        await send_push(job, with_fcm.deps)

    events = events_published(with_fcm)
    assert [(r["outcome"], r["reason"]) for r in events["failed"]] == [
        ("failed", "fcm 400 INVALID_ARGUMENT")
    ]
    assert events["invalidated"] == []
    entry = await with_fcm.deps.sender.ledger.get(job.notification_id)
    assert entry is not None
    assert (entry.status, entry.failure) == (DeliveryStatus.FAILED, Failure.REJECTED)

    # Replayed from the dead-letter queue later: acknowledged, the provider is not asked again.
    await send_push(job, with_fcm.deps)
    assert fcm.send_requests == 1


@pytest.mark.parametrize(
    ("status", "error_code", "options", "reason", "retry_after"),
    [
        (429, "QUOTA_EXCEEDED", {"retry_after": 7}, "fcm 429 QUOTA_EXCEEDED", 7.0),
        (503, "UNAVAILABLE", {}, "fcm 503 UNAVAILABLE", None),
        (500, "INTERNAL", {}, "fcm 500 INTERNAL", None),
        (0, "", {}, "fcm timeout", None),  # 0: the fake stalls past the client's timeout
    ],
)
async def test_transient_answers_raise_retryable_errors(
    with_fcm: PushService,
    fcm: FakeFcm,
    caplog: pytest.LogCaptureFixture,
    status: int,
    error_code: str,
    options: dict[str, Any],
    reason: str,
    retry_after: float | None,
) -> None:
    if status == 0:
        await send_push(push_job(), with_fcm.deps)  # the access token, fetched in time
        fcm.stall(DEVICE_TOKEN, 3.0, times=1)
    else:
        fcm.fail(DEVICE_TOKEN, status, error_code, times=1, **options)
    job = push_job()

    with pytest.raises(RetryableError) as raised:
        await send_push(job, with_fcm.deps)

    assert (raised.value.reason, raised.value.retry_after) == (reason, retry_after)
    assert events_published(with_fcm)["failed"] == []
    entry = await with_fcm.deps.sender.ledger.get(job.notification_id)
    assert entry is not None
    assert (entry.status, entry.attempts) == (DeliveryStatus.RETRYING, 1)
    # (A 403, our configuration, is deferred instead: test_provider_resilience.py.)

    await send_push(job, with_fcm.deps)  # the retry
    entry = await with_fcm.deps.sender.ledger.get(job.notification_id)
    assert entry is not None
    assert (entry.status, entry.attempts) == (DeliveryStatus.DELIVERED, 2)
    assert len(fcm.messages_to(DEVICE_TOKEN)) == (2 if status == 0 else 1)


async def test_logs_carry_ids_only(
    with_fcm: PushService, fcm: FakeFcm, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    job = push_job()
    await publish(with_fcm, job)
    await publish(with_fcm, job)
    fcm.fail(DEVICE_TOKEN, 503, "UNAVAILABLE", times=1)
    await publish(with_fcm, push_job())
    fcm.fail(DEVICE_TOKEN, 404, "UNREGISTERED", times=1)
    await publish(with_fcm, push_job())

    # aiosqlite logs statements with their parameters at DEBUG (the ledger holds ids only).
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert str(job.notification_id) in text
    for secret in (DEVICE_TOKEN, job.title, job.body, "ya29.", "eyJ", "PRIVATE KEY"):
        assert secret not in text


async def test_the_app_closes_its_provider(sqlite_url: str, tmp_path: Path) -> None:
    provider = RecordingProvider()
    service = build_service(unit_settings(tmp_path, sqlite_url), provider=provider)
    async with TestRabbitBroker(service.broker), TestApp(service.app):
        assert not provider.closed
    assert provider.closed


async def test_the_log_provider_by_default(
    sqlite_url: str, tmp_path: Path, stack: AsyncExitStack
) -> None:
    service = await start(stack, build_service(unit_settings(tmp_path, sqlite_url)))
    job = push_job()

    await publish(service, job)

    assert provider_of(service).name == "log"
    log = (tmp_path / "pushes.jsonl").read_text()
    assert str(job.notification_id) in log
    assert DEVICE_TOKEN not in log
    assert len(events_published(service)["delivered"]) == 1


async def test_migrations_match_the_tables(recording: PushService) -> None:
    def differences(connection: Connection) -> list[Any]:
        context = MigrationContext.configure(
            connection, opts={"version_table": "alembic_version_push_sender"}
        )
        return list(compare_metadata(context, metadata))

    async with recording.engine.connect() as connection:
        assert await connection.run_sync(differences) == []


def test_the_specification_documents_the_queue_and_every_report() -> None:
    document = specification(Settings()).to_specification().to_jsonable()
    operations = document["operations"]
    sends = {
        key
        for operation in operations.values()
        if operation["action"] == "send"
        for key in operation["bindings"]["amqp"]["cc"]
    }
    assert sends == {
        "notification.push.delivered",
        "notification.push.failed",
        "device.invalidated",
    }
    receives = [op for op in operations.values() if op["action"] == "receive"]
    assert len(receives) == 1


async def test_a_handler_cancelled_mid_send_records_the_answer_so_the_redelivered_job_only_reports(
    recording: PushService,
) -> None:
    """As when the broker connection is lost while a push is with the provider: the provider's
    answer is still recorded, and the copy that RabbitMQ redelivers publishes it at once (not
    `Busy` until the lease runs out) without sending the push a second time."""
    calling, answer = asyncio.Event(), asyncio.Event()

    class Slow(RecordingProvider):
        async def send(self, job: PushRequested) -> Any:
            self.sent.append(job)
            calling.set()
            await answer.wait()
            return ProviderAnswer.accepted()

    provider = Slow()
    use_provider(recording, provider)
    job = push_job()
    handler = asyncio.create_task(send_push(job, recording.deps))
    await asyncio.wait_for(calling.wait(), timeout=5)
    handler.cancel()
    answer.set()
    with pytest.raises(asyncio.CancelledError):
        await handler

    entry = await recording.deps.sender.ledger.get(job.notification_id)
    assert entry is not None
    assert (entry.status, entry.reported) == (DeliveryStatus.DELIVERED, False)
    await send_push(job, recording.deps)
    assert len(provider.sent) == 1
    assert [report["outcome"] for report in events_published(recording)["delivered"]] == [
        "delivered"
    ]


async def test_a_handler_cancelled_while_the_provider_fails_frees_the_job_for_its_copy(
    recording: PushService,
) -> None:
    calling = asyncio.Event()

    class Hanging(RecordingProvider):
        deadline = 0.2

        async def send(self, job: PushRequested) -> Any:
            calling.set()
            await asyncio.Event().wait()  # never answers: the deadline ends it

    use_provider(recording, Hanging())
    job = push_job()
    handler = asyncio.create_task(send_push(job, recording.deps))
    await asyncio.wait_for(calling.wait(), timeout=5)
    handler.cancel()
    with pytest.raises(asyncio.CancelledError):
        await handler

    entry = await recording.deps.sender.ledger.get(job.notification_id)
    assert entry is not None
    assert (entry.status, entry.reason) == (DeliveryStatus.RETRYING, "recording deadline exceeded")
    use_provider(recording, RecordingProvider())
    await send_push(job, recording.deps)
    assert [report["outcome"] for report in events_published(recording)["delivered"]] == [
        "delivered"
    ]


async def test_cancelling_drops_only_its_own_lease(recording: PushService) -> None:
    """A worker whose lease ran out and was taken over must not free the new owner's lease."""
    job = push_job()
    sender = recording.deps.sender
    first = utc_now() - sender.lease_for(job) - timedelta(seconds=1)
    await sender.ledger.claim(
        job,
        provider="recording",
        now=first,
        lease=sender.lease_for(job),
        extra={"device_id": job.device_id},
    )
    second = utc_now()
    await sender.ledger.claim(
        job,
        provider="recording",
        now=second,
        lease=sender.lease_for(job),
        extra={"device_id": job.device_id},
    )

    await sender.abandon(job, claimed_at=first)

    with pytest.raises(DeferredError, match="in progress"):
        await send_push(job, recording.deps)
