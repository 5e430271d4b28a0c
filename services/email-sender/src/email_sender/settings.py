"""email-sender's configuration: the shared service settings plus the e-mail backend's.

Every variable is a top-level field, so its environment name is the field's name in upper case
(EMAIL_BACKEND, SMTP_HOST, …).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from email import policy
from email.headerregistry import Address
from enum import StrEnum
from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator

from herald_shared.config import LOCAL_STATE_DIR, ServiceSettings, default_sqlite_url

SERVICE_NAME = "email-sender"

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*")


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


class Settings(ServiceSettings):
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
    # Seconds for one whole SMTP conversation (connect to QUIT); also bounds every single step.
    smtp_timeout: float = Field(default=30.0, gt=0)

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
        )

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
