"""Signed, expiring unsubscribe tokens: email-sender issues them, message-service verifies them.

A token is `<user id hex>.<expiry, Unix seconds>.<HMAC-SHA256, base64url>`: it carries the
recipient's user id and an expiry, nothing else, and is only URL-safe characters. The HMAC covers
a version label and both fields, so a token cannot be altered or reused for another purpose.
Both services must share one secret, `UNSUBSCRIBE_SECRET`. When it is not set (a zero-setup local
run), both use a random secret kept in `.herald/unsubscribe-secret`, created on first use; that
works only while both services share that folder, and a warning says so. In production set the
same `UNSUBSCRIBE_SECRET` in both (at least 32 characters, e.g. `openssl rand -base64 48`):
without it, each container makes its own secret and every link is refused as invalid (fails
safe: nobody is unsubscribed by a forged link).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import hmac
import logging
import os
import re
import secrets
import tempfile
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, SecretStr

from herald_shared.config import LOCAL_STATE_DIR

logger = logging.getLogger("herald.unsubscribe")

MIN_SECRET_LENGTH = 32
LOCAL_SECRET_FILE = Path(LOCAL_STATE_DIR) / "unsubscribe-secret"

# Domain separation: a MAC made with the same secret for anything else never verifies here.
_LABEL = b"herald.unsubscribe.v1"
_TOKEN = re.compile(r"([0-9a-f]{32})\.([0-9]{1,12})\.([A-Za-z0-9_-]{43})")


class InvalidUnsubscribeToken(ValueError):
    """`reason` is safe to show to the user and to log (it never contains the token)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _long_enough(value: SecretStr | None) -> SecretStr | None:
    if value is not None and len(value.get_secret_value()) < MIN_SECRET_LENGTH:
        raise ValueError(f"UNSUBSCRIBE_SECRET must be at least {MIN_SECRET_LENGTH} characters")
    return value


# The settings field type of `UNSUBSCRIBE_SECRET` in every service that needs it.
UnsubscribeSecret = Annotated[SecretStr | None, AfterValidator(_long_enough)]


class UnsubscribeTokens:
    """Issues and verifies tokens with one key, given or loaded on first use (see
    `unsubscribe_tokens`)."""

    def __init__(self, key: bytes | Callable[[], bytes]) -> None:
        self._load = key if callable(key) else (lambda: key)
        self._key: bytes | None = None

    def issue(self, user_id: uuid.UUID, *, now: datetime, lifetime: timedelta) -> str:
        expires = int((now + lifetime).timestamp())
        payload = f"{user_id.hex}.{expires}"
        return f"{payload}.{self._sign(payload)}"

    def verify(self, token: str, *, now: datetime) -> uuid.UUID:
        """The user id the token was issued for, or `InvalidUnsubscribeToken`: the signature is
        checked before the expiry, so a forged token is never reported as merely expired."""
        match = _TOKEN.fullmatch(token)
        if match is None:
            raise InvalidUnsubscribeToken("malformed unsubscribe link")
        user_hex, expires, signature = match.groups()
        if not hmac.compare_digest(self._sign(f"{user_hex}.{expires}"), signature):
            raise InvalidUnsubscribeToken("invalid unsubscribe link")
        if int(expires) <= now.timestamp():
            raise InvalidUnsubscribeToken("expired unsubscribe link")
        return uuid.UUID(hex=user_hex)

    def _sign(self, payload: str) -> str:
        if self._key is None:
            key = self._load()
            if len(key) < MIN_SECRET_LENGTH:
                raise ValueError("unsubscribe key too short")
            self._key = key
        mac = hmac.new(self._key, _LABEL + b"\x00" + payload.encode("ascii"), hashlib.sha256)
        return base64.urlsafe_b64encode(mac.digest()).rstrip(b"=").decode("ascii")


def unsubscribe_tokens(
    secret: SecretStr | None, *, local_file: Path = LOCAL_SECRET_FILE
) -> UnsubscribeTokens:
    """Tokens signed with the configured secret, or else with the machine-local one (read, or
    created, on first use, so that building a service touches no file)."""
    if secret is not None:
        return UnsubscribeTokens(secret.get_secret_value().encode("utf-8"))
    logger.warning(
        "unsubscribe.local_secret file=%s: UNSUBSCRIBE_SECRET is not set; using a secret kept in"
        " this file, which only works when email-sender and message-service share it. In"
        " production set the same UNSUBSCRIBE_SECRET in both.",
        local_file,
    )
    return UnsubscribeTokens(link_key(secret, local_file=local_file))


def link_key(
    secret: SecretStr | None, *, local_file: Path = LOCAL_SECRET_FILE
) -> bytes | Callable[[], bytes]:
    """The key of the links Herald's e-mails carry: the configured secret, or else a loader of
    the machine-local one. Other links (message-service's e-mail verification) sign with the
    same key under a label of their own, so one secret serves them all."""
    if secret is not None:
        return secret.get_secret_value().encode("utf-8")
    return functools.partial(_local_secret, local_file)


def _local_secret(path: Path) -> bytes:
    try:
        return _read_secret(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written to a private temporary file, then linked into place: link refuses to replace, so
    # two services starting together agree on whichever secret got there first.
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=".unsubscribe-")
    try:
        with os.fdopen(descriptor, "w", encoding="ascii") as file:
            file.write(secrets.token_urlsafe(48))
        with contextlib.suppress(FileExistsError):
            os.link(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)
    return _read_secret(path)


def _read_secret(path: Path) -> bytes:
    value = path.read_text(encoding="ascii").strip().encode("ascii")
    if len(value) < MIN_SECRET_LENGTH:
        raise ValueError(f"{path} holds no usable unsubscribe secret")
    return value
