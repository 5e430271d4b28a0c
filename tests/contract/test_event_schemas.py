"""Event schemas are a contract between services deployed at different times.

A change must be additive and optional (old consumers ignore new fields, new consumers accept old
events); anything else is a new event type. The exact-match test makes every change deliberate;
the compatibility test says whether the change is allowed.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from herald_shared.events import EVENT_MODELS, Event
from tests.contract.schema_pins import current_schema, pin_path


def _definitions(schema: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {"<root>": schema, **schema.get("$defs", {})}


def compatibility_problems(pinned: dict[str, Any], current: dict[str, Any]) -> list[str]:
    problems = []
    current_defs = _definitions(current)
    for name, old in _definitions(pinned).items():
        new = current_defs.get(name)
        if new is None:
            problems.append(f"{name}: definition removed")
            continue
        for field, old_property in old.get("properties", {}).items():
            new_property = new.get("properties", {}).get(field)
            if new_property is None:
                problems.append(f"{name}.{field}: removed")
            elif {k: v for k, v in new_property.items() if k not in {"title", "description"}} != {
                k: v for k, v in old_property.items() if k not in {"title", "description"}
            }:
                problems.append(f"{name}.{field}: type changed")
        added_required = set(new.get("required", [])) - set(old.get("required", []))
        problems.extend(f"{name}.{field}: newly required" for field in sorted(added_required))
    return problems


@pytest.mark.parametrize("model", EVENT_MODELS, ids=lambda m: m.__name__)
def test_schema_matches_its_pin(model: type[Event]) -> None:
    pinned = json.loads(pin_path(model).read_text())
    current = current_schema(model)
    assert compatibility_problems(pinned, current) == []
    assert current == pinned, (
        "additive change: re-pin with `uv run python -m tests.contract.schema_pins`"
    )


def test_the_compatibility_check_catches_breaking_changes() -> None:
    properties = {"a": {"type": "string"}, "b": {"type": "integer"}}
    pinned: dict[str, Any] = {"properties": properties, "required": ["a"]}
    assert compatibility_problems(pinned, pinned) == []
    additive = {"properties": {**properties, "c": {"type": "string"}}, "required": ["a"]}
    assert compatibility_problems(pinned, additive) == []
    breaking = {"properties": {"a": {"type": "integer"}}, "required": ["a", "c"]}
    assert compatibility_problems(pinned, breaking) == [
        "<root>.a: type changed",
        "<root>.b: removed",
        "<root>.c: newly required",
    ]
