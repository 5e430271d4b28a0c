"""The subscriber and the sender workflow wired as in production, with the in-memory broker and
SQLite: the ledger, the published events, and how each provider answer ends its job and the job's
delivery. (Retries and dead letters themselves are the shared middleware's, tested on the real
broker.)"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from faststream import TestApp
from faststream.rabbit import TestRabbitBroker
from sqlalchemy import Connection, event, update

from herald_shared.config import BatchSettings
from herald_shared.events import (
    DeliveriesReported,
    DeviceInvalidated,
    Event,
    PushRequested,
    utc_now,
)
from herald_shared.ledger import Claimed, DeliveryLedger, DeliveryStatus
from herald_shared.retry import ATTEMPT_HEADER, DeferredError, PermanentError, RetryableError
from herald_shared.topology import (
    DEVICE_INVALIDATED,
    EXCHANGE,
    PUSH_DELIVERED,
    PUSH_FAILED,
    PUSH_SEND,
)
from push_sender.app import PushService, build_service, specification
from push_sender.providers.base import ProviderAnswer
from push_sender.settings import Settings
from push_sender.tables import Failure, metadata, push_deliveries
from tests.fakes.fcm import FakeFcm
from tests.support.infra import wait_until
from tests.unit.push_sender.support import (
    DEVICE_TOKEN,
    RecordingProvider,
    batch_of,
    fcm_settings,
    jobs_event,
    provider_of,
    push_job,
    push_jobs,
    send,
    unit_settings,
    use_provider,
)

KEYS = {"delivered": PUSH_DELIVERED, "failed": PUSH_FAILED, "invalidated": DEVICE_INVALIDATED}


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


async def test_jobs_decided_when_quiet_are_claimed_at_once_and_take_the_waiting_along(
    sqlite_url: str, tmp_path: Path, stack: AsyncExitStack
) -> None:
    """A delivery the router marked `quiet` is claimed, and sent, without waiting the linger
    for company; the one that was waiting goes in the same claim. (Its outcome is still
    settled a linger later: settling never holds a push back.)"""
    linger = 4.0
    # `model_construct`: BATCH_LINGER allows at most a second, too short to tell apart here.
    batch = BatchSettings.model_construct(max_items=1000, concurrency=2, linger=linger)
    provider = RecordingProvider()
    settings = unit_settings(tmp_path, sqlite_url, batch=batch)
    service = await start(stack, build_service(settings, provider=provider))
    waiting, quiet = push_job(), push_job()
    quiet_event = jobs_event(quiet).model_copy(update={"quiet": True})

    deliveries = [
        asyncio.create_task(
            service.broker.publish(jobs_event(waiting), exchange=EXCHANGE, routing_key=PUSH_SEND)
        )
    ]
    await asyncio.sleep(0.05)
    assert provider.sent == []  # waiting for company
    deliveries.append(
        asyncio.create_task(
            service.broker.publish(quiet_event, exchange=EXCHANGE, routing_key=PUSH_SEND)
        )
    )

    async def both_sent() -> bool:
        return {job.notification_id for job in provider.sent} == {
            waiting.notification_id,
            quiet.notification_id,
        }

    await wait_until(both_sent, timeout=linger / 2)
    await asyncio.wait_for(asyncio.gather(*deliveries), timeout=3 * linger)


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


async def publish(service: PushService, job: Event, **options: Any) -> None:
    await service.broker.publish(job, exchange=EXCHANGE, routing_key=PUSH_SEND, **options)


def published(publisher_mock: Any) -> list[dict[str, Any]]:
    return [call.args[0] for call in publisher_mock.call_args_list]


def events_published(service: PushService) -> dict[str, list[dict[str, Any]]]:
    return {name: published(service.publishers[key].mock) for name, key in KEYS.items()}


def reports(service: PushService, outcome: str) -> list[DeliveriesReported]:
    """The report events published on `notification.push.<outcome>`, in order."""
    return [DeliveriesReported.model_validate(body) for body in events_published(service)[outcome]]


def notifications(report: DeliveriesReported) -> set[uuid.UUID]:
    return {item.notification_id for item in report.reports}


def ids(*jobs: PushRequested) -> set[uuid.UUID]:
    return {job.notification_id for job in jobs}


def counter(service: PushService, outcome: str) -> float:
    labels = {"provider": provider_of(service).name, "outcome": outcome}
    return service.registry.get_sample_value("herald_pushes_total", labels) or 0.0


@contextmanager
def ledger_statements(service: PushService) -> Iterator[list[str]]:
    """The verbs (INSERT, UPDATE, SELECT) of the statements run on the ledger table meanwhile."""
    statements: list[str] = []

    def executed(connection: Any, cursor: Any, statement: str, *context: Any) -> None:
        if push_deliveries.name in statement:
            statements.append(statement.split(None, 1)[0].upper())

    engine = service.engine.sync_engine
    event.listen(engine, "before_cursor_execute", executed)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", executed)


async def test_a_single_push_is_sent_recorded_and_reported(recording: PushService) -> None:
    """A `PushRequested` (a router of an earlier version, a dead letter replayed) is still
    accepted: handled as a delivery of one job."""
    provider = provider_of(recording)
    assert isinstance(provider, RecordingProvider)
    job = push_job()

    await publish(recording, job)

    assert [sent.notification_id for sent in provider.sent] == [job.notification_id]
    entry = await recording.sender.ledger.get(job.notification_id)
    assert entry is not None
    assert (entry.status, entry.failure, entry.attempts, entry.reported) == (
        DeliveryStatus.DELIVERED,
        None,
        1,
        True,
    )
    assert entry.extra == {"device_id": job.device_id}
    [report] = reports(recording, "delivered")
    assert (report.channel, report.outcome) == ("push", "delivered")
    assert [
        item.model_dump(
            include={
                "notification_id",
                "message_id",
                "recipient_id",
                "channel",
                "outcome",
                "reason",
            }
        )
        for item in report.reports
    ] == [
        {
            "notification_id": job.notification_id,
            "message_id": job.message_id,
            "recipient_id": job.recipient_id,
            "channel": "push",
            "outcome": "delivered",
            "reason": None,
        }
    ]
    assert events_published(recording)["failed"] == []
    assert counter(recording, "delivered") == 1
    histogram = recording.registry.get_sample_value(
        "herald_push_provider_duration_seconds_count", {"provider": "recording"}
    )
    assert histogram == 1


async def test_jobs_of_several_messages_take_one_statement_per_ledger_step_and_one_report(
    recording: PushService,
) -> None:
    provider = provider_of(recording)
    assert isinstance(provider, RecordingProvider)
    first, second = push_jobs(3), push_jobs(2)
    jobs = [*first, *second]

    with ledger_statements(recording) as statements:
        await publish(recording, jobs_event(*jobs))

    assert sorted(sent.notification_id for sent in provider.sent) == sorted(ids(*jobs))
    # Claim, record the outcome, record that it was reported: for the five jobs at once.
    assert statements == ["INSERT", "UPDATE", "UPDATE"]
    [report] = reports(recording, "delivered")
    assert report.outcome == "delivered"
    assert notifications(report) == ids(*jobs)
    assert {item.message_id for item in report.reports} == {
        first[0].message_id,
        second[0].message_id,
    }
    assert events_published(recording)["failed"] == []
    for job in jobs:
        entry = await recording.sender.ledger.get(job.notification_id)
        assert entry is not None
        assert (entry.status, entry.attempts, entry.reported) == (DeliveryStatus.DELIVERED, 1, True)
        assert entry.extra == {"device_id": job.device_id}
    assert counter(recording, "delivered") == 5


async def test_a_batch_of_one_message_is_still_accepted(recording: PushService) -> None:
    """`PushBatchRequested`, what a router of the previous version publishes."""
    provider = provider_of(recording)
    assert isinstance(provider, RecordingProvider)
    jobs = push_jobs(3)

    await publish(recording, batch_of(*jobs))

    assert sorted(sent.notification_id for sent in provider.sent) == sorted(ids(*jobs))
    [report] = reports(recording, "delivered")
    assert notifications(report) == ids(*jobs)


async def test_a_redelivered_job_does_not_call_the_provider_again(
    recording: PushService,
) -> None:
    provider = provider_of(recording)
    assert isinstance(provider, RecordingProvider)
    job = push_job()

    await publish(recording, job)
    await publish(recording, jobs_event(job))  # a redelivery, or the router publishing it again

    assert len(provider.sent) == 1
    assert len(events_published(recording)["delivered"]) == 1
    assert counter(recording, "duplicate") == 1
    entry = await recording.sender.ledger.get(job.notification_id)
    assert entry is not None
    assert entry.attempts == 1


async def test_events_that_did_not_go_out_are_published_by_the_next_copy(
    recording: PushService,
) -> None:
    provider = provider_of(recording)
    assert isinstance(provider, RecordingProvider)
    jobs = push_jobs(2)
    await publish(recording, jobs_event(*jobs))
    # As if the worker died after committing the outcomes, before publishing the report.
    async with recording.engine.begin() as connection:
        await connection.execute(
            update(push_deliveries).values(
                reported_at=None, claimed_at=utc_now() - timedelta(hours=1)
            )
        )

    await publish(recording, jobs_event(*jobs))

    assert len(provider.sent) == 2  # the provider is not asked again
    first, second = reports(recording, "delivered")
    assert first.event_id == second.event_id  # the same report: consumers dedupe
    assert notifications(second) == ids(*jobs)
    for job in jobs:
        entry = await recording.sender.ledger.get(job.notification_id)
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
    jobs = push_jobs(2)
    publishers = recording.sender.publishers
    recording.sender.publishers = {**publishers, PUSH_DELIVERED: UnreachableBroker()}  # type: ignore[dict-item]

    with pytest.raises(TimeoutError):
        await send(recording, *jobs)

    for job in jobs:
        entry = await recording.sender.ledger.get(job.notification_id)
        assert entry is not None
        assert (entry.status, entry.reported) == (DeliveryStatus.DELIVERED, False)

    recording.sender.publishers = publishers
    await send(recording, *jobs)  # the retry: at once, not `Busy` until the leases run out

    assert len(provider.sent) == 2
    [report] = reports(recording, "delivered")
    assert notifications(report) == ids(*jobs)
    for job in jobs:
        entry = await recording.sender.ledger.get(job.notification_id)
        assert entry is not None
        assert entry.reported


async def test_a_job_another_worker_is_sending_comes_back_later_without_spending_an_attempt(
    recording: PushService,
) -> None:
    provider = provider_of(recording)
    assert isinstance(provider, RecordingProvider)
    busy, free = push_jobs(2)
    lease = recording.sender.tuning.lease
    await recording.sender.ledger.claim(
        busy, provider="other", now=utc_now(), lease=lease, extra={"device_id": busy.device_id}
    )

    with pytest.raises(DeferredError, match="in progress") as raised:
        await send(recording, busy, free)

    assert [sent.notification_id for sent in provider.sent] == [free.notification_id]
    assert raised.value.retry_after is not None
    assert 0 < raised.value.retry_after <= lease.total_seconds()
    assert counter(recording, "in_progress") == 1
    [report] = reports(recording, "delivered")
    assert notifications(report) == ids(free)


async def test_a_provider_bug_on_one_job_loses_none_of_the_others_outcomes(
    recording: PushService, caplog: pytest.LogCaptureFixture
) -> None:
    jobs = push_jobs(3)
    buggy = jobs[1]

    class Broken(RecordingProvider):
        async def send(self, job: PushRequested) -> ProviderAnswer:
            if job.notification_id == buggy.notification_id:
                raise ZeroDivisionError
            return await super().send(job)

    use_provider(recording, Broken())

    with pytest.raises(RetryableError, match=r"recording error \(ZeroDivisionError\)"):
        await send(recording, *jobs)

    [report] = reports(recording, "delivered")
    assert notifications(report) == ids(jobs[0], jobs[2])
    entry = await recording.sender.ledger.get(buggy.notification_id)
    assert entry is not None
    assert (entry.status, entry.reason) == (
        DeliveryStatus.RETRYING,
        "recording error (ZeroDivisionError)",
    )
    [logged] = [r for r in caplog.records if "push.provider_error" in r.getMessage()]
    assert logged.levelno == logging.ERROR
    assert str(buggy.notification_id) in logged.getMessage()
    assert "ZeroDivisionError" in logged.getMessage()

    healthy = RecordingProvider()
    use_provider(recording, healthy)
    await send(recording, *jobs)  # the retry sends the one job that is not final

    assert [sent.notification_id for sent in healthy.sent] == [buggy.notification_id]
    assert notifications(reports(recording, "delivered")[-1]) == ids(buggy)


async def test_a_delivery_with_mixed_outcomes_reports_each_and_retries_only_what_needs_it(
    with_fcm: PushService, fcm: FakeFcm
) -> None:
    message = uuid.uuid4()
    accepted = push_job(message_id=message, token=f"{DEVICE_TOKEN}-accepted")
    dead = push_job(message_id=message, token=f"{DEVICE_TOKEN}-dead")
    flaky = push_job(message_id=message, token=f"{DEVICE_TOKEN}-flaky")
    fcm.fail(dead.token, 404, "UNREGISTERED")
    fcm.fail(flaky.token, 503, "UNAVAILABLE", times=1)
    batch = (accepted, dead, flaky)

    with pytest.raises(RetryableError, match="fcm 503 UNAVAILABLE"):
        await send(with_fcm, *batch)

    [delivered] = reports(with_fcm, "delivered")
    assert notifications(delivered) == ids(accepted)
    [failed] = reports(with_fcm, "failed")
    assert notifications(failed) == ids(dead)
    assert [item.reason for item in failed.reports] == ["fcm 404 UNREGISTERED"]
    [invalidation] = events_published(with_fcm)["invalidated"]
    assert DeviceInvalidated.model_validate(invalidation).device_id == dead.device_id
    entry = await with_fcm.sender.ledger.get(flaky.notification_id)
    assert entry is not None
    assert (entry.status, entry.attempts) == (DeliveryStatus.RETRYING, 1)

    await send(with_fcm, *batch)  # the whole delivery comes back

    assert fcm.send_requests == 4  # three, then the flaky one again
    assert [len(fcm.messages_to(job.token)) for job in batch] == [1, 0, 1]
    assert [notifications(report) for report in reports(with_fcm, "delivered")] == [
        ids(accepted),
        ids(flaky),
    ]
    assert len(events_published(with_fcm)["failed"]) == 1
    assert len(events_published(with_fcm)["invalidated"]) == 1


async def test_a_dead_token_invalidates_the_device_and_is_acknowledged(
    with_fcm: PushService, fcm: FakeFcm
) -> None:
    fcm.fail(DEVICE_TOKEN, 404, "UNREGISTERED")
    job = push_job()

    await send(with_fcm, job)  # no exception: acknowledged, never retried

    events = events_published(with_fcm)
    [invalidation] = events["invalidated"]
    assert DeviceInvalidated.model_validate(invalidation).model_dump(
        include={"user_id", "device_id", "reason"}
    ) == {"user_id": job.recipient_id, "device_id": job.device_id, "reason": "fcm 404 UNREGISTERED"}
    [report] = reports(with_fcm, "failed")
    assert [(item.outcome, item.reason) for item in report.reports] == [
        ("failed", "fcm 404 UNREGISTERED")
    ]
    assert events["delivered"] == []
    entry = await with_fcm.sender.ledger.get(job.notification_id)
    assert entry is not None
    assert (entry.status, entry.failure, entry.reported) == (
        DeliveryStatus.FAILED,
        Failure.TOKEN_INVALID,
        True,
    )
    assert counter(with_fcm, "token_invalid") == 1

    await send(with_fcm, job)  # a copy: nothing more
    assert fcm.send_requests == 1
    assert len(events_published(with_fcm)["invalidated"]) == 1


async def test_an_invalid_token_argument_invalidates_the_device(
    with_fcm: PushService, fcm: FakeFcm
) -> None:
    fcm.fail(DEVICE_TOKEN, 400, "INVALID_ARGUMENT", field="message.token")

    await send(with_fcm, push_job())

    assert len(events_published(with_fcm)["invalidated"]) == 1
    assert len(events_published(with_fcm)["failed"]) == 1


async def test_a_refused_push_is_reported_then_dead_lettered(
    with_fcm: PushService, fcm: FakeFcm
) -> None:
    fcm.fail(DEVICE_TOKEN, 400, "INVALID_ARGUMENT")
    job = push_job()

    with pytest.raises(PermanentError, match="fcm 400 INVALID_ARGUMENT"):
        await send(with_fcm, job)

    [report] = reports(with_fcm, "failed")
    assert [(item.outcome, item.reason) for item in report.reports] == [
        ("failed", "fcm 400 INVALID_ARGUMENT")
    ]
    assert events_published(with_fcm)["invalidated"] == []
    entry = await with_fcm.sender.ledger.get(job.notification_id)
    assert entry is not None
    assert (entry.status, entry.failure) == (DeliveryStatus.FAILED, Failure.REJECTED)
    assert counter(with_fcm, "rejected") == 1

    # Replayed from the dead-letter queue later: acknowledged, the provider is not asked again.
    await send(with_fcm, job)
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
    status: int,
    error_code: str,
    options: dict[str, Any],
    reason: str,
    retry_after: float | None,
) -> None:
    if status == 0:
        await send(with_fcm, push_job())  # the access token, fetched in time
        fcm.stall(DEVICE_TOKEN, 3.0, times=1)
    else:
        fcm.fail(DEVICE_TOKEN, status, error_code, times=1, **options)
    job = push_job()

    with pytest.raises(RetryableError) as raised:
        await send(with_fcm, job)

    assert (raised.value.reason, raised.value.retry_after) == (reason, retry_after)
    assert events_published(with_fcm)["failed"] == []
    entry = await with_fcm.sender.ledger.get(job.notification_id)
    assert entry is not None
    assert (entry.status, entry.attempts) == (DeliveryStatus.RETRYING, 1)
    assert counter(with_fcm, "retry") == 1
    # (A 403, our configuration, is deferred instead: test_provider_resilience.py.)

    await send(with_fcm, job)  # the retry
    entry = await with_fcm.sender.ledger.get(job.notification_id)
    assert entry is not None
    assert (entry.status, entry.attempts) == (DeliveryStatus.DELIVERED, 2)
    assert len(fcm.messages_to(DEVICE_TOKEN)) == (2 if status == 0 else 1)


class Failing(RecordingProvider):
    """Answers every push with a 503."""

    async def send(self, job: PushRequested) -> ProviderAnswer:
        self.sent.append(job)
        return ProviderAnswer.transient("recording 503")


@pytest.mark.parametrize("kind", ["jobs", "batch"])
async def test_a_delivery_out_of_retries_is_reported_failed_in_one_event(
    recording: PushService, kind: str
) -> None:
    """The dead-letter hook, as the retry middleware calls it after the last retry: every job
    of the delivery, delivered or not (the router keeps a delivery), in one report that carries
    the same id each time."""
    use_provider(recording, Failing())
    jobs = [*push_jobs(2), *push_jobs(1)] if kind == "jobs" else push_jobs(3)
    delivery = jobs_event(*jobs) if kind == "jobs" else batch_of(*jobs)
    last_attempt = {ATTEMPT_HEADER: recording.settings.rabbitmq.max_retries}

    for _ in range(2):
        await publish(recording, delivery, headers=last_attempt)

    first, again = reports(recording, "failed")
    assert first.outcome == "failed"
    assert notifications(first) == ids(*jobs)
    assert {item.reason for item in first.reports} == {"retries exhausted"}
    assert again.event_id == first.event_id
    assert events_published(recording)["delivered"] == []


async def test_a_single_job_out_of_retries_is_reported_failed(recording: PushService) -> None:
    use_provider(recording, Failing())
    job = push_job()

    await publish(recording, job, headers={ATTEMPT_HEADER: recording.settings.rabbitmq.max_retries})

    [report] = reports(recording, "failed")
    assert notifications(report) == ids(job)
    assert [item.reason for item in report.reports] == ["retries exhausted"]


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
    await publish(with_fcm, jobs_event(*push_jobs(2)))

    # aiosqlite logs statements with their parameters at DEBUG (the ledger holds ids only).
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert str(job.notification_id) in text
    assert "push.token_invalid notification_id=" in text
    assert "push.retry notification_id=" in text
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

    def resolved(node: dict[str, Any]) -> dict[str, Any]:
        """`node`, its `$ref`s followed."""
        while "$ref" in node:
            pointer = str(node["$ref"]).removeprefix("#/")
            node = document
            for part in pointer.split("/"):
                node = node[part]
        return node

    def payload(operation: dict[str, Any]) -> str:
        [message] = operation["messages"]
        return str(resolved(message)["payload"]["$ref"]).rsplit("/", 1)[-1]

    operations = document["operations"].values()
    sends = {
        key: payload(operation)
        for operation in operations
        if operation["action"] == "send"
        for key in operation["bindings"]["amqp"]["cc"]
    }
    assert sends == {
        "notification.push.delivered": "DeliveriesReported",
        "notification.push.failed": "DeliveriesReported",
        "device.invalidated": "DeviceInvalidated",
    }
    receives = [operation for operation in operations if operation["action"] == "receive"]
    queues = {
        document["channels"][operation["channel"]["$ref"].rsplit("/", 1)[1]]["bindings"]["amqp"][
            "queue"
        ]["name"]
        for operation in receives
    }
    assert queues == {"push_notifications", "push_notifications_urgent"}  # the two lanes
    for receive in receives:
        accepted = document["components"]["schemas"][payload(receive)]["oneOf"]
        assert {schema["$ref"].rsplit("/", 1)[-1] for schema in accepted} == {
            "PushRequested",
            "PushBatchRequested",
            "PushJobsRequested",
        }


async def test_a_handler_cancelled_mid_send_lets_the_sends_finish_and_their_outcomes_go_out(
    recording: PushService,
) -> None:
    """As when the broker connection is lost while the pushes are with the provider: the
    provider's answers are still recorded and reported, and the copy that RabbitMQ redelivers
    finds them done instead of sending the pushes a second time."""
    calling, answer = asyncio.Event(), asyncio.Event()

    class Slow(RecordingProvider):
        async def send(self, job: PushRequested) -> ProviderAnswer:
            self.sent.append(job)
            if len(self.sent) == 2:
                calling.set()
            await answer.wait()
            return ProviderAnswer.accepted()

    provider = Slow()
    use_provider(recording, provider)
    jobs = push_jobs(2)

    async def settled() -> bool:  # counted once recorded and reported (no ledger read)
        return counter(recording, "delivered") == 2

    with ledger_statements(recording) as statements:
        handler = asyncio.create_task(send(recording, *jobs))
        await asyncio.wait_for(calling.wait(), timeout=5)
        handler.cancel()
        with pytest.raises(asyncio.CancelledError):
            await handler
        answer.set()
        await wait_until(settled)

    # Claimed, recorded, reported: one statement each, as if nothing had happened.
    assert statements == ["INSERT", "UPDATE", "UPDATE"]
    [report] = reports(recording, "delivered")
    assert notifications(report) == ids(*jobs)
    for job in jobs:
        entry = await recording.sender.ledger.get(job.notification_id)
        assert entry is not None
        assert (entry.status, entry.reported) == (DeliveryStatus.DELIVERED, True)

    await send(recording, *jobs)  # the redelivered copy
    assert len(provider.sent) == 2
    assert len(reports(recording, "delivered")) == 1


async def test_a_handler_cancelled_while_the_provider_fails_frees_the_job_for_its_copy(
    recording: PushService,
) -> None:
    calling = asyncio.Event()

    class Hanging(RecordingProvider):
        deadline = 0.2

        async def send(self, job: PushRequested) -> ProviderAnswer:
            calling.set()
            await asyncio.Event().wait()  # never answers: the deadline ends it
            raise AssertionError("unreachable")

    use_provider(recording, Hanging())
    job = push_job()
    handler = asyncio.create_task(send(recording, job))
    await asyncio.wait_for(calling.wait(), timeout=5)
    handler.cancel()
    with pytest.raises(asyncio.CancelledError):
        await handler

    async def released() -> bool:
        entry = await recording.sender.ledger.get(job.notification_id)
        return entry is not None and entry.status is DeliveryStatus.RETRYING

    await wait_until(released)
    entry = await recording.sender.ledger.get(job.notification_id)
    assert entry is not None
    assert entry.reason == "recording deadline exceeded"
    use_provider(recording, RecordingProvider())
    await send(recording, job)
    [report] = reports(recording, "delivered")
    assert notifications(report) == ids(job)


async def test_closing_drops_only_the_leases_it_still_holds(recording: PushService) -> None:
    """A worker whose lease ran out and was taken over must not free the new owner's lease when
    it shuts down."""
    calling, answer = asyncio.Event(), asyncio.Event()

    class Stuck(RecordingProvider):
        async def send(self, job: PushRequested) -> ProviderAnswer:
            calling.set()
            await answer.wait()
            return ProviderAnswer.accepted()

    use_provider(recording, Stuck())
    job = push_job()
    sender = recording.sender
    handler = asyncio.create_task(send(recording, job))
    await asyncio.wait_for(calling.wait(), timeout=5)
    # The lease runs out (as if this worker had hung), and another worker takes the job over.
    async with recording.engine.begin() as connection:
        await connection.execute(
            update(push_deliveries).values(claimed_at=utc_now() - timedelta(hours=1))
        )
    other_worker = DeliveryLedger(sender.ledger.engine, sender.ledger.table)
    taken_over = await other_worker.claim(
        job,
        provider="recording",
        now=utc_now(),
        lease=sender.tuning.lease,
        extra={"device_id": job.device_id},
    )
    assert isinstance(taken_over, Claimed)

    await sender.aclose(timeout=0.05)  # shutting down: the send still hangs

    entry = await sender.ledger.get(job.notification_id)
    assert entry is not None
    assert (entry.status, entry.attempts) == (DeliveryStatus.SENDING, 2)
    with pytest.raises(DeferredError, match="in progress"):  # the new owner's lease holds
        await send(recording, job)
    answer.set()
    # The call ends after all: its outcome is not recorded over the new owner's row (the new
    # owner records and reports its own); the delivery comes back later and finds it final.
    with pytest.raises(DeferredError, match="taken over"):
        await handler
    entry = await sender.ledger.get(job.notification_id)
    assert entry is not None
    assert (entry.status, entry.attempts) == (DeliveryStatus.SENDING, 2)
    assert reports(recording, "delivered") == []
