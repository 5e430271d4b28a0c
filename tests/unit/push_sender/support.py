"""Builders and test doubles for push-sender's tests."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from herald_shared.broker import RabbitSettings
from herald_shared.events import (
    Platform,
    PushBatchRequested,
    PushJobsRequested,
    PushRecall,
    PushRequested,
    WebPushKeys,
)
from push_sender.app import PushService
from push_sender.channel import PushChannel
from push_sender.providers import ProviderAnswer, PushProvider
from push_sender.providers.webpush import b64url_encode
from push_sender.registry import make_registry
from push_sender.settings import FcmSettings, PushProviderKind, Settings
from tests.fakes.webpush import Subscription

DEVICE_TOKEN = "fcm-device-token-0123456789-abcdefXYZ123"


def push_job(**overrides: Any) -> PushRequested:
    fields: dict[str, Any] = {
        "notification_id": uuid.uuid4(),
        "message_id": uuid.uuid4(),
        "room_id": uuid.uuid4(),
        "recipient_id": uuid.uuid4(),
        "device_id": uuid.uuid4(),
        "platform": Platform.FCM,
        "token": DEVICE_TOKEN,
        "title": "Alice in general",
        "body": "The secret plan is on",
    }
    fields.update(overrides)
    return PushRequested(**fields)


def webpush_job(subscription: Subscription, **overrides: Any) -> PushRequested:
    values: dict[str, Any] = {
        "platform": Platform.WEB_PUSH,
        "token": subscription.endpoint,
        "web_push_keys": WebPushKeys(**subscription.keys),
    }
    values.update(overrides)
    return push_job(**values)


def write_pem_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """A new P-256 key (a VAPID key), written to `path` as PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return key


def public_key_of(key: ec.EllipticCurvePrivateKey) -> str:
    """The key's public half as an applicationServerKey (uncompressed point, base64url)."""
    return b64url_encode(
        key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
    )


def recall_job(rooms: int = 1, notifications: int = 0, **overrides: Any) -> PushRequested:
    """A recall of `rooms` rooms and `notifications` notifications (listed newest first), as the
    router makes one: no title or body, trigger MESSAGE."""
    recall = PushRecall(
        room_ids=[uuid.uuid4() for _ in range(rooms)],
        notification_ids=[uuid.uuid4() for _ in range(notifications)],
    )
    return push_job(title="", body="", recall=recall, **overrides)


def push_jobs(count: int, **overrides: Any) -> list[PushRequested]:
    """`count` jobs of one message, each to its own device."""
    overrides.setdefault("message_id", uuid.uuid4())
    return [push_job(**overrides) for _ in range(count)]


def jobs_event(*jobs: PushRequested) -> PushJobsRequested:
    """`jobs` (of one platform, of any messages) as the router publishes them."""
    return PushJobsRequested(platform=jobs[0].platform, jobs=list(jobs))


def batch_of(*jobs: PushRequested) -> PushBatchRequested:
    """`jobs` (of one message and platform) as a router of the previous version batched them:
    still accepted."""
    return PushBatchRequested(
        message_id=jobs[0].message_id, platform=jobs[0].platform, jobs=list(jobs)
    )


async def send(service: PushService, *jobs: PushRequested) -> None:
    """Hand `jobs` to the sender as one delivery, as the subscriber does, and raise how the
    delivery ends."""
    await service.sender.deliver(jobs)


def unit_settings(tmp_path: Path, database_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "push_log_file": tmp_path / "pushes.jsonl",
        "rabbitmq": RabbitSettings(retry_delays=(0.2, 0.4, 0.8)),
    }
    values.update(overrides)
    return Settings(**values)


def fcm_settings(
    tmp_path: Path,
    database_url: str,
    *,
    credentials: Path,
    base_url: str,
    timeout: float = 2.0,
    **overrides: Any,
) -> Settings:
    return unit_settings(
        tmp_path,
        database_url,
        push_provider=PushProviderKind.FCM,
        fcm=FcmSettings(credentials_file=credentials, base_url=base_url, timeout=timeout),
        **overrides,
    )


class RecordingProvider:
    """Answers from a script (then `accepted`), and records every job it is asked to send."""

    name = "recording"
    deadline = 5.0

    def __init__(self, *answers: ProviderAnswer) -> None:
        self.sent: list[PushRequested] = []
        self.answers = list(answers)
        self.closed = False

    async def send(self, job: PushRequested) -> ProviderAnswer:
        self.sent.append(job)
        return self.answers.pop(0) if self.answers else ProviderAnswer.accepted()

    async def aclose(self) -> None:
        self.closed = True


def channel_of(service: PushService) -> PushChannel:
    """The sender's push channel (which provider serves which platform)."""
    spec = service.sender.spec
    assert isinstance(spec, PushChannel)
    return spec


def provider_of(service: PushService, platform: Platform = Platform.FCM) -> PushProvider:
    """The provider that serves `platform` in `service` now."""
    return channel_of(service).providers.provider_for(platform)


def use_provider(service: PushService, provider: PushProvider) -> None:
    """From now on, `provider` serves every platform (with a fresh limit and breaker)."""
    channel_of(service).providers = make_registry(
        service.settings, dict.fromkeys(Platform, provider)
    )
