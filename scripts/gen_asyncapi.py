"""Write each service's AsyncAPI document to deploy/asyncapi/<service>.yaml.

`uv run python scripts/gen_asyncapi.py`; tests/contract/test_asyncapi.py fails when a file is stale.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import yaml

from herald_shared.broker import RabbitSettings

ROOT = Path(__file__).resolve().parent.parent
OUTPUT_DIR = ROOT / "deploy" / "asyncapi"
SERVICES = {
    "message-service": "message_service",
    "notification-router": "notification_router",
    "push-sender": "push_sender",
    "email-sender": "email_sender",
}
# A fixed broker address, so the documents do not depend on the generating machine's environment.
DOCUMENTED_RABBITMQ_URL = "amqp://guest:guest@localhost:5672/"


def document(service: str) -> str:
    package = SERVICES[service]
    settings_module: Any = importlib.import_module(f"{package}.settings")
    app_module: Any = importlib.import_module(f"{package}.app")
    settings = settings_module.Settings(rabbitmq=RabbitSettings(url=DOCUMENTED_RABBITMQ_URL))
    document = app_module.specification(settings).to_specification().to_jsonable()
    # FastStream's channel order varies between runs; sorted keys keep the file stable.
    text: str = yaml.safe_dump(document, sort_keys=True, allow_unicode=True)
    return text


def path_for(service: str) -> Path:
    return OUTPUT_DIR / f"{service}.yaml"


def main() -> None:
    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    for service in SERVICES:
        path_for(service).write_text(document(service))
        print(f"wrote {path_for(service).relative_to(ROOT)}")


if __name__ == "__main__":
    main()
