"""email-sender's configuration: the shared service settings plus the e-mail backend's.

Every variable is a top-level field, so its environment name is the field's name in upper case
(EMAIL_BACKEND, SMTP_HOST, …).
"""

from __future__ import annotations

import ipaddress
import re
import uuid
from dataclasses import dataclass
from email import policy
from email.headerregistry import Address
from enum import StrEnum
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator

from herald_shared.config import LOCAL_STATE_DIR, SenderSettings, default_sqlite_url
from herald_shared.unsubscribe import UnsubscribeSecret

SERVICE_NAME = "email-sender"

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*")
_PRINTABLE_NO_SPACE = re.compile(r"[!-~]+")
# What ROOM_URL_TEMPLATE holds where a room's id goes.
ROOM_ID_PLACEHOLDER = "{room_id}"


class EmailBackendKind(StrEnum):
    FILE = "file"  # zero-setup default: one .eml file per e-mail
    SMTP = "smtp"


class SmtpTls(StrEnum):
    NONE = "none"  # plain SMTP (a relay on this machine or network)
    STARTTLS = "starttls"  # plain connection upgraded with STARTTLS; fails if not offered
    TLS = "tls"  # implicit TLS from the first byte ("SMTPS")


DEFAULT_SMTP_PORTS = {SmtpTls.NONE: 25, SmtpTls.STARTTLS: 587, SmtpTls.TLS: 465}


@dataclass(frozen=True)
class SmtpConfig:
    """What the SMTP backend needs, with the port resolved."""

    host: str
    port: int
    username: str | None = None
    password: SecretStr | None = None
    tls: SmtpTls = SmtpTls.NONE
    timeout: float = 30.0
    # The connection pool (see backends/smtp_pool.py).
    pool_size: int = 3
    max_messages_per_connection: int = 100
    max_idle: float = 60.0
    noop_after_idle: float = 5.0


class Settings(SenderSettings):
    port: int = 8003
    database_url: str = default_sqlite_url(SERVICE_NAME)

    email_backend: EmailBackendKind = EmailBackendKind.FILE
    # The file backend's folder: one <notification_id>.eml per e-mail.
    email_file_dir: Path = Path(LOCAL_STATE_DIR) / "emails"
    email_from: str = "Herald <notifications@herald.localhost>"
    # Message-ID: <notification_id@domain>, the same for every attempt of one notification.
    email_message_id_domain: str = "herald.localhost"

    smtp_host: str = "localhost"
    # None: the port of the TLS mode, 25 (none), 587 (starttls) or 465 (tls).
    smtp_port: int | None = Field(default=None, ge=1, le=65535)
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_tls: SmtpTls = SmtpTls.NONE
    # Seconds for one whole send (connecting if needed, MAIL to the end of DATA); also bounds
    # every single step.
    smtp_timeout: float = Field(default=30.0, gt=0)
    # Persistent connections kept open and reused across e-mails, and so the e-mails in flight at
    # once (the others wait for a connection before their deadline starts). A connection is
    # replaced after this many
    # messages (servers cap messages per session) or after this many idle seconds (servers
    # drop idle sessions, RFC 5321 lets them after 5 minutes); one idle longer than
    # SMTP_POOL_NOOP_AFTER seconds is checked with a NOOP before it is used again.
    smtp_pool_size: int = Field(default=3, ge=1, le=100)
    smtp_pool_max_messages: int = Field(default=100, ge=1)
    smtp_pool_max_idle: float = Field(default=60.0, gt=0)
    smtp_pool_noop_after: float = Field(default=5.0, ge=0)

    # List-Unsubscribe (RFC 2369, RFC 8058 one-click): links to message-service's
    # `/unsubscribe?token=…`, signed with UNSUBSCRIBE_SECRET (the same in both services; see
    # herald_shared.unsubscribe) and valid for UNSUBSCRIBE_TOKEN_DAYS days. The e-mail
    # verification links (`/verify-email?token=…`, signed by message-service) use the same base.
    email_unsubscribe_base_url: str = "http://127.0.0.1:8000"
    unsubscribe_secret: UnsubscribeSecret = None
    unsubscribe_token_days: int = Field(default=30, ge=1, le=365)

    # Where the chat shows a room, e.g. https://chat.example.com/rooms/{room_id}: each e-mail
    # links to the rooms it tells of. None (unset, or set empty): the e-mails carry no such link.
    room_url_template: str | None = None

    @property
    def smtp(self) -> SmtpConfig:
        return SmtpConfig(
            host=self.smtp_host,
            port=self.smtp_port
            if self.smtp_port is not None
            else DEFAULT_SMTP_PORTS[self.smtp_tls],
            username=self.smtp_username,
            password=self.smtp_password,
            tls=self.smtp_tls,
            timeout=self.smtp_timeout,
            pool_size=self.smtp_pool_size,
            max_messages_per_connection=self.smtp_pool_max_messages,
            max_idle=self.smtp_pool_max_idle,
            noop_after_idle=self.smtp_pool_noop_after,
        )

    @property
    def verification_url(self) -> str:
        """The endpoint of the e-mail verification links (message-service's, at the same base
        URL as the unsubscribe links); the token is appended as `?token=…`."""
        return f"{self.email_unsubscribe_base_url.rstrip('/')}/verify-email"

    @property
    def unsubscribe_url(self) -> str:
        """The endpoint the links point at; the token is appended as `?token=…`."""
        return f"{self.email_unsubscribe_base_url.rstrip('/')}/unsubscribe"

    @field_validator("email_from")
    @classmethod
    def _one_sender_address(cls, value: str) -> str:
        if "\r" in value or "\n" in value:
            raise ValueError("EMAIL_FROM must be one line")
        header = policy.default.header_factory("From", value)
        addresses: tuple[Address, ...] = getattr(header, "addresses", ())
        if header.defects or len(addresses) != 1 or not addresses[0].domain:
            raise ValueError("EMAIL_FROM must be one address, e.g. 'Herald <notify@example.com>'")
        return value

    @field_validator("email_unsubscribe_base_url")
    @classmethod
    def _http_base_url(cls, value: str) -> str:
        # It ends up in a header: one line, an absolute http(s) URL without query or fragment.
        parts = urlsplit(value)
        if (
            any(char.isspace() or ord(char) < 0x20 for char in value)
            or parts.scheme not in ("http", "https")
            or not parts.netloc
            or parts.query
            or parts.fragment
        ):
            raise ValueError(
                "EMAIL_UNSUBSCRIBE_BASE_URL must be an http(s) URL, e.g. https://herald.example.com"
            )
        return value

    @field_validator("room_url_template", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        # `ROOM_URL_TEMPLATE=` (as a compose file's `${ROOM_URL_TEMPLATE:-}` writes it) means unset.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("room_url_template")
    @classmethod
    def _room_url_template(cls, value: str | None) -> str | None:
        if value is None:
            return None
        # The one placeholder is replaced by a room id (hex and hyphens); any other brace would
        # reach the recipient as it is, so it is a mistake in the template.
        others = value.replace(ROOM_ID_PLACEHOLDER, "")
        try:
            example = urlsplit(value.replace(ROOM_ID_PLACEHOLDER, str(uuid.UUID(int=0))))
            scheme, hostname = example.scheme, example.hostname
        except ValueError:  # e.g. an unclosed "[" of an IPv6 address
            scheme, hostname = "", None
        if (
            ROOM_ID_PLACEHOLDER not in value
            or "{" in others
            or "}" in others
            or not _PRINTABLE_NO_SPACE.fullmatch(value)
            or scheme not in ("http", "https")
            or not hostname
        ):
            raise ValueError(
                "ROOM_URL_TEMPLATE must be an http(s) URL with {room_id} and no other braces,"
                " e.g. https://chat.example.com/rooms/{room_id}"
            )
        return value

    @field_validator("email_message_id_domain")
    @classmethod
    def _domain(cls, value: str) -> str:
        if not _DOMAIN.fullmatch(value):
            raise ValueError("EMAIL_MESSAGE_ID_DOMAIN must be a domain name")
        return value.lower()

    @model_validator(mode="after")
    def _credentials_need_tls(self) -> Settings:
        """A password is never sent in clear text, except to a relay on this machine."""
        if (self.smtp_username is None) != (self.smtp_password is None):
            raise ValueError("SMTP_USERNAME and SMTP_PASSWORD go together")
        if (
            self.smtp_password is not None
            and self.smtp_tls is SmtpTls.NONE
            and not _is_loopback(self.smtp_host)
        ):
            raise ValueError("SMTP credentials need SMTP_TLS=starttls or tls for a remote host")
        return self


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
