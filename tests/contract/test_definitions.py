"""deploy/rabbitmq/definitions.json is what scripts/gen_definitions.py derives from the code, and
its permissions are least privilege (tests/integration/shared/test_broker_permissions.py shows
the broker enforcing them)."""

from __future__ import annotations

import importlib
import json
import re
from typing import Any

import pytest
from faststream.rabbit.publisher import RabbitPublisher
from faststream.rabbit.subscriber import RabbitSubscriber

from herald_shared.broker import RabbitSettings
from herald_shared.metrics import consumed_queues, observed_queues
from herald_shared.metrics import fed_queues as metrics_fed_queues
from herald_shared.topology import (
    CONSUMER_QUEUES,
    DEAD_LETTER_EXCHANGE,
    DELIVERY_LIMIT,
    EXCHANGE,
    MESSAGE_NEW,
    RETRY_EXCHANGE,
    passive_scope,
)
from scripts.gen_asyncapi import SERVICES
from scripts.gen_definitions import (
    ADMIN_USER,
    DEAD_LETTER_DELIVERY_LIMIT,
    OPS_USER,
    OUTPUT,
    default_retry_delays,
    definitions,
    fed_queues,
    render,
    service_access,
)

DOCUMENT = definitions()


def test_definitions_file_is_current() -> None:
    assert OUTPUT.read_text() == render(DOCUMENT), (
        "stale: regenerate with `uv run python -m scripts.gen_definitions`"
    )


def _grant(kind: str, user: str) -> dict[str, str]:
    return next(row for row in DOCUMENT[kind] if row["user"] == user)


def _topic_grants(user: str) -> dict[str, dict[str, str]]:
    """A user's topic permissions by exchange (at most one row per exchange)."""
    rows = [row for row in DOCUMENT["topic_permissions"] if row["user"] == user]
    by_exchange = {row["exchange"]: row for row in rows}
    assert len(by_exchange) == len(rows), f"{user}: two topic rows for one exchange"
    return by_exchange


def _allows(pattern: str, name: str) -> bool:
    # RabbitMQ matches permission patterns like re.search (anchors included in ours).
    return re.search(pattern, name) is not None


@pytest.mark.parametrize("service", SERVICES)
def test_service_user_is_least_privilege(service: str) -> None:
    access = service_access(service)
    vhost = _grant("permissions", service)
    topics = _topic_grants(service)
    assert vhost["configure"] == "^$"
    assert not _allows(vhost["write"], "amq.default")
    assert not _allows(vhost["write"], "")  # the default exchange
    # RabbitMQ's own dead-lettering needs no permission; a direct exchange would let a writer
    # reach every queue bound to it.
    assert not _allows(vhost["write"], DEAD_LETTER_EXCHANGE.name)
    assert not _allows(vhost["write"], "notifications.retry")  # the former direct one
    fed = fed_queues(access)
    for queue in CONSUMER_QUEUES:
        own = queue.name in access.consumes
        assert _allows(vhost["read"], queue.name) == own
        assert not _allows(vhost["read"], queue.dead_letter_queue.name)
        # Write on the queues it checks with passive declares, which RabbitMQ 4.x allows only
        # with some permission: its own wait and dead-letter queues, and the work queues its
        # events feed with their dead-letter queues (their depth and consumers are reported).
        assert _allows(vhost["write"], queue.dead_letter_queue.name) == (own or queue.name in fed)
        for delay in (0.2, 1.0, 25.0, 3600.0):
            assert _allows(vhost["write"], queue.wait_queue(delay).name) == own
        assert _allows(vhost["write"], queue.name) == (queue.name in fed)
    # Write on a queue only ever matters for a binding to it, which needs read on an exchange.
    for exchange in ("amq.default", "", EXCHANGE.name, DEAD_LETTER_EXCHANGE.name):
        assert not _allows(vhost["read"], exchange)
    assert not _allows(vhost["read"], RETRY_EXCHANGE.name)
    all_keys = {key for queue in CONSUMER_QUEUES for key in queue.bindings}
    for key in all_keys:
        assert _allows(topics[EXCHANGE.name]["write"], key) == (key in access.publishes), key
    assert set(topics) == (
        {EXCHANGE.name, RETRY_EXCHANGE.name} if access.consumes else {EXCHANGE.name}
    )
    assert all(topic["read"] == "^$" for topic in topics.values())


@pytest.mark.parametrize("service", SERVICES)
def test_service_delays_and_dead_letters_into_its_own_queues_only(service: str) -> None:
    access = service_access(service)
    assert access.consumes, f"{service} consumes nothing"
    assert _allows(_grant("permissions", service)["write"], RETRY_EXCHANGE.name)
    write = _topic_grants(service)[RETRY_EXCHANGE.name]["write"]
    for queue in CONSUMER_QUEUES:
        own = queue.name in access.consumes
        # Any tier: RABBITMQ_RETRY_DELAYS is configurable, the file holds the default ones.
        for delay in (0.2, 1.0, 5.0, 25.0, 3600.0):
            assert _allows(write, queue.wait_queue(delay).name) == own, queue.name
        assert _allows(write, queue.dead_letter_queue.name) == own, queue.name
        assert not _allows(write, queue.name)
        for key in queue.bindings:
            assert not _allows(write, key)


def test_only_message_service_may_publish_new_messages() -> None:
    writers = {
        row["user"] for row in DOCUMENT["topic_permissions"] if _allows(row["write"], MESSAGE_NEW)
    }
    assert writers == {"message-service"}


def test_every_work_queue_is_read_by_exactly_one_service() -> None:
    for queue in CONSUMER_QUEUES:
        readers = {
            service
            for service in SERVICES
            if _allows(_grant("permissions", service)["read"], queue.name)
        }
        assert len(readers) == 1, queue.name


def test_ops_user_reads_dead_letters_only() -> None:
    grant = _grant("permissions", OPS_USER)
    for queue in CONSUMER_QUEUES:
        assert _allows(grant["read"], queue.dead_letter_queue.name)
        assert not _allows(grant["read"], queue.name)
    topics = _topic_grants(OPS_USER)
    assert set(topics) == {EXCHANGE.name}  # replays through `notifications` only
    assert not _allows(topics[EXCHANGE.name]["write"], MESSAGE_NEW)
    assert not _allows(_grant("permissions", OPS_USER)["write"], RETRY_EXCHANGE.name)


def test_only_the_admin_may_configure() -> None:
    configurers = {row["user"] for row in DOCUMENT["permissions"] if row["configure"] != "^$"}
    assert configurers == {ADMIN_USER}


def test_committed_passwords_are_the_documented_placeholders_only() -> None:
    users = json.loads(OUTPUT.read_text())["users"]
    assert {user["hashing_algorithm"] for user in users} == {"rabbit_password_hashing_sha256"}
    # The file is reproducible from the generator's placeholders: no real secret in git.
    assert users == DOCUMENT["users"]


def test_queues_carry_the_code_arguments() -> None:
    queues = {queue["name"]: queue for queue in DOCUMENT["queues"]}
    for consumer_queue in CONSUMER_QUEUES:
        assert queues[consumer_queue.name]["arguments"] == consumer_queue.queue.arguments
        dlq = consumer_queue.dead_letter_queue
        assert queues[dlq.name]["arguments"] == dlq.arguments


def _passively_declared(service: str) -> tuple[set[str], set[str]]:
    """(exchanges, queues) a service in passive mode declares passively: its publishers'
    exchanges, its subscribers' queues, and what `declare_topology` checks (`passive_scope`)."""
    package = SERVICES[service]
    settings_module: Any = importlib.import_module(f"{package}.settings")
    app_module: Any = importlib.import_module(f"{package}.app")
    rabbitmq = RabbitSettings(url="amqp://u:p@localhost/herald", declare="passive")
    broker = app_module.specification(settings_module.Settings(rabbitmq=rabbitmq)).brokers[0]
    exchanges = {
        publisher.exchange.name
        for publisher in broker.publishers
        if isinstance(publisher, RabbitPublisher) and publisher.exchange.name
    }
    queues = {
        subscriber.queue.name
        for subscriber in broker.subscribers
        if isinstance(subscriber, RabbitSubscriber)
    }
    # And at every scrape of /metrics, the depth and consumers of those and of the queues fed.
    queues |= set(observed_queues([*consumed_queues(broker), *metrics_fed_queues(broker)]))
    scope_exchanges, scope_queues = passive_scope(broker)
    exchanges |= {exchange.name for exchange in scope_exchanges}
    for queue in scope_queues:
        queues.add(queue.name)
        queues.add(queue.dead_letter_queue.name)
        queues |= {queue.wait_queue(delay).name for delay in default_retry_delays()}
    return exchanges, queues


@pytest.mark.parametrize("service", SERVICES)
def test_service_may_declare_passively_what_it_checks(service: str) -> None:
    """RabbitMQ 4.2.7+ and 4.3.1+ refuse a passive declare to a user with no permission
    (configure, write or read) on the object; 4.2.6 and 4.3.0 asked for configure, which no
    service has (unsupported); 3.x asks for none."""
    exchanges, queues = _passively_declared(service)
    assert EXCHANGE.name in exchanges
    assert queues, f"{service} checks no queue"
    # Not the exchange only RabbitMQ writes, nor queues it neither consumes nor feeds.
    assert DEAD_LETTER_EXCHANGE.name not in exchanges
    access = service_access(service)
    assert {name.split(".", 1)[0] for name in queues} == {*access.consumes, *fed_queues(access)}
    grant = _grant("permissions", service)
    refused = sorted(
        name
        for name in exchanges | queues
        if not any(_allows(grant[kind], name) for kind in ("configure", "write", "read"))
    )
    assert refused == []


def test_the_ops_user_may_declare_passively_what_the_tool_checks() -> None:
    """herald-dead-letters checks each dead-letter queue it reads and `notifications`."""
    grant = _grant("permissions", OPS_USER)
    for name in [EXCHANGE.name, *(queue.dead_letter_queue.name for queue in CONSUMER_QUEUES)]:
        assert any(_allows(grant[kind], name) for kind in ("configure", "write", "read")), name


def _effective_policy(queue: str) -> dict[str, Any] | None:
    """The policy RabbitMQ applies to a queue of the vhost: of those matching its name, the one
    of highest priority (one policy per queue, never a merge of two)."""
    matching = [
        policy
        for policy in DOCUMENT["policies"]
        if policy["apply-to"] in {"queues", "all"} and _allows(policy["pattern"], queue)
    ]
    return max(matching, key=lambda policy: policy["priority"], default=None)


def test_dead_letter_queues_have_no_delivery_limit_in_effect() -> None:
    """RabbitMQ 4.x gives a quorum queue without a limit one of 20, and a dead letter past it
    is dropped (a dead-letter queue dead-letters nowhere): browsing with herald-dead-letters
    counts. 3.x refuses a negative limit (4.x's "unlimited") in a policy, so the largest
    32-bit integer stands for it."""
    for queue in CONSUMER_QUEUES:
        name = queue.dead_letter_queue.name
        assert "x-delivery-limit" not in (queue.dead_letter_queue.arguments or {})
        policy = _effective_policy(name)
        assert policy is not None, name
        limit = policy["definition"].get("delivery-limit")
        assert limit == DEAD_LETTER_DELIVERY_LIMIT == 2**31 - 1, name
        assert isinstance(limit, int)
        assert limit >= 0  # 3.10-3.13's policy validation: a non-negative integer
    # Every policy matching a dead-letter queue carries the key, whatever its priority.
    for policy in DOCUMENT["policies"]:
        if any(_allows(policy["pattern"], q.dead_letter_queue.name) for q in CONSUMER_QUEUES):
            assert "delivery-limit" in policy["definition"], policy["name"]


def test_no_policy_reaches_the_work_or_wait_queues() -> None:
    """The work queues keep their argument's limit (the consumer-crash backstop), the wait
    queues their arguments: no policy may replace them."""
    for queue in CONSUMER_QUEUES:
        assert queue.queue.arguments["x-delivery-limit"] == DELIVERY_LIMIT
        for name in (queue.name, *(queue.wait_queue(d).name for d in default_retry_delays())):
            assert _effective_policy(name) is None, name
