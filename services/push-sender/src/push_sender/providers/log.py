"""The zero-setup provider: every push becomes one JSON line in a file (`PUSH_LOG_FILE`).

The line carries what a phone would show (title, body, badge) and the ids, or what a recall takes
off the screen, but only the last characters of the device token: the file is for looking at, not
a token store.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

from herald_shared.events import PushRequested, utc_now
from push_sender.providers.base import ProviderAnswer

TOKEN_SUFFIX_CHARS = 6


def token_hint(token: str) -> str:
    """`…a1b2c3`: enough to tell devices apart when reading the file, useless as a token."""
    if len(token) <= 2 * TOKEN_SUFFIX_CHARS:
        return "…"
    return "…" + token[-TOKEN_SUFFIX_CHARS:]


def log_line(job: PushRequested) -> str:
    return json.dumps(
        {
            "at": utc_now().isoformat(),
            "notification_id": str(job.notification_id),
            "message_id": str(job.message_id),
            "room_id": str(job.room_id),
            "recipient_id": str(job.recipient_id),
            "device_id": str(job.device_id),
            "platform": str(job.platform),
            "token": token_hint(job.token),
            "title": job.title,
            "body": job.body,
            "collapse_id": str(job.notification_id),
            "badge": job.badge,
            "recall": None if job.recall is None else job.recall.model_dump(mode="json"),
        },
        ensure_ascii=False,
    )


class LogProvider:
    name = "log"
    deadline = 10.0

    def __init__(self, path: Path) -> None:
        self.path = path
        # One writer at a time, so concurrent handlers never interleave their lines.
        self._lock = threading.Lock()

    async def send(self, job: PushRequested) -> ProviderAnswer:
        line = log_line(job) + "\n"
        try:
            await asyncio.to_thread(self._append, line)
        except OSError as exc:  # a full disk or a missing permission may well be fixed later
            return ProviderAnswer.transient(f"cannot write push log ({type(exc).__name__})")
        return ProviderAnswer.accepted()

    def _append(self, line: str) -> None:
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as file:
                file.write(line)
                file.flush()

    async def aclose(self) -> None:
        return None
