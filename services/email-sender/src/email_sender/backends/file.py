"""The zero-setup backend: every e-mail becomes `<notification_id>.eml` in a folder."""

from __future__ import annotations

import asyncio
import os
import tempfile
import uuid
from pathlib import Path

from email_sender.rendering import RenderedEmail
from herald_shared.retry import RetryableError


class FileBackend:
    """Writes each message atomically (temporary file in the same folder, fsync, rename), so a
    reader never sees half an e-mail and a second delivery of one notification replaces the
    first instead of adding a file."""

    name = "file"

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path_for(self, notification_id: uuid.UUID) -> Path:
        return self.directory / f"{notification_id}.eml"

    async def send(self, email: RenderedEmail, *, notification_id: uuid.UUID) -> None:
        try:
            await asyncio.to_thread(self._write, self.path_for(notification_id), email.data)
        except OSError as exc:  # a full disk or a missing permission may well be fixed later
            raise RetryableError(f"cannot write e-mail file ({type(exc).__name__})") from None

    async def close(self) -> None:
        """Nothing held open."""

    def _write(self, target: Path, data: bytes) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(
            dir=target.parent, prefix=f".{target.stem}.", suffix=".tmp"
        )
        try:
            with os.fdopen(descriptor, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
