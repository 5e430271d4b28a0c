"""Write deploy/rabbitmq/definitions.json: Herald's vhost, users, permissions and topology.

`uv run python -m scripts.gen_definitions` rewrites the committed file, whose users have
placeholder passwords for local use only (`<user>-dev-only`, the same everywhere: never load
that file on a broker reachable by anyone else). tests/contract/test_definitions.py fails when
it is stale.

`uv run python -m scripts.gen_definitions --passwords-from-env --output PATH` writes the same
definitions with real passwords, read from `HERALD_RABBITMQ_PASSWORD_<USER>` (e.g.
`HERALD_RABBITMQ_PASSWORD_PUSH_SENDER`), each hashed with a random salt. Write it outside the
repository and hand it to the broker as a secret (deploy/rabbitmq/README.md).

Nothing here is typed twice: the topology is what `herald_shared.topology.declare_topology`
declares (recorded, not re-described), what each service publishes and consumes is read from its
AsyncAPI document (which FastStream derives from the service's subscribers and publishers), and
the permissions follow from those (docs/design.md, "Broker permissions").
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import re
import secrets
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import yaml
from faststream.rabbit import RabbitBroker, RabbitExchange, RabbitQueue

from herald_shared.broker import RabbitSettings
from herald_shared.topology import (
    CONSUMER_QUEUES,
    EXCHANGE,
    RETRY_EXCHANGE,
    declare_topology,
    queue_for_routing_key,
)
from scripts.gen_asyncapi import SERVICES, document

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "deploy" / "rabbitmq" / "definitions.json"
VHOST = "herald"
# Creates the topology (definitions import or declare_topology in full mode); never a service.
ADMIN_USER = "herald-admin"
# herald-dead-letters: reads the dead-letter queues and replays into their origin queue.
OPS_USER = "herald-ops"
HASHING_ALGORITHM = "rabbit_password_hashing_sha256"
PASSWORD_VARIABLE_PREFIX = "HERALD_RABBITMQ_PASSWORD_"  # noqa: S105 (a variable name)
NOTHING = "^$"
EVERYTHING = ".*"
# The one policy of the vhost (`dead_letter_policy`).
DEAD_LETTER_POLICY = "herald-dead-letter-queues"
# The dead-letter queues' delivery limit: in effect none. RabbitMQ 4.x gives every quorum queue
# without one a limit of 20 deliveries, and a dead-letter queue has no dead-letter target of its
# own, so past the limit a dead letter is dropped. herald-dead-letters reads a queue by taking
# every message and returning it (`list`, `show`), which counts as a delivery up to 4.2 (and on
# 3.x): the 21st listing would empty the queue. 4.x reads -1 as "unlimited" but 3.x refuses a
# negative limit (a policy with one fails the definitions import), hence the largest 32-bit
# integer, which both accept. Not a queue argument: changing the arguments of an existing
# queue fails its next declaration (PRECONDITION_FAILED); a policy applies to existing queues.
DEAD_LETTER_DELIVERY_LIMIT = 2**31 - 1


@dataclass(frozen=True)
class ServiceAccess:
    """What one service does on the broker, as its AsyncAPI document states it."""

    user: str
    publishes: tuple[str, ...]  # routing keys on the `notifications` exchange
    consumes: tuple[str, ...]  # queue names


def service_access(service: str) -> ServiceAccess:
    spec = yaml.safe_load(document(service))
    publishes: set[str] = set()
    consumes: set[str] = set()
    for operation in spec.get("operations", {}).values():
        channel = spec["channels"][operation["channel"]["$ref"].rsplit("/", 1)[1]]
        amqp = channel["bindings"]["amqp"]
        if operation["action"] == "send":
            if amqp["exchange"]["name"] != EXCHANGE.name:
                raise ValueError(f"{service} publishes to {amqp['exchange']['name']!r}")
            publishes.update(operation["bindings"]["amqp"]["cc"])
        else:
            consumes.add(amqp["queue"]["name"])
    return ServiceAccess(service, tuple(sorted(publishes)), tuple(sorted(consumes)))


def fed_queues(access: ServiceAccess) -> tuple[str, ...]:
    """The other services' work queues that this service's routing keys reach."""
    reached = (queue_for_routing_key(key) for key in access.publishes)
    return tuple(
        sorted({queue.name for queue in reached if queue and queue.name not in access.consumes})
    )


def exactly(names: Iterable[str]) -> str:
    """A permission pattern matching these names and nothing else (`^$`: nothing at all)."""
    alternatives = sorted({re.escape(name) for name in names})
    return f"^({'|'.join(alternatives)})$" if alternatives else NOTHING


def own_wait_and_dead_letter_queues(queues: Iterable[str]) -> str:
    """A topic permission pattern matching the wait queues (any tier: RABBITMQ_RETRY_DELAYS is
    configurable) and the dead-letter queues of these work queues, and nothing else."""
    alternatives = sorted({re.escape(name) for name in queues})
    if not alternatives:
        return NOTHING
    return rf"^({'|'.join(alternatives)})\.(wait\.[0-9]+ms|dlq)$"


# A user's vhost permission, and its topic permissions by exchange name.
Grant = tuple[dict[str, str], dict[str, dict[str, str]]]


def permissions(access: ServiceAccess) -> Grant:
    """The vhost permission and the topic permissions of one service.

    No configure at all: a service only checks the topology passively. Write on `notifications`
    only to publish, and there only its own routing keys (topic permission). A consumer's
    failures go through `notifications.delay` (herald_shared.retry), routed by the target
    queue's name, so a consumer writes that exchange, and there only to its own queues' wait and
    dead-letter queues (topic permission). Never `notifications.dlx`: only RabbitMQ's own
    dead-lettering uses it, which needs no permission, and a direct exchange cannot confine a
    writer to its own queues. Read only its own queues. Never amq.default: it reaches any queue
    by name.

    Write, too, on the queues it checks with a passive declare, which from RabbitMQ 4.2.7 and
    4.3.1 needs some permission on the object: its own wait and dead-letter queues (checked at
    start, `herald_shared.topology.passive_scope`), and the work queues its events feed and
    their dead-letter queues, whose depth and consumers it reports (`herald_shared.metrics`,
    `observed_queues`). Write on a queue is only ever checked for a binding to it, which also
    needs read on the source exchange, and a service may read no exchange: it grants nothing
    else (read would let the service consume or purge them).
    """
    exchanges = {EXCHANGE.name} if access.publishes else set()
    # Topic read is checked when binding to a topic exchange; services never bind.
    topic_permissions = {EXCHANGE.name: {"write": exactly(access.publishes), "read": NOTHING}}
    if access.consumes:
        exchanges.add(RETRY_EXCHANGE.name)
        topic_permissions[RETRY_EXCHANGE.name] = {
            "write": own_wait_and_dead_letter_queues(access.consumes),
            "read": NOTHING,
        }
    write = exactly(exchanges)
    if access.consumes:
        write += "|" + own_wait_and_dead_letter_queues(access.consumes)
    fed = fed_queues(access)
    if fed:
        write += "|" + exactly([*fed, *(f"{name}.dlq" for name in fed)])
    vhost_permission = {
        "configure": NOTHING,
        "write": write,
        "read": exactly(access.consumes),
    }
    return vhost_permission, topic_permissions


def ops_permissions() -> Grant:
    """herald-dead-letters reads every DLQ and replays each letter with its queue's retry key
    on `notifications` (nothing on `notifications.delay`: it never delays nor dead-letters)."""
    vhost_permission = {
        "configure": NOTHING,
        "write": exactly([EXCHANGE.name]),
        "read": exactly(f"{queue.name}.dlq" for queue in CONSUMER_QUEUES),
    }
    topic_permission = {
        "write": exactly(queue.retry_routing_key for queue in CONSUMER_QUEUES),
        "read": NOTHING,
    }
    return vhost_permission, {EXCHANGE.name: topic_permission}


def dead_letter_policy(vhost: str) -> dict[str, Any]:
    """The policy that lifts the delivery limit of every dead-letter queue (see
    DEAD_LETTER_DELIVERY_LIMIT). RabbitMQ applies one policy to a queue, the matching one of
    highest priority: another policy matching a dead-letter queue must carry `delivery-limit`
    too (deploy/rabbitmq/README.md)."""
    return {
        "vhost": vhost,
        "name": DEAD_LETTER_POLICY,
        "pattern": exactly(queue.dead_letter_queue.name for queue in CONSUMER_QUEUES),
        "apply-to": "queues",
        "definition": {"delivery-limit": DEAD_LETTER_DELIVERY_LIMIT},
        "priority": 0,
    }


class _RecordedQueue:
    def __init__(self, queue: RabbitQueue, bindings: list[dict[str, Any]]) -> None:
        self._queue = queue
        self._bindings = bindings

    async def bind(self, exchange: RabbitExchange, *, routing_key: str) -> None:
        self._bindings.append(
            {
                "source": exchange.name,
                "destination": self._queue.name,
                "destination_type": "queue",
                "routing_key": routing_key,
                "arguments": {},
            }
        )


class _TopologyRecorder:
    """Stands in for the broker in declare_topology and writes down what it declares."""

    def __init__(self) -> None:
        self.exchanges: list[RabbitExchange] = []
        self.queues: list[RabbitQueue] = []
        self.bindings: list[dict[str, Any]] = []

    async def connect(self) -> None:
        return None

    async def declare_exchange(self, exchange: RabbitExchange) -> RabbitExchange:
        self.exchanges.append(exchange)
        return exchange

    async def declare_queue(self, queue: RabbitQueue) -> _RecordedQueue:
        self.queues.append(queue)
        return _RecordedQueue(queue, self.bindings)


def default_retry_delays() -> tuple[float, ...]:
    """The tiers a service runs with unless RABBITMQ_RETRY_DELAYS says otherwise (not read
    from this machine's environment, so the file does not depend on who generates it)."""
    delays: tuple[float, ...] = RabbitSettings.model_fields["retry_delays"].default
    return delays


def topology(vhost: str, retry_delays: Sequence[float]) -> dict[str, list[dict[str, Any]]]:
    """Exchanges, queues and bindings exactly as declare_topology declares them."""
    recorder = _TopologyRecorder()
    asyncio.run(declare_topology(cast(RabbitBroker, recorder), retry_delays=retry_delays))
    return {
        "queues": [
            {
                "name": queue.name,
                "vhost": vhost,
                "durable": queue.durable,
                "auto_delete": queue.auto_delete,
                "arguments": dict(queue.arguments or {}),
            }
            for queue in recorder.queues
        ],
        "exchanges": [
            {
                "name": exchange.name,
                "vhost": vhost,
                "type": exchange.type.value,
                "durable": exchange.durable,
                "auto_delete": exchange.auto_delete,
                "internal": False,
                "arguments": dict(exchange.arguments or {}),
            }
            for exchange in recorder.exchanges
        ],
        "bindings": [{**binding, "vhost": vhost} for binding in recorder.bindings],
    }


def password_hash(password: str, salt: bytes) -> str:
    """RabbitMQ's rabbit_password_hashing_sha256: base64(salt + sha256(salt + password))."""
    digest = hashlib.sha256(salt + password.encode()).digest()
    return base64.b64encode(salt + digest).decode()


def dev_password(user: str) -> str:
    """The placeholder password of the committed file: local use only, public by design."""
    return f"{user}-dev-only"


def _dev_salt(user: str) -> bytes:
    # Fixed, so the committed file is reproducible; it protects nothing (the password is public).
    return hashlib.sha256(f"herald-dev-salt:{user}".encode()).digest()[:4]


def _random_salt(user: str) -> bytes:
    return secrets.token_bytes(4)


def user_names() -> tuple[str, ...]:
    return (ADMIN_USER, *SERVICES, OPS_USER)


def definitions(
    *,
    vhost: str = VHOST,
    user_prefix: str = "",
    passwords: Mapping[str, str] | None = None,
    retry_delays: Sequence[float] | None = None,
) -> dict[str, Any]:
    """The whole definitions document. `passwords` by user name (without `user_prefix`);
    without it, every user gets its dev placeholder. `user_prefix` and `vhost` let a test
    load the same document next to the real one."""
    salt: Callable[[str], bytes] = _dev_salt if passwords is None else _random_salt
    grants: dict[str, Grant] = {
        ADMIN_USER: ({"configure": EVERYTHING, "write": EVERYTHING, "read": EVERYTHING}, {}),
        **{service: permissions(service_access(service)) for service in SERVICES},
        OPS_USER: ops_permissions(),
    }
    users = []
    for user in user_names():
        password = dev_password(user) if passwords is None else passwords[user]
        users.append(
            {
                "name": user_prefix + user,
                "password_hash": password_hash(password, salt(user)),
                "hashing_algorithm": HASHING_ALGORITHM,
                "tags": ["administrator"] if user == ADMIN_USER else [],
                "limits": {},
            }
        )
    return {
        "users": users,
        "vhosts": [{"name": vhost}],
        "permissions": [
            {"user": user_prefix + user, "vhost": vhost, **vhost_permission}
            for user, (vhost_permission, _) in grants.items()
        ],
        "topic_permissions": [
            {"user": user_prefix + user, "vhost": vhost, "exchange": exchange, **topic}
            for user, (_, topics) in grants.items()
            for exchange, topic in topics.items()
        ],
        "parameters": [],
        "global_parameters": [],
        "policies": [dead_letter_policy(vhost)],
        **topology(vhost, default_retry_delays() if retry_delays is None else retry_delays),
    }


def render(document: Mapping[str, Any]) -> str:
    return json.dumps(document, indent=2) + "\n"


def passwords_from_environment(environ: Mapping[str, str]) -> dict[str, str]:
    variables = {
        user: PASSWORD_VARIABLE_PREFIX + user.upper().replace("-", "_") for user in user_names()
    }
    missing = [variable for variable in variables.values() if not environ.get(variable)]
    if missing:
        raise SystemExit(f"missing password variables: {', '.join(missing)}")
    return {user: environ[variable] for user, variable in variables.items()}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--passwords-from-env",
        action="store_true",
        help=f"real passwords from {PASSWORD_VARIABLE_PREFIX}<USER> (requires --output)",
    )
    parser.add_argument("--output", type=Path, default=None, help=f"default: {OUTPUT}")
    args = parser.parse_args(argv)
    if args.passwords_from_env:
        if args.output is None or args.output.resolve() == OUTPUT:
            parser.error("real passwords go to an --output outside the repository")
        text = render(definitions(passwords=passwords_from_environment(os.environ)))
        args.output.touch(mode=0o600)
        args.output.chmod(0o600)  # it holds password hashes
        args.output.write_text(text)
    else:
        output = args.output or OUTPUT
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(render(definitions()))
    print(f"wrote {args.output or OUTPUT.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
