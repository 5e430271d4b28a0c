"""push-sender's settings: defaults, environment variables and refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from herald_shared.broker import RabbitSettings
from herald_shared.events import MAX_BATCH_SIZE
from push_sender.providers import max_in_flight
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


def test_a_bulkhead_defaults_to_all_a_consumer_can_have_in_flight() -> None:
    """Every job of every batch the prefetch lets in: one consumer can never fill it."""
    settings = Settings(
        rabbitmq=RabbitSettings(prefetch=7), max_in_flight=MaxInFlightSettings(apns=4)
    )

    assert max_in_flight(settings, "fcm") == 7 * MAX_BATCH_SIZE
    assert max_in_flight(settings, "apns") == 4
