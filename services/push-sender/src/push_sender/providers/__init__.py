"""Push providers, one per platform: FCM (Firebase Cloud Messaging HTTP v1) for Android, APNs
for iOS, Web Push for browsers; or `log` (a JSON-lines file) for every platform at once."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from herald_shared.events import Platform
from push_sender.providers.apns import ApnsConfigurationError, ApnsProvider
from push_sender.providers.base import ProviderAnswer, PushProvider, Verdict
from push_sender.providers.fcm import FcmConfigurationError, FcmProvider
from push_sender.providers.log import LogProvider
from push_sender.providers.webpush import WebPushConfigurationError, WebPushProvider
from push_sender.settings import PushProviderKind, Settings

# The settings to check when a provider says our credentials or permissions are wrong.
SETTINGS_HINTS = {
    "fcm": "FCM_CREDENTIALS_FILE, FCM_PROJECT_ID and FCM_BASE_URL",
    "apns": "APNS_KEY_FILE, APNS_KEY_ID, APNS_TEAM_ID, APNS_TOPIC and APNS_BASE_URL",
    "webpush": "the WEBPUSH_* (VAPID) settings",
}


# Sends in flight to one provider at once, per process, unless PUSH_MAX_IN_FLIGHT_<PROVIDER> says
# otherwise: what one HTTP/1.1 connection pool of a busy client typically keeps open.
DEFAULT_MAX_IN_FLIGHT = 100


def max_in_flight(settings: Settings, provider: str) -> int:
    """The provider's concurrency limit: `PUSH_MAX_IN_FLIGHT_<PROVIDER>`, else
    `DEFAULT_MAX_IN_FLIGHT`. Its HTTP client's connection pool is as large, so that a send that
    has its place never waits for a connection (its deadline starts with its place)."""
    limit = getattr(settings.max_in_flight, provider, None)
    return limit if isinstance(limit, int) else DEFAULT_MAX_IN_FLIGHT


def _fcm(settings: Settings) -> PushProvider | None:
    if settings.fcm.credentials_file is None:
        return None
    return FcmProvider.from_settings(settings.fcm, max_connections=max_in_flight(settings, "fcm"))


def _apns(settings: Settings) -> PushProvider | None:
    if settings.apns.key_file is None:
        return None
    return ApnsProvider.from_settings(
        settings.apns, max_connections=max_in_flight(settings, "apns")
    )


def _webpush(settings: Settings) -> PushProvider | None:
    # Configured once its VAPID private key is given.
    if settings.webpush.vapid_private_key_file is None:
        return None
    return WebPushProvider.from_settings(
        settings.webpush, max_connections=max_in_flight(settings, "webpush")
    )


_LIVE: dict[Platform, Callable[[Settings], PushProvider | None]] = {
    Platform.FCM: _fcm,
    Platform.APNS: _apns,
    Platform.WEB_PUSH: _webpush,
}


def make_providers(settings: Settings) -> dict[Platform, PushProvider]:
    """The provider of each platform that has one.

    `PUSH_PROVIDER=log`: the log provider for every platform. Otherwise each platform whose
    settings are given gets its provider, which reads and checks its credentials now, so a bad
    configuration stops the service at start-up; a platform without settings has no provider,
    and its pushes are reported failed as "unsupported platform".
    """
    if settings.push_provider is PushProviderKind.LOG:
        log = LogProvider(settings.push_log_file)
        return dict.fromkeys(Platform, log)
    providers: dict[Platform, PushProvider] = {}
    for platform, make in _LIVE.items():
        provider = make(settings)
        if provider is not None:
            providers[platform] = provider
    return providers


__all__: Sequence[str] = (
    "SETTINGS_HINTS",
    "ApnsConfigurationError",
    "ApnsProvider",
    "FcmConfigurationError",
    "FcmProvider",
    "LogProvider",
    "ProviderAnswer",
    "PushProvider",
    "Verdict",
    "WebPushConfigurationError",
    "WebPushProvider",
    "make_providers",
    "max_in_flight",
)
