"""Signed, expiring e-mail verification tokens: message-service issues them (in the
`EmailVerificationRequested` it stages) and verifies them when the link is followed.

A token is `<user id hex>.<expiry, Unix seconds>.<HMAC-SHA256, base64url>`, URL-safe. The HMAC
covers a label of its own (`herald.email-verification.v1`), both fields and the SHA-256 of the
address the link was sent to, so a token verifies only for that user *and* that address: once the
user changes their address, every earlier link is refused, without anything stored per link. The
address itself is not in the token (a link forwarded or logged by a mail filter shows no more
than a user id).

The key is the e-mail links' secret, `UNSUBSCRIBE_SECRET` (or the machine-local one:
`herald_shared.unsubscribe.link_key`). The label keeps the two kinds apart: an unsubscribe token
never verifies an address, and a verification token never unsubscribes anyone, although both
have the same shape. Only message-service signs and checks these, so a deployment whose
services do not share the secret still verifies addresses.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from pydantic import SecretStr
from sqlmodel.ext.asyncio.session import AsyncSession

from herald_shared.events import EmailVerificationRequested, address_digest
from herald_shared.unsubscribe import LOCAL_SECRET_FILE, MIN_SECRET_LENGTH, link_key
from message_service import repository
from message_service.models import User

# Domain separation: a MAC made with the same secret for anything else never verifies here.
_LABEL = b"herald.email-verification.v1"
_TOKEN = re.compile(r"([0-9a-f]{32})\.([0-9]{1,12})\.([A-Za-z0-9_-]{43})")


class InvalidVerificationToken(ValueError):
    """`reason` is safe to show to the user and to log (it never contains the token)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class EmailVerificationTokens:
    """Issues and verifies tokens with one key, given or loaded on first use."""

    def __init__(self, key: bytes | Callable[[], bytes]) -> None:
        self._load = key if callable(key) else (lambda: key)
        self._key: bytes | None = None

    def issue(self, user_id: uuid.UUID, address: str, *, expires_at: datetime) -> str:
        payload = f"{user_id.hex}.{int(expires_at.timestamp())}"
        return f"{payload}.{self._sign(payload, address)}"

    @staticmethod
    def user_of(token: str) -> uuid.UUID:
        """The user a well-formed token names, before anything is checked: whose address to
        check it against (`verify`)."""
        match = _TOKEN.fullmatch(token)
        if match is None:
            raise InvalidVerificationToken("malformed verification link")
        return uuid.UUID(hex=match.group(1))

    def verify(self, token: str, *, address: str, now: datetime) -> uuid.UUID:
        """The user id the token was issued for, if it was issued for `address` (the user's
        address now) and has not expired; else `InvalidVerificationToken`. The signature is
        checked before the expiry, so a forged token is never reported as merely expired; a
        link sent to an earlier address of the user's is refused like a forged one (the two
        cannot be told apart without storing links)."""
        match = _TOKEN.fullmatch(token)
        if match is None:
            raise InvalidVerificationToken("malformed verification link")
        user_hex, expires, signature = match.groups()
        if not hmac.compare_digest(self._sign(f"{user_hex}.{expires}", address), signature):
            raise InvalidVerificationToken(
                "this verification link is not valid for your current e-mail address"
            )
        if int(expires) <= now.timestamp():
            raise InvalidVerificationToken("expired verification link")
        return uuid.UUID(hex=user_hex)

    def _sign(self, payload: str, address: str) -> str:
        if self._key is None:
            key = self._load()
            if len(key) < MIN_SECRET_LENGTH:
                raise ValueError("verification key too short")
            self._key = key
        message = _LABEL + b"\x00" + f"{payload}.{address_digest(address)}".encode("ascii")
        mac = hmac.new(self._key, message, hashlib.sha256)
        return base64.urlsafe_b64encode(mac.digest()).rstrip(b"=").decode("ascii")


def email_verification_tokens(
    secret: SecretStr | None, *, local_file: Path = LOCAL_SECRET_FILE
) -> EmailVerificationTokens:
    """Tokens signed with UNSUBSCRIBE_SECRET, or else with the machine-local secret (read, or
    created, on first use)."""
    return EmailVerificationTokens(link_key(secret, local_file=local_file))


# --- the policy and its decisions ---------------------------------------------------------------


@dataclass(frozen=True)
class EmailVerification:
    """How addresses are verified (message-service's settings, docs/configuration.md)."""

    tokens: EmailVerificationTokens
    # False (`EMAIL_VERIFICATION=false`): a new or changed address counts as verified at once
    # and no verification e-mail is sent, for operators who verify addresses elsewhere.
    enabled: bool = True
    # At most one verification e-mail per address in this long (`EMAIL_VERIFICATION_INTERVAL`).
    interval: timedelta = timedelta(minutes=10)
    # How long a link stays valid (`EMAIL_VERIFICATION_TOKEN_HOURS`).
    lifetime: timedelta = timedelta(hours=24)
    # Hard bounces after which a verified address is verified no more (`EMAIL_BOUNCE_LIMIT`).
    bounce_limit: int = 3


def address_key(address: str) -> str:
    """What the per-address limit counts by: the SHA-256 of the address in lower case, so that
    writing it in other capitals (which reaches the same mailbox everywhere that matters) does
    not earn another e-mail."""
    return address_digest(address.strip().casefold())


def retry_after_seconds(last_sent_at: datetime, *, now: datetime, interval: timedelta) -> int:
    """Whole seconds until the address may be sent another verification e-mail (at least 1)."""
    return max(1, math.ceil((last_sent_at + interval - now).total_seconds()))


def bounces_unverify(hard_bounces: int, *, limit: int) -> bool:
    """Whether an address with this many hard bounces since its verification is no longer to
    be trusted with e-mail."""
    return hard_bounces >= limit


def verification_request(
    user: User, verification: EmailVerification, *, now: datetime
) -> EmailVerificationRequested:
    """The event that has email-sender mail the user's address its link."""
    expires_at = now + verification.lifetime
    return EmailVerificationRequested(
        occurred_at=now,
        verification_id=uuid.uuid4(),
        user_id=user.id,
        to_address=user.email,
        to_name=user.display_name,
        token=verification.tokens.issue(user.id, user.email, expires_at=expires_at),
        expires_at=expires_at,
    )


async def request_verification(
    session: AsyncSession, user: User, verification: EmailVerification, *, now: datetime
) -> datetime | None:
    """Stage a verification e-mail to the user's address in the caller's transaction, unless one
    went to that address within the interval: None when staged, else when the last one went."""
    last = await repository.claim_verification_send(
        session, address_key=address_key(user.email), now=now, interval=verification.interval
    )
    if last is not None:
        return last
    event = verification_request(user, verification, now=now)
    repository.add_outbox_event(session, event=event, event_type=event.type)
    return None


async def address_set(
    session: AsyncSession, user: User, verification: EmailVerification, *, now: datetime
) -> None:
    """A user's address is new (registration, or changed): it starts unverified, with no
    bounces, and its verification e-mail is staged (subject to the per-address limit: a
    registration or change goes through all the same, and the user may ask again later). With
    verification off, it is verified at once. The caller stages the user's snapshot."""
    user.email_hard_bounces = 0
    if not verification.enabled:
        user.email_verified_at = now
        return
    user.email_verified_at = None
    await request_verification(session, user, verification, now=now)
