"""Each service's AsyncAPI file is what its code declares, and what it publishes is consumed."""

from __future__ import annotations

import pytest
import yaml

from herald_shared.topology import queue_for_routing_key
from scripts.gen_asyncapi import SERVICES, document, path_for


@pytest.mark.parametrize("service", SERVICES)
def test_asyncapi_file_is_current(service: str) -> None:
    assert path_for(service).read_text() == document(service), (
        "stale: regenerate with `uv run python scripts/gen_asyncapi.py`"
    )


def _published_routing_keys(service: str) -> set[tuple[str, str]]:
    """(exchange, routing key) of every publisher the service documents."""
    spec = yaml.safe_load(document(service))
    keys: set[tuple[str, str]] = set()
    for operation in spec.get("operations", {}).values():
        if operation["action"] != "send":
            continue
        channel = spec["channels"][operation["channel"]["$ref"].rsplit("/", 1)[1]]
        exchange = channel["bindings"]["amqp"]["exchange"]["name"]
        keys.update((exchange, key) for key in operation["bindings"]["amqp"]["cc"])
    return keys


@pytest.mark.parametrize("service", SERVICES)
def test_every_published_routing_key_is_bound_to_a_queue(service: str) -> None:
    keys = _published_routing_keys(service)
    assert keys, f"{service} documents no publisher"
    for exchange, routing_key in keys:
        assert exchange == "notifications"
        assert queue_for_routing_key(routing_key) is not None, f"{routing_key} reaches no queue"
