"""Push providers: `log` (a JSON-lines file) and `fcm` (Firebase Cloud Messaging HTTP v1)."""

from __future__ import annotations

from collections.abc import Sequence

from push_sender.providers.base import ProviderAnswer, PushProvider, Verdict
from push_sender.providers.fcm import FcmConfigurationError, FcmProvider
from push_sender.providers.log import LogProvider
from push_sender.settings import PushProviderKind, Settings


def make_provider(settings: Settings) -> PushProvider:
    """The provider `PUSH_PROVIDER` selects; FCM reads and checks its credentials file now, so a
    bad configuration stops the service at start-up."""
    if settings.push_provider is PushProviderKind.FCM:
        # One connection per in-flight message is all a consumer can use.
        return FcmProvider.from_settings(settings.fcm, max_connections=settings.rabbitmq.prefetch)
    return LogProvider(settings.push_log_file)


__all__: Sequence[str] = (
    "FcmConfigurationError",
    "FcmProvider",
    "LogProvider",
    "ProviderAnswer",
    "PushProvider",
    "Verdict",
    "make_provider",
)
