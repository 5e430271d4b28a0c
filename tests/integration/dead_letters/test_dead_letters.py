"""`herald-dead-letters` on a real RabbitMQ: both kinds of dead letter, every command."""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from faststream.exceptions import RejectMessage

from herald_dead_letters import cli as tool
from herald_shared import retry
from herald_shared.broker import RabbitSettings, make_broker
from herald_shared.events import DeviceInvalidated
from herald_shared.topology import (
    CONSUMER_QUEUES,
    DEAD_LETTER_EXCHANGE,
    DEVICE_INVALIDATED,
    DEVICE_INVALIDATIONS,
    DEVICE_RETRY,
    EXCHANGE,
    PUSH_NOTIFICATIONS,
    ConsumerQueue,
    declare_topology,
)
from scripts.gen_definitions import dead_letter_policy
from tests.support import infra
from tests.support.infra import wait_until

DELAYS = (0.2,)
QUEUE = DEVICE_INVALIDATIONS
DLQ = QUEUE.dead_letter_queue.name
SECRET = "alice@example.com"  # stands for the personal data a body holds


def _event_body(**extra: Any) -> bytes:
    event = DeviceInvalidated(user_id=uuid.uuid4(), device_id=uuid.uuid4(), reason="test")
    return json.dumps({**json.loads(event.model_dump_json()), **extra}).encode()


async def _dead_letter_from_middleware(
    channel: AbstractChannel,
    origin: ConsumerQueue,
    message_id: str,
    body: bytes,
    reason: str,
    *,
    attempts: int = 1,
    extra_headers: dict[str, Any] | None = None,
) -> None:
    """Publish a dead letter the way `OutcomeMiddleware` does (FastStream stamps its publishes)."""
    history = [f"{attempt}: RetryableError: provider timed out" for attempt in range(1, attempts)]
    error = "PermanentError: token format unknown" if reason == "permanent" else "x" * 300
    history.append(f"{attempts}: {error}")
    headers: dict[str, Any] = {
        retry.REASON_HEADER: reason,
        retry.ERROR_HEADER: error,
        retry.HISTORY_HEADER: history,
        retry.ATTEMPT_HEADER: attempts,
        retry.ORIGIN_HEADER: origin.name,
        **(extra_headers or {}),
    }
    exchange = await channel.get_exchange(DEAD_LETTER_EXCHANGE.name)
    await exchange.publish(
        aio_pika.Message(
            body,
            headers=headers,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message_id,
            correlation_id=f"corr-{message_id}",
            timestamp=datetime.now(UTC),
        ),
        routing_key=origin.name,
        mandatory=True,
    )


async def _count(channel: AbstractChannel, queue_name: str) -> int:
    queue = await channel.declare_queue(queue_name, passive=True)
    count = queue.declaration_result.message_count
    assert count is not None
    return count


@pytest.fixture
async def settings(rabbit_url: str) -> RabbitSettings:
    """The topology, then in device_invalidations.dlq, in this order: perm-1 (permanent, replayed
    once before), exh-1 (retries-exhausted), unp-1 (unparsable, not JSON), rej-1 (rejected by a
    real consumer: `x-death`, no x-herald headers), perm-2 (permanent, type user_updated, a body
    with personal data); and push-1 in push_notifications.dlq."""
    settings = RabbitSettings(url=rabbit_url, retry_delays=DELAYS)
    broker = make_broker(settings, service_name="dead-letters-test")

    @broker.subscriber(QUEUE.queue, EXCHANGE)
    async def reject_everything(body: Any) -> None:
        raise RejectMessage()

    connection = await aio_pika.connect(rabbit_url)
    async with connection:
        channel = await connection.channel()
        async with broker:
            await declare_topology(broker, retry_delays=DELAYS)
            await _dead_letter_from_middleware(
                channel,
                QUEUE,
                "perm-1",
                _event_body(),
                "permanent",
                extra_headers={tool.REPLAYED_HEADER: 1},
            )
            await _dead_letter_from_middleware(
                channel, QUEUE, "exh-1", _event_body(), "retries-exhausted", attempts=4
            )
            await _dead_letter_from_middleware(
                channel, QUEUE, "unp-1", b"\xff\xfe not json " + SECRET.encode(), "unparsable"
            )
            await broker.start()
            await broker.publish(
                _event_body(),
                exchange=EXCHANGE,
                routing_key=DEVICE_INVALIDATED,
                message_id="rej-1",
                correlation_id="corr-rej-1",
                content_type="application/json",
                persist=True,
            )
            await wait_until(lambda: _equals(_count(channel, DLQ), 4))
        await _dead_letter_from_middleware(
            channel,
            QUEUE,
            "perm-2",
            json.dumps({"type": "user_updated", "email": SECRET, "content": "hi"}).encode(),
            "permanent",
        )
        await _dead_letter_from_middleware(
            channel, PUSH_NOTIFICATIONS, "push-1", _event_body(), "permanent"
        )
        await wait_until(lambda: _equals(_count(channel, DLQ), 5))
        await wait_until(
            lambda: _equals(_count(channel, PUSH_NOTIFICATIONS.dead_letter_queue.name), 1)
        )
    return settings


async def _equals(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


async def _ids(settings: RabbitSettings, queue: ConsumerQueue = QUEUE) -> list[str | None]:
    connection = await tool.connect(settings)
    async with connection:
        return [letter.message_id for letter in await tool.read_dead_letters(connection, queue)]


async def _run(settings: RabbitSettings, *argv: str) -> tuple[int, str]:
    """The command line in-process (main() would start its own event loop)."""
    out = io.StringIO()
    code = await tool.run(tool.build_parser().parse_args(argv), settings, out)
    return code, out.getvalue()


@asynccontextmanager
async def _consuming(url: str, queue_name: str) -> AsyncIterator[list[AbstractIncomingMessage]]:
    """A consumer on `queue_name` that records and acks what it receives."""
    received: list[AbstractIncomingMessage] = []

    async def on_message(message: AbstractIncomingMessage) -> None:
        received.append(message)
        await message.ack()

    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(queue_name)
        await queue.consume(on_message)
        yield received


async def _others_untouched(url: str) -> None:
    """No other consumer queue got anything (a confirmed publish is already enqueued)."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        for consumer_queue in CONSUMER_QUEUES:
            if consumer_queue != QUEUE:
                assert await _count(channel, consumer_queue.name) == 0, consumer_queue.name
        assert await _count(channel, PUSH_NOTIFICATIONS.dead_letter_queue.name) == 1


async def _received(received: list[AbstractIncomingMessage], count: int) -> bool:
    return len(received) >= count


# --- list and show ------------------------------------------------------------------------


async def test_list_reads_both_kinds_in_order_and_leaves_the_queue_as_it_was(
    settings: RabbitSettings,
) -> None:
    connection = await tool.connect(settings)
    async with connection:
        letters = await tool.read_dead_letters(connection, QUEUE)
        again = await tool.read_dead_letters(connection, QUEUE)

    assert [letter.message_id for letter in letters] == [
        "perm-1",
        "exh-1",
        "unp-1",
        "rej-1",
        "perm-2",
    ]
    assert [letter.message_id for letter in again] == [letter.message_id for letter in letters]
    assert [letter.position for letter in letters] == [1, 2, 3, 4, 5]
    perm, exhausted, unparsable, rejected, other_type = letters
    assert (perm.reason, perm.attempts, perm.replayed) == ("permanent", 1, 1)
    assert (exhausted.reason, exhausted.attempts, len(exhausted.history)) == (
        "retries-exhausted",
        4,
        4,
    )
    assert (unparsable.reason, unparsable.event_type) == ("unparsable", None)
    assert rejected.reason == "rejected"
    assert rejected.attempts is None
    assert rejected.error is None
    assert rejected.deaths[0].queue == QUEUE.name
    assert rejected.deaths[0].routing_keys == (DEVICE_INVALIDATED,)
    assert other_type.event_type == "user_updated"
    for letter in letters:
        assert letter.origin_queue == QUEUE.name
        assert letter.dead_lettered_at is not None
    assert {letter.event_type for letter in (perm, exhausted, rejected)} == {"device_invalidated"}


async def test_list_command_prints_summaries_without_body_fields(
    settings: RabbitSettings,
) -> None:
    code, output = await _run(settings, "list")

    assert code == 0
    assert f"{DLQ}: 5 messages" in output
    assert f"{PUSH_NOTIFICATIONS.dead_letter_queue.name}: 1 message\n" in output
    assert "message_notifications.dlq: 0 messages" in output
    lines = output.splitlines()
    first = next(line for line in lines if "id=perm-1" in line)
    assert "type=device_invalidated" in first
    assert "reason=permanent" in first
    assert "attempts=1" in first
    assert f"origin={QUEUE.name}" in first
    assert "error=PermanentError: token format unknown" in first
    exhausted = next(line for line in lines if "id=exh-1" in line)
    assert "x" * 79 + "…" in exhausted
    assert "x" * 81 not in exhausted  # the last error is truncated
    rejected = next(line for line in lines if "id=rej-1" in line)
    assert "reason=rejected" in rejected
    assert "dead-lettered=20" in rejected
    assert SECRET not in output
    assert '"content"' not in output

    code, output = await _run(settings, "list", "--queue", PUSH_NOTIFICATIONS.name)
    assert code == 0
    assert output.splitlines()[0] == f"{PUSH_NOTIFICATIONS.dead_letter_queue.name}: 1 message"
    assert DLQ not in output


async def test_show_hides_the_payload_unless_asked(settings: RabbitSettings) -> None:
    code, output = await _run(settings, "show", "--queue", QUEUE.name, "--message-id", "perm-2")
    assert code == 0
    assert "message_id:     perm-2" in output
    assert "reason:         permanent" in output
    assert "1: PermanentError: token format unknown" in output
    assert "hidden" in output
    assert SECRET not in output

    code, output = await _run(
        settings, "show", "--queue", DLQ, "--message-id", "perm-2", "--payload"
    )
    assert code == 0
    assert f'"email": "{SECRET}"' in output  # pretty-printed JSON
    assert '    "type": "user_updated",' in output

    code, output = await _run(settings, "show", "--queue", QUEUE.name, "--position", "3")
    assert code == 0
    assert "message_id:     unp-1" in output
    assert SECRET not in output
    code, output = await _run(
        settings, "show", "--queue", QUEUE.name, "--position", "3", "--payload"
    )
    assert repr(b"\xff\xfe not json ")[:-1] in output  # repr of the first bytes

    code, output = await _run(settings, "show", "--queue", QUEUE.name, "--position", "4")
    assert code == 0
    assert "message_id:     rej-1" in output
    assert f"rejected from {QUEUE.name} x1" in output
    assert "x-death:" in output

    code, output = await _run(settings, "show", "--queue", QUEUE.name, "--message-id", "nope")
    assert code == 1
    code, output = await _run(settings, "show", "--queue", QUEUE.name, "--position", "6")
    assert code == 1
    assert await _ids(settings) == ["perm-1", "exh-1", "unp-1", "rej-1", "perm-2"]


# --- replay -------------------------------------------------------------------------------


async def test_replay_one_goes_to_its_origin_queue_only_with_reset_headers(
    settings: RabbitSettings,
) -> None:
    async with _consuming(settings.url, QUEUE.name) as received:
        code, output = await _run(
            settings, "replay", "--queue", QUEUE.name, "--message-id", "perm-1"
        )
        await wait_until(lambda: _received(received, 1))

    assert code == 0
    assert f"{DLQ}: replayed 1 of 1 to {QUEUE.name}" in output
    (message,) = received
    assert message.message_id == "perm-1"
    assert message.correlation_id == "corr-perm-1"
    assert message.content_type == "application/json"
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.exchange == EXCHANGE.name
    assert message.routing_key == DEVICE_RETRY
    assert json.loads(message.body)["type"] == "device_invalidated"
    headers = message.headers
    assert headers[tool.REPLAYED_HEADER] == 2
    for reset in (
        retry.ATTEMPT_HEADER,
        retry.ERROR_HEADER,
        retry.HISTORY_HEADER,
        retry.REASON_HEADER,
        retry.ORIGIN_HEADER,
        "x-death",
    ):
        assert reset not in headers
    await _others_untouched(settings.url)
    assert await _ids(settings) == ["exh-1", "unp-1", "rej-1", "perm-2"]


async def test_replay_of_a_broker_dead_letter_drops_its_x_death(settings: RabbitSettings) -> None:
    async with _consuming(settings.url, QUEUE.name) as received:
        code, _ = await _run(settings, "replay", "--queue", QUEUE.name, "--message-id", "rej-1")
        await wait_until(lambda: _received(received, 1))

    assert code == 0
    (message,) = received
    assert message.message_id == "rej-1"
    assert message.correlation_id == "corr-rej-1"
    assert message.headers[tool.REPLAYED_HEADER] == 1
    assert not [name for name in message.headers if name.startswith("x-first-death")]
    assert "x-death" not in message.headers
    assert await _ids(settings) == ["perm-1", "exh-1", "unp-1", "perm-2"]


async def test_replay_by_reason_keeps_the_others_in_order(settings: RabbitSettings) -> None:
    async with _consuming(settings.url, QUEUE.name) as received:
        code, _ = await _run(settings, "replay", "--queue", QUEUE.name, "--reason", "permanent")
        await wait_until(lambda: _received(received, 2))

    assert code == 0
    assert [message.message_id for message in received] == ["perm-1", "perm-2"]
    await _others_untouched(settings.url)
    assert await _ids(settings) == ["exh-1", "unp-1", "rej-1"]


async def test_replay_by_type(settings: RabbitSettings) -> None:
    async with _consuming(settings.url, QUEUE.name) as received:
        code, _ = await _run(settings, "replay", "--queue", QUEUE.name, "--type", "user_updated")
        await wait_until(lambda: _received(received, 1))

    assert code == 0
    assert [message.message_id for message in received] == ["perm-2"]
    assert await _ids(settings) == ["perm-1", "exh-1", "unp-1", "rej-1"]


async def test_replay_all_empties_only_that_queue(settings: RabbitSettings) -> None:
    async with _consuming(settings.url, QUEUE.name) as received:
        code, output = await _run(settings, "replay", "--queue", QUEUE.name, "--all")
        await wait_until(lambda: _received(received, 5))

    assert code == 0
    assert f"replayed 5 of 5 to {QUEUE.name}" in output
    assert [message.message_id for message in received] == [
        "perm-1",
        "exh-1",
        "unp-1",
        "rej-1",
        "perm-2",
    ]
    assert [message.body[:2] for message in received][2] == b"\xff\xfe"  # same body
    await _others_untouched(settings.url)
    assert await _ids(settings) == []
    assert await _ids(settings, PUSH_NOTIFICATIONS) == ["push-1"]


async def test_dry_run_and_nothing_matched_change_nothing(settings: RabbitSettings) -> None:
    code, output = await _run(
        settings, "replay", "--queue", QUEUE.name, "--reason", "permanent", "--dry-run"
    )
    assert code == 0
    assert f"{DLQ}: would replay 2:" in output
    assert "id=perm-1" in output
    assert "id=perm-2" in output

    code, output = await _run(
        settings, "replay", "--queue", QUEUE.name, "--reason", "delivery_limit"
    )
    assert code == 1
    assert "nothing matched" in output
    code, output = await _run(settings, "replay", "--queue", QUEUE.name, "--type", "nope")
    assert code == 1
    code, output = await _run(settings, "purge", "--queue", QUEUE.name, "--all", "--dry-run")
    assert code == 0
    assert "would purge 5" in output

    connection = await aio_pika.connect(settings.url)
    async with connection:
        channel = await connection.channel()
        assert await _count(channel, QUEUE.name) == 0  # nothing was published
    assert await _ids(settings) == ["perm-1", "exh-1", "unp-1", "rej-1", "perm-2"]


async def test_a_replay_that_is_not_confirmed_leaves_the_dead_letter_in_place(
    settings: RabbitSettings,
) -> None:
    connection = await aio_pika.connect(settings.url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(QUEUE.name)
        await queue.unbind(EXCHANGE.name, routing_key=QUEUE.retry_routing_key)
        code, output = await _run(
            settings, "replay", "--queue", QUEUE.name, "--message-id", "exh-1", "perm-2"
        )

    assert code == 2
    assert "replayed 0 of 2" in output
    assert await _ids(settings) == ["perm-1", "exh-1", "unp-1", "rej-1", "perm-2"]


async def test_dead_letters_arriving_while_the_queue_is_held_stay_behind_it(
    settings: RabbitSettings,
) -> None:
    connection = await tool.connect(settings)
    async with connection:
        channel = await connection.channel()
        async with tool.holding(connection, QUEUE) as held:
            assert [item.letter.message_id for item in held][:2] == ["perm-1", "exh-1"]
            await _dead_letter_from_middleware(channel, QUEUE, "late-1", _event_body(), "permanent")
            await held[1].ack()

    assert await _ids(settings) == ["perm-1", "unp-1", "rej-1", "perm-2", "late-1"]


async def test_many_dead_letters_are_settled_exactly(settings: RabbitSettings) -> None:
    """Above ~32 settlements on one channel RabbitMQ 3.10 reorders them and drops acks on close
    (rabbitmq-server#10327): the tool must neither resurrect nor reorder."""
    connection = await aio_pika.connect(settings.url)
    async with connection:
        channel = await connection.channel()
        for number in range(150):
            reason = "permanent" if number % 3 == 0 else "retries-exhausted"
            await _dead_letter_from_middleware(
                channel, QUEUE, f"bulk-{number:03d}", _event_body(), reason
            )
    before = await _ids(settings)
    assert len(before) == 155
    assert before == await _ids(settings)  # reading keeps the order

    async with _consuming(settings.url, QUEUE.name) as received:
        code, _ = await _run(settings, "replay", "--queue", QUEUE.name, "--reason", "permanent")
        await wait_until(lambda: _received(received, 52))
    assert code == 0
    replayed = [message.message_id for message in received]
    assert replayed == [
        id_
        for id_ in before
        if id_ in {"perm-1", "perm-2"}
        or (id_ is not None and id_.startswith("bulk-") and int(id_[5:]) % 3 == 0)
    ]
    remaining = [id_ for id_ in before if id_ not in set(replayed)]
    assert await _ids(settings) == remaining

    doomed = [id_ for id_ in remaining if id_ and id_.startswith("bulk-")][::2]
    code, _ = await _run(settings, "purge", "--queue", QUEUE.name, "--message-id", *doomed, "--yes")
    assert code == 0
    left = [id_ for id_ in remaining if id_ not in set(doomed)]
    assert await _ids(settings) == left

    code, output = await _run(settings, "purge", "--queue", QUEUE.name, "--all", "--yes")
    assert code == 0
    assert f"purged {len(left)} of {len(left)}" in output
    assert await _ids(settings) == []


# --- delivery limits -----------------------------------------------------------------------

# More readings than RabbitMQ 4.x's default quorum-queue delivery limit (20).
READINGS = 25


def _vhost(settings: RabbitSettings) -> str:
    return unquote(settings.url.rsplit("/", 1)[1])


async def _delivery_counts(settings: RabbitSettings) -> dict[str | None, int]:
    """Each dead letter's `x-delivery-count` (deliveries so far), read the way the tool reads
    (taken, then returned with nack): this reading counts too."""
    counts: dict[str | None, int] = {}
    connection = await aio_pika.connect(settings.url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(DLQ, ensure=False)
        taken = []
        while (message := await queue.get(no_ack=False, fail=False, timeout=5)) is not None:
            taken.append(message)
            count = message.headers.get("x-delivery-count", 0)
            assert isinstance(count, int)
            counts[message.message_id] = count
        for message in taken:
            await message.nack(requeue=True)
    return counts


async def _policy_applies(settings: RabbitSettings, name: str) -> bool:
    return infra.queue_policy(settings.url, DLQ) == name


async def test_under_the_deployed_policy_reading_many_times_drops_nothing(
    settings: RabbitSettings,
) -> None:
    """`list` takes every dead letter and returns it: a delivery each time. The definitions'
    policy (accepted by this 3.10 broker) keeps a dead-letter queue from ever reaching a
    delivery limit, which RabbitMQ 4.x would otherwise set to 20 and then drop the letters."""
    policy = dead_letter_policy(_vhost(settings))
    infra.set_policy(settings.url, policy)
    await wait_until(lambda: _policy_applies(settings, policy["name"]))
    before = await _ids(settings)
    assert len(before) == 5
    for _ in range(READINGS):
        code, output = await _run(settings, "list", "--queue", QUEUE.name)
        assert code == 0
        assert f"{DLQ}: 5 messages" in output
    assert await _ids(settings) == before
    counts = await _delivery_counts(settings)
    # Every reading counted (the trap is real): the first _ids, READINGS lists, the second.
    assert set(counts) == set(before)
    assert min(counts.values()) >= READINGS + 2


async def test_a_delivery_limit_on_a_dead_letter_queue_drops_what_is_read(
    settings: RabbitSettings,
) -> None:
    """What the policy prevents, on this broker: under a limit of 2, the third reading drops
    every dead letter (a dead-letter queue dead-letters nowhere). A policy of higher priority
    replaces the deployed one entirely (one policy per queue)."""
    infra.set_policy(settings.url, dead_letter_policy(_vhost(settings)))
    limited = {
        **dead_letter_policy(_vhost(settings)),
        "name": "limited",
        "priority": 1,
        "definition": {"delivery-limit": 2},
    }
    infra.set_policy(settings.url, limited)
    await wait_until(lambda: _policy_applies(settings, "limited"))
    first = await _ids(settings)
    assert len(first) == 5
    assert await _ids(settings) == first
    assert await _ids(settings) == first  # returned a third time: past the limit
    assert await _ids(settings) == []


# --- purge --------------------------------------------------------------------------------


async def test_purge_by_id_and_all(settings: RabbitSettings) -> None:
    code, output = await _run(
        settings, "purge", "--queue", QUEUE.name, "--message-id", "exh-1", "rej-1", "gone", "--yes"
    )
    assert code == 0
    assert "purged 2 of 2" in output
    assert "no dead letter with message id gone" in output
    assert await _ids(settings) == ["perm-1", "unp-1", "perm-2"]

    code, _ = await _run(settings, "purge", "--queue", QUEUE.name, "--message-id", "gone", "--yes")
    assert code == 1

    code, output = await _run(settings, "purge", "--queue", QUEUE.name, "--all", "--yes")
    assert code == 0
    assert "purged 3 of 3" in output
    assert await _ids(settings) == []
    assert await _ids(settings, PUSH_NOTIFICATIONS) == ["push-1"]
    code, _ = await _run(settings, "purge", "--queue", QUEUE.name, "--all", "--yes")
    assert code == 1


# --- command line: exit codes and the console script --------------------------------------


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["purge", "--queue", QUEUE.name, "--all"],  # no --yes
        ["replay", "--queue", QUEUE.name],  # no selection
        ["replay", "--queue", QUEUE.name, "--all", "--reason", "permanent"],
        ["show", "--queue", QUEUE.name, "--position", "0"],
        [],
    ):
        with pytest.raises(SystemExit) as exit_info:
            tool.main(argv)
        assert exit_info.value.code == 2, argv


def test_unknown_queue_exits_2(rabbit_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RABBITMQ_URL", rabbit_url)
    assert tool.main(["show", "--queue", "nope", "--position", "1"]) == 2


def test_connection_errors_exit_2_without_the_password(
    rabbit_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    vhost = rabbit_url.rsplit("/", 1)[1]
    for url in (
        f"amqp://guest:Sup3r-s3cret@127.0.0.1:5672/{vhost}",  # wrong password
        "amqp://guest:Sup3r-s3cret@127.0.0.1:1/",  # nothing listening
    ):
        monkeypatch.setenv("RABBITMQ_URL", url)
        monkeypatch.setenv("RABBITMQ_CONNECTION_TIMEOUT", "5")
        assert tool.main(["list"]) == 2
        captured = capsys.readouterr()
        assert "cannot connect to RabbitMQ at amqp://guest:***@127.0.0.1:" in captured.err
        assert "Sup3r-s3cret" not in captured.out + captured.err


async def test_the_console_script(settings: RabbitSettings) -> None:
    script = Path(sys.executable).parent / "herald-dead-letters"
    env = {**os.environ, "RABBITMQ_URL": settings.url}

    async def run(*argv: str) -> tuple[int, str, str]:
        process = await asyncio.create_subprocess_exec(
            script,
            *argv,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
        assert process.returncode is not None
        return process.returncode, stdout.decode(), stderr.decode()

    code, stdout, stderr = await run("list")
    assert (code, stderr) == (0, "")
    assert f"{DLQ}: 5 messages" in stdout
    assert "id=rej-1" in stdout
    assert SECRET not in stdout

    code, stdout, _ = await run("replay", "--queue", QUEUE.name, "--message-id", "missing")
    assert code == 1
    assert "nothing matched" in stdout
