"""push-sender's settings: defaults, environment variables and refusals."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError

from herald_shared.broker import RabbitSettings
from herald_shared.sending import SenderTuning
from push_sender.providers import DEFAULT_MAX_IN_FLIGHT, max_in_flight
from push_sender.settings import MaxInFlightSettings, PushProviderKind, Settings


def test_defaults_need_no_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PUSH_PROVIDER", "PUSH_LOG_FILE", "PORT", "DATABASE_URL", "FCM_BASE_URL"):
        monkeypatch.delenv(name, raising=False)

    settings = Settings()

    assert settings.port == 8002
    assert settings.database_url == "sqlite+aiosqlite:///.herald/push-sender.db"
    assert settings.push_provider is PushProviderKind.LOG
    assert settings.push_log_file == Path(".herald/pushes.jsonl")
    assert settings.fcm.base_url == "https://fcm.googleapis.com"
    assert settings.fcm.project_id is None
    assert settings.fcm.timeout == 10.0


def test_fcm_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PUSH_PROVIDER", "fcm")
    monkeypatch.setenv("FCM_CREDENTIALS_FILE", str(tmp_path / "sa.json"))
    monkeypatch.setenv("FCM_PROJECT_ID", "herald-prod")
    monkeypatch.setenv("FCM_BASE_URL", "http://127.0.0.1:9999/")
    monkeypatch.setenv("FCM_TIMEOUT", "2.5")

    settings = Settings()

    assert settings.push_provider is PushProviderKind.FCM
    assert settings.fcm.credentials_file == tmp_path / "sa.json"
    assert settings.fcm.project_id == "herald-prod"
    assert settings.fcm.base_url == "http://127.0.0.1:9999"
    assert settings.fcm.timeout == 2.5


def test_fcm_needs_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FCM_CREDENTIALS_FILE", raising=False)
    monkeypatch.setenv("PUSH_PROVIDER", "fcm")
    with pytest.raises(ValidationError, match="FCM_CREDENTIALS_FILE"):
        Settings()


@pytest.mark.parametrize(
    "url", ["http://fcm.example.com", "ftp://127.0.0.1", "not a url", "http://10.0.0.5:8080"]
)
def test_access_tokens_never_travel_in_clear_text(
    monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    monkeypatch.setenv("FCM_BASE_URL", url)
    with pytest.raises(ValidationError, match="FCM_BASE_URL"):
        Settings()


def test_live_providers_and_their_guards_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PUSH_PROVIDER", "live")
    monkeypatch.setenv("PUSH_BREAKER_FAILURES", "7")
    monkeypatch.setenv("PUSH_BREAKER_COOL_DOWN", "12.5")
    monkeypatch.setenv("PUSH_MAX_IN_FLIGHT_APNS", "4")

    settings = Settings()

    assert settings.push_provider is PushProviderKind.LIVE
    assert (settings.breaker.failures, settings.breaker.cool_down) == (7, 12.5)
    assert settings.max_in_flight.apns == 4
    assert settings.max_in_flight.fcm is None  # the default


def test_a_providers_concurrency_limit_defaults_to_a_connection_pool_whatever_the_prefetch() -> (
    None
):
    """A limit that waits, not a bulkhead that refuses: it no longer grows with the prefetch."""
    settings = Settings(
        rabbitmq=RabbitSettings(prefetch=7), max_in_flight=MaxInFlightSettings(apns=4)
    )

    assert max_in_flight(settings, "fcm") == DEFAULT_MAX_IN_FLIGHT == 100
    assert max_in_flight(settings, "apns") == 4
    assert max_in_flight(Settings(rabbitmq=RabbitSettings(prefetch=70)), "fcm") == 100


def test_batching_and_the_delivery_lease_tune_the_sender(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().sender_tuning() == SenderTuning(
        max_jobs_per_batch=1000,
        concurrent_batches=2,
        linger=0.025,
        lease=timedelta(seconds=5),
        max_jobs_held=1000,
    )
    monkeypatch.setenv("BATCH_MAX_ITEMS", "50")
    monkeypatch.setenv("BATCH_CONCURRENCY", "3")
    monkeypatch.setenv("BATCH_LINGER", "0")
    monkeypatch.setenv("DELIVERY_LEASE", "30")
    monkeypatch.setenv("DELIVERY_MAX_JOBS", "2000")

    tuning = Settings().sender_tuning()

    assert tuning == SenderTuning(
        max_jobs_per_batch=50,
        concurrent_batches=3,
        linger=0.0,
        lease=timedelta(seconds=30),
        max_jobs_held=2000,
    )
    assert tuning.renew_every == 6.0


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("BATCH_MAX_ITEMS", "0"),
        ("BATCH_CONCURRENCY", "0"),
        ("BATCH_LINGER", "-1"),
        ("BATCH_LINGER", "2"),
        ("DELIVERY_LEASE", "0.5"),
        ("DELIVERY_MAX_JOBS", "499"),  # less than one delivery can carry
    ],
)
def test_batching_and_lease_settings_out_of_range_are_refused(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        Settings()
