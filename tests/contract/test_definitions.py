"""deploy/rabbitmq/definitions.json is what scripts/gen_definitions.py derives from the code, and
its permissions are least privilege (tests/integration/shared/test_broker_permissions.py shows
the broker enforcing them)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from herald_shared.topology import (
    CONSUMER_QUEUES,
    DEAD_LETTER_EXCHANGE,
    DELIVERY_LIMIT,
    EXCHANGE,
    MESSAGE_NEW,
    RETRY_EXCHANGE,
)
from scripts.gen_asyncapi import SERVICES
from scripts.gen_definitions import (
    ADMIN_USER,
    DEAD_LETTER_DELIVERY_LIMIT,
    OPS_USER,
    OUTPUT,
    default_retry_delays,
    definitions,
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
    for queue in CONSUMER_QUEUES:
        assert _allows(vhost["read"], queue.name) == (queue.name in access.consumes)
        assert not _allows(vhost["read"], queue.dead_letter_queue.name)
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
