"""What makes the shared sender workflow (`herald_shared.sending`) a push sender: the device's
platform picks the provider, the ledger row keeps the device, and a dead token's failure tells
message-service to remove the device."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from herald_shared.events import Channel, DeviceInvalidated, Event, PushRequested
from push_sender.registry import ProviderRegistry, PushGate, settings_hint
from push_sender.tables import Failure

_EVENT_NAMESPACE = uuid.UUID("5c0f3d2e-8a41-4b7e-9c6d-2f1e0a9b8c73")


def invalidation_for(job: PushRequested, reason: str) -> DeviceInvalidated:
    """Its id derives from the notification, so it is the same event if published again."""
    return DeviceInvalidated(
        event_id=uuid.uuid5(_EVENT_NAMESPACE, f"{job.notification_id}:device-invalidated"),
        user_id=job.recipient_id,
        device_id=job.device_id,
        reason=reason,
    )


class PushChannel:
    """`herald_shared.sending.ChannelSpec` for pushes."""

    channel = Channel.PUSH

    def __init__(self, providers: ProviderRegistry) -> None:
        self.providers = providers

    def gate_for(self, job: PushRequested) -> PushGate | None:
        return self.providers.for_platform(job.platform)

    def unsupported(self, job: PushRequested) -> str:
        return f"unsupported platform {job.platform}"

    def ledger_columns(self, job: PushRequested) -> Mapping[str, Any]:
        return {"device_id": job.device_id}

    def gone_failures(self) -> frozenset[str]:
        return frozenset({Failure.TOKEN_INVALID})

    def events_for_failure(
        self, job: PushRequested, failure: str, reason: str
    ) -> tuple[Event, ...]:
        if failure == Failure.TOKEN_INVALID:
            return (invalidation_for(job, reason),)
        return ()

    def settings_hint(self, provider: str) -> str:
        return settings_hint(provider)
