"""deploy/rabbitmq/definitions.json is what scripts/gen_definitions.py derives from the code, and
its permissions are least privilege (tests/integration/shared/test_broker_permissions.py shows
the broker enforcing them)."""

from __future__ import annotations

import json
import re

import pytest

from herald_shared.topology import CONSUMER_QUEUES, EXCHANGE, MESSAGE_NEW
from scripts.gen_asyncapi import SERVICES
from scripts.gen_definitions import (
    ADMIN_USER,
    OPS_USER,
    OUTPUT,
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


def _allows(pattern: str, name: str) -> bool:
    # RabbitMQ matches permission patterns like re.search (anchors included in ours).
    return re.search(pattern, name) is not None


@pytest.mark.parametrize("service", SERVICES)
def test_service_user_is_least_privilege(service: str) -> None:
    access = service_access(service)
    vhost = _grant("permissions", service)
    topic = _grant("topic_permissions", service)
    assert vhost["configure"] == "^$"
    assert not _allows(vhost["write"], "amq.default")
    assert not _allows(vhost["write"], "")  # the default exchange
    for queue in CONSUMER_QUEUES:
        assert _allows(vhost["read"], queue.name) == (queue.name in access.consumes)
        assert not _allows(vhost["read"], queue.dead_letter_queue.name)
    all_keys = {key for queue in CONSUMER_QUEUES for key in queue.bindings}
    for key in all_keys:
        assert _allows(topic["write"], key) == (key in access.publishes), key
    assert topic["exchange"] == EXCHANGE.name


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
    assert not _allows(_grant("topic_permissions", OPS_USER)["write"], MESSAGE_NEW)


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
