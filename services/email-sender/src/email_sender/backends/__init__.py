"""E-mail backends: `smtp` (aiosmtplib) and `file` (one .eml per e-mail)."""

from __future__ import annotations

from collections.abc import Sequence

from email_sender.backends.base import EmailBackend, EmailRejected
from email_sender.backends.file import FileBackend
from email_sender.backends.smtp import (
    ConnectionLostDuringData,
    SmtpBackend,
    SmtpConfigurationError,
    classify_smtp_error,
)
from email_sender.settings import EmailBackendKind, Settings


def make_backend(settings: Settings) -> EmailBackend:
    if settings.email_backend is EmailBackendKind.SMTP:
        return SmtpBackend(settings.smtp)
    return FileBackend(settings.email_file_dir)


__all__: Sequence[str] = (
    "ConnectionLostDuringData",
    "EmailBackend",
    "EmailRejected",
    "FileBackend",
    "SmtpBackend",
    "SmtpConfigurationError",
    "classify_smtp_error",
    "make_backend",
)
