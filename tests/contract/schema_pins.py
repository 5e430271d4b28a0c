"""Pinned JSON Schemas of every event. Regenerate after an intended, additive change with
`uv run python -m tests.contract.schema_pins`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from herald_shared.events import EVENT_MODELS, Event

PIN_DIR = Path(__file__).parent / "schemas"


def pin_path(model: type[Event]) -> Path:
    return PIN_DIR / f"{model.__name__}.json"


def current_schema(model: type[Event]) -> dict[str, Any]:
    return model.model_json_schema()


def write_pins() -> None:
    PIN_DIR.mkdir(exist_ok=True)
    for model in EVENT_MODELS:
        text = json.dumps(current_schema(model), indent=2, sort_keys=True) + "\n"
        pin_path(model).write_text(text)


if __name__ == "__main__":
    write_pins()
