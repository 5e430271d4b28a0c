"""Unsubscribe tokens: what they carry, what they refuse, and the zero-setup local secret."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import BaseModel, SecretStr, ValidationError

from herald_shared.unsubscribe import (
    InvalidUnsubscribeToken,
    UnsubscribeSecret,
    UnsubscribeTokens,
    unsubscribe_tokens,
)

KEY = b"k" * 32
NOW = datetime(2026, 3, 14, 9, 27, tzinfo=UTC)
USER = uuid.UUID("3c4d5e6f-7a8b-4c3d-8e4f-5a6b7c8d9eaf")


def test_a_token_carries_the_user_id_and_expiry_only_and_is_url_safe() -> None:
    token = UnsubscribeTokens(KEY).issue(USER, now=NOW, lifetime=timedelta(days=30))

    user, expires, signature = token.split(".")
    assert user == USER.hex
    assert int(expires) == int((NOW + timedelta(days=30)).timestamp())
    assert len(signature) == 43  # HMAC-SHA256, base64url without padding
    assert all(char.isalnum() or char in "-_." for char in token)


def test_verify_returns_the_user_until_the_expiry() -> None:
    tokens = UnsubscribeTokens(KEY)
    token = tokens.issue(USER, now=NOW, lifetime=timedelta(days=30))

    assert tokens.verify(token, now=NOW + timedelta(days=30, seconds=-1)) == USER
    with pytest.raises(InvalidUnsubscribeToken, match="expired unsubscribe link"):
        tokens.verify(token, now=NOW + timedelta(days=30))


@pytest.mark.parametrize(
    "tamper",
    [
        lambda t: t.replace(USER.hex, uuid.uuid4().hex),  # another user
        lambda t: t.split(".")[0] + ".9999999999." + t.split(".")[2],  # a later expiry
        lambda t: t[:-2] + ("AA" if not t.endswith("AA") else "BB"),  # another signature
    ],
)
def test_a_forged_token_is_invalid_never_merely_expired(tamper: object) -> None:
    tokens = UnsubscribeTokens(KEY)
    assert callable(tamper)
    forged = tamper(tokens.issue(USER, now=NOW, lifetime=timedelta(days=1)))

    with pytest.raises(InvalidUnsubscribeToken, match="invalid unsubscribe link"):
        tokens.verify(forged, now=NOW + timedelta(days=5))


def test_another_secret_does_not_verify() -> None:
    token = UnsubscribeTokens(b"a" * 32).issue(USER, now=NOW, lifetime=timedelta(days=1))
    with pytest.raises(InvalidUnsubscribeToken, match="invalid"):
        UnsubscribeTokens(b"b" * 32).verify(token, now=NOW)


@pytest.mark.parametrize("token", ["", "x", "a.b.c", f"{USER}.1.{'A' * 43}", "é" * 80])
def test_malformed_tokens(token: str) -> None:
    with pytest.raises(InvalidUnsubscribeToken, match="malformed"):
        UnsubscribeTokens(KEY).verify(token, now=NOW)


def test_the_local_secret_is_created_once_private_and_shared(tmp_path: Path) -> None:
    path = tmp_path / "state" / "unsubscribe-secret"
    sender = unsubscribe_tokens(None, local_file=path)
    assert not path.exists()  # building touches no file

    token = sender.issue(USER, now=NOW, lifetime=timedelta(days=1))

    assert path.stat().st_mode & 0o077 == 0
    # Another service on the same machine (a second process reading the same file) verifies it.
    assert unsubscribe_tokens(None, local_file=path).verify(token, now=NOW) == USER


def test_a_configured_secret_wins_over_the_local_file(tmp_path: Path) -> None:
    path = tmp_path / "unsubscribe-secret"
    tokens = unsubscribe_tokens(SecretStr("s" * 32), local_file=path)
    tokens.issue(USER, now=NOW, lifetime=timedelta(days=1))
    assert not path.exists()


class _Settings(BaseModel):
    secret: UnsubscribeSecret = None


def test_a_short_secret_is_refused_without_echoing_it() -> None:
    with pytest.raises(ValidationError) as raised:
        _Settings(secret=SecretStr("short-secret"))
    assert "at least 32 characters" in str(raised.value)
    assert "short-secret" not in str(raised.value)
    assert _Settings(secret=SecretStr("x" * 32)).secret is not None
