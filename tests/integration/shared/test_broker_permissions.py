"""Least privilege on the real broker.

deploy/rabbitmq/definitions.json's generator, with a throwaway vhost and prefixed user names,
is imported with `rabbitmqctl import_definitions` (the admin step of a deployment). Then each
service's user may do what the service does and nothing else, every service starts in passive
mode with its own user, and the imported topology is exactly what `declare_topology` creates.
"""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
import pytest
from prometheus_client import CollectorRegistry
from yarl import URL

from herald_shared.broker import RabbitSettings, make_broker
from herald_shared.metrics import fed_queues, herald_metrics, refresh_broker_gauges
from herald_shared.ops import consumers_ready
from herald_shared.topology import (
    CONSUMER_QUEUES,
    DEAD_LETTER_EXCHANGE,
    EXCHANGE,
    MESSAGE_NEW,
    MESSAGE_NOTIFICATIONS,
    PUSH_NOTIFICATIONS,
    PUSH_SEND,
    RETRY_EXCHANGE,
    declare_topology,
)
from scripts.gen_asyncapi import SERVICES
from scripts.gen_definitions import (
    ADMIN_USER,
    OPS_USER,
    default_retry_delays,
    definitions,
    dev_password,
    render,
)
from tests.support.infra import RABBIT_BASE_URL, RABBITMQCTL, wait_until


def _rabbitmqctl(*args: str) -> str:
    return subprocess.run(
        [RABBITMQCTL, "-q", *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout


def _list(vhost: str, *what: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(_rabbitmqctl(*what, "-p", vhost, "--formatter", "json"))
    for row in rows:
        if "arguments" in row:  # rabbitmqctl prints [name, AMQP type, value] triples
            row["arguments"] = {name: value for name, _type, value in row["arguments"]}
    return rows


@dataclass(frozen=True)
class Imported:
    vhost: str
    prefix: str
    document: dict[str, Any]

    def url(self, user: str) -> str:
        base = URL(RABBIT_BASE_URL)
        return str(
            base.with_user(self.prefix + user)
            .with_password(dev_password(user))
            .with_path("/" + self.vhost)
        )


def _counts(vhost: str) -> tuple[int, ...]:
    return (
        len(_list(vhost, "list_queues", "name")),
        len([row for row in _list(vhost, "list_bindings", "source_name") if row["source_name"]]),
        len(_list(vhost, "list_permissions")),
        len(_list(vhost, "list_topic_permissions")),
    )


@pytest.fixture(scope="module")
def imported() -> Iterator[Imported]:
    token = uuid.uuid4().hex[:10]
    vhost, prefix = f"herald-perm-{token}", f"perm-{token}-"
    document = definitions(vhost=vhost, user_prefix=prefix)
    # Debian's rabbitmqctl reads the file as the rabbitmq user (so not from pytest's private
    # temp folder), and 3.10.8 refuses "-" for stdin. It holds dev placeholder hashes only.
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as file:
        file.write(render(document))
    path = Path(file.name)
    path.chmod(0o644)
    try:
        _rabbitmqctl("import_definitions", str(path))
        # The import runs asynchronously: wait until everything in the document is there.
        expected = (
            len(document["queues"]),
            len(document["bindings"]),
            len(document["permissions"]),
            len(document["topic_permissions"]),
        )
        deadline = time.monotonic() + 60
        while not _vhost_exists(vhost) or _counts(vhost) != expected:
            if time.monotonic() > deadline:
                raise TimeoutError("definitions import did not complete within 60 s")
            time.sleep(0.2)
        yield Imported(vhost, prefix, document)
    finally:
        path.unlink()
        if _vhost_exists(vhost):
            _rabbitmqctl("delete_vhost", vhost)
        users = json.loads(_rabbitmqctl("list_users", "--formatter", "json"))
        existing = {row["user"] for row in users}
        for user in document["users"]:
            if user["name"] in existing:
                _rabbitmqctl("delete_user", user["name"])


def _vhost_exists(vhost: str) -> bool:
    rows = json.loads(_rabbitmqctl("list_vhosts", "--formatter", "json"))
    return vhost in {row["name"] for row in rows}


@pytest.fixture
async def admin(imported: Imported) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    connection = await aio_pika.connect(imported.url(ADMIN_USER))
    async with connection:
        yield await connection.channel()


async def _publish(url: str, exchange: str, routing_key: str) -> None:
    """Publish one persistent, mandatory, confirmed message as the user of `url`."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        target = (
            channel.default_exchange
            if exchange == ""
            else await channel.get_exchange(exchange, ensure=True)
        )
        await target.publish(
            aio_pika.Message(b"{}", delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=routing_key,
            mandatory=True,
            timeout=5,
        )


async def _depth(channel: aio_pika.abc.AbstractChannel, queue: str) -> int:
    declared = await channel.declare_queue(queue, passive=True)
    count = declared.declaration_result.message_count
    return count or 0


async def test_push_sender_cannot_forge_a_new_message(
    imported: Imported, admin: aio_pika.abc.AbstractChannel
) -> None:
    with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
        await _publish(imported.url("push-sender"), EXCHANGE.name, MESSAGE_NEW)
    assert await _depth(admin, MESSAGE_NOTIFICATIONS.name) == 0


async def test_push_sender_cannot_publish_through_the_default_exchange(
    imported: Imported, admin: aio_pika.abc.AbstractChannel
) -> None:
    with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
        await _publish(imported.url("push-sender"), "", MESSAGE_NOTIFICATIONS.name)
    assert await _depth(admin, MESSAGE_NOTIFICATIONS.name) == 0


async def test_push_sender_reads_its_own_queue_only(imported: Imported) -> None:
    connection = await aio_pika.connect(imported.url("push-sender"))
    async with connection:
        channel = await connection.channel()
        own = await channel.declare_queue(PUSH_NOTIFICATIONS.name, passive=True)
        assert await own.get(fail=False, timeout=5) is None  # allowed, and empty
        # Not declared: RabbitMQ 4.2.7+ would refuse the passive declare itself (no
        # permission on the queue at all), and this is about the read.
        other = await channel.get_queue(MESSAGE_NOTIFICATIONS.name, ensure=False)
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await other.get(fail=False, timeout=5)


async def test_services_cannot_create_topology(imported: Imported) -> None:
    connection = await aio_pika.connect(imported.url("notification-router"))
    async with connection:
        channel = await connection.channel()
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await channel.declare_queue("notification-router.sneaky", durable=True)


async def test_router_may_publish_push_jobs(
    imported: Imported, admin: aio_pika.abc.AbstractChannel
) -> None:
    await _publish(imported.url("notification-router"), EXCHANGE.name, PUSH_SEND)
    queue = await admin.declare_queue(PUSH_NOTIFICATIONS.name, passive=True)
    message = await queue.get(no_ack=True, fail=False, timeout=5)
    assert message is not None
    assert message.routing_key == PUSH_SEND


async def test_ops_user_reads_dead_letters_and_replays_with_retry_keys_only(
    imported: Imported, admin: aio_pika.abc.AbstractChannel
) -> None:
    url = imported.url(OPS_USER)
    await _publish(url, EXCHANGE.name, MESSAGE_NOTIFICATIONS.retry_routing_key)
    queue = await admin.declare_queue(MESSAGE_NOTIFICATIONS.name, passive=True)
    assert await queue.get(no_ack=True, fail=False, timeout=5) is not None
    with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
        await _publish(url, EXCHANGE.name, MESSAGE_NEW)

    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        dead_letters = await channel.declare_queue(
            MESSAGE_NOTIFICATIONS.dead_letter_queue.name, passive=True
        )
        assert await dead_letters.get(fail=False, timeout=5) is None
        work = await channel.get_queue(MESSAGE_NOTIFICATIONS.name, ensure=False)
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await work.get(fail=False, timeout=5)


async def test_push_sender_cannot_reach_another_queue_through_its_wait_queue(
    imported: Imported, admin: aio_pika.abc.AbstractChannel
) -> None:
    """notifications.delay is a topic exchange, so push-sender's topic permission confines it
    to its own wait and dead-letter queues (a direct exchange would not be checked at all, and
    message_notifications' wait queue would dead-letter the forgery into message_notifications
    with notification.message.retry)."""
    wait_queue = MESSAGE_NOTIFICATIONS.wait_queue(1.0).name
    assert wait_queue == "message_notifications.wait.1000ms"
    for target in (wait_queue, MESSAGE_NOTIFICATIONS.dead_letter_queue.name):
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await _publish(imported.url("push-sender"), RETRY_EXCHANGE.name, target)
    # Nor through the exchange RabbitMQ dead-letters with: no service may write it.
    with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
        await _publish(
            imported.url("push-sender"),
            DEAD_LETTER_EXCHANGE.name,
            MESSAGE_NOTIFICATIONS.name,
        )
    for queue in (wait_queue, MESSAGE_NOTIFICATIONS.dead_letter_queue.name):
        assert await _depth(admin, queue) == 0
    assert await _depth(admin, MESSAGE_NOTIFICATIONS.name) == 0


async def test_push_sender_delays_and_dead_letters_into_its_own_queues(
    imported: Imported, admin: aio_pika.abc.AbstractChannel
) -> None:
    wait_queue = PUSH_NOTIFICATIONS.wait_queue(1.0).name
    dead_letter_queue = PUSH_NOTIFICATIONS.dead_letter_queue.name
    assert (wait_queue, dead_letter_queue) == (
        "push_notifications.wait.1000ms",
        "push_notifications.dlq",
    )
    await _publish(imported.url("push-sender"), RETRY_EXCHANGE.name, dead_letter_queue)
    dead_letters = await admin.declare_queue(dead_letter_queue, passive=True)
    message = await dead_letters.get(no_ack=True, fail=False, timeout=5)
    assert message is not None
    assert message.routing_key == dead_letter_queue

    # Confirmed and mandatory: it reached the wait queue (whose TTL then returns it to
    # push_notifications with its retry key).
    await _publish(imported.url("push-sender"), RETRY_EXCHANGE.name, wait_queue)
    work = await admin.declare_queue(PUSH_NOTIFICATIONS.name, passive=True)

    async def returned() -> bool:
        return await _depth(admin, PUSH_NOTIFICATIONS.name) > 0

    await wait_until(returned, timeout=10)
    message = await work.get(no_ack=True, fail=False, timeout=5)
    assert message is not None
    assert message.routing_key == PUSH_NOTIFICATIONS.retry_routing_key


# Direct reply-to's pseudo-queue, which FastStream checks at start: RabbitMQ answers a declare
# of it before any permission check (rabbit_channel's queue.declare clause for it comes first).
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"


def _permitted(grant: dict[str, str], name: str) -> bool:
    """RabbitMQ 4.2.7+/4.3.1+'s check of a passive declare: any one of the user's configure,
    write and read patterns matches the object's name (`re:run`, unanchored, like search)."""
    if name.startswith(DIRECT_REPLY_TO):
        return True
    return any(re.search(grant[kind], name) for kind in ("configure", "write", "read"))


@pytest.fixture
def passive_declares(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Every passive declare sent on an AMQP channel from now on: ("queue" | "exchange", name).
    This broker (3.10) checks no permission for them; RabbitMQ 4.2.7 and 4.3.1 do."""
    sent: list[tuple[str, str]] = []
    queue_declare = aiormq.Channel.queue_declare
    exchange_declare = aiormq.Channel.exchange_declare

    async def recording_queue_declare(self: Any, queue: str = "", **kwargs: Any) -> Any:
        if kwargs.get("passive"):
            sent.append(("queue", queue))
        return await queue_declare(self, queue, **kwargs)

    async def recording_exchange_declare(self: Any, exchange: str = "", **kwargs: Any) -> Any:
        if kwargs.get("passive"):
            sent.append(("exchange", exchange))
        return await exchange_declare(self, exchange, **kwargs)

    monkeypatch.setattr(aiormq.Channel, "queue_declare", recording_queue_declare)
    monkeypatch.setattr(aiormq.Channel, "exchange_declare", recording_exchange_declare)
    return sent


@pytest.mark.parametrize("service", SERVICES)
async def test_service_starts_in_passive_mode_with_its_own_user(
    imported: Imported, service: str, passive_declares: list[tuple[str, str]]
) -> None:
    package = SERVICES[service]
    settings_module: Any = importlib.import_module(f"{package}.settings")
    app_module: Any = importlib.import_module(f"{package}.app")

    def broker_of(declare: str) -> Any:
        rabbitmq = RabbitSettings(url=imported.url(service), declare=declare)
        # The app's own broker with every subscriber and publisher (no database involved).
        return app_module.specification(settings_module.Settings(rabbitmq=rabbitmq)).brokers[0]

    # Full mode creates and binds: this user may not (so passive mode is no formality).
    refused = broker_of("full")
    try:
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await declare_topology(refused, retry_delays=default_retry_delays())
    finally:
        await refused.stop()

    broker = broker_of("passive")
    try:
        await declare_topology(broker, retry_delays=default_retry_delays())
        await broker.start()
        consumed = {subscriber.queue.name for subscriber in broker.subscribers}
        assert consumed, f"{service} consumes nothing"

        async def consuming() -> bool:
            rows = _list(imported.vhost, "list_consumers", "queue_name")
            return {row["queue_name"] for row in rows} == consumed

        await wait_until(consuming, timeout=10)
        # What a running service checks besides: readiness (its consumers), and at every
        # scrape of /metrics the depth and consumers of its queues and of the ones it feeds.
        assert await consumers_ready(broker)
        metrics = herald_metrics(CollectorRegistry())
        await refresh_broker_gauges(broker, metrics)
        reported = {
            sample.labels["queue"]
            for family in metrics.queue_consumers.collect()
            for sample in family.samples
        }
        assert reported == {*consumed, *fed_queues(broker)}  # every probe answered
    finally:
        await broker.stop()
    # What it checked, each object on which its user has some permission (RabbitMQ 4.x).
    grant = next(
        row for row in imported.document["permissions"] if row["user"] == imported.prefix + service
    )
    assert {kind for kind, _ in passive_declares} == {"queue", "exchange"}
    assert consumed <= {name for kind, name in passive_declares if kind == "queue"}
    refused = sorted({name for _, name in passive_declares if not _permitted(grant, name)})
    assert refused == []


async def test_definitions_topology_is_what_the_code_declares(
    imported: Imported, rabbit_url: str
) -> None:
    broker = make_broker(RabbitSettings(url=rabbit_url), service_name="definitions-test")
    async with broker:
        await declare_topology(broker, retry_delays=default_retry_delays())
    declared_vhost = rabbit_url.rsplit("/", 1)[1]

    def state(vhost: str) -> dict[str, list[Any]]:
        exchanges = _list(
            vhost,
            "list_exchanges",
            "name",
            "type",
            "durable",
            "auto_delete",
            "internal",
            "arguments",
        )
        queues = _list(vhost, "list_queues", "name", "durable", "auto_delete", "arguments")
        bindings = _list(
            vhost,
            "list_bindings",
            "source_name",
            "destination_name",
            "destination_kind",
            "routing_key",
            "arguments",
        )
        return {
            "exchanges": sorted(
                (
                    json.dumps(row, sort_keys=True)
                    for row in exchanges
                    if row["name"].startswith("notifications")
                ),
            ),
            "queues": sorted(json.dumps(row, sort_keys=True) for row in queues),
            # The default exchange's implicit bindings (one per queue) are not topology.
            "bindings": sorted(
                json.dumps(row, sort_keys=True) for row in bindings if row["source_name"]
            ),
        }

    from_definitions = state(imported.vhost)
    from_code = state(declared_vhost)
    assert from_definitions == from_code
    assert {json.loads(row)["name"] for row in from_code["exchanges"]} == {
        EXCHANGE.name,
        DEAD_LETTER_EXCHANGE.name,
        RETRY_EXCHANGE.name,
    }
    assert len(from_code["queues"]) == len(imported.document["queues"])


def test_the_dead_letter_policy_is_accepted_and_applies_to_every_dead_letter_queue(
    imported: Imported,
) -> None:
    """The import would have failed on a limit 3.10 refuses (a negative one); the policy
    reaches each dead-letter queue and nothing else."""
    (policy,) = imported.document["policies"]
    applied = {
        row["name"]: row["policy"] for row in _list(imported.vhost, "list_queues", "name", "policy")
    }
    dead_letter_queues = {queue.dead_letter_queue.name for queue in CONSUMER_QUEUES}
    assert {
        name for name, applied_policy in applied.items() if applied_policy
    } == dead_letter_queues
    assert {applied[name] for name in dead_letter_queues} == {policy["name"]}
