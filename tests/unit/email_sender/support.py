"""Builders and test doubles for email-sender's unit tests."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any

from email_sender.rendering import EmailRenderer, RenderedEmail, UnsubscribeLinks
from email_sender.settings import Settings
from herald_shared.events import (
    DigestEntry,
    EmailBatchRequested,
    EmailJobsRequested,
    EmailRequested,
)
from herald_shared.retry import RetryableError
from herald_shared.unsubscribe import UnsubscribeTokens

SENDER = "Herald <notifications@herald.localhost>"
DOMAIN = "herald.localhost"
# A test secret (never a real one); both sides of a test must use the same.
UNSUBSCRIBE_SECRET = "test-unsubscribe-secret-0123456789abcdef"
UNSUBSCRIBE_URL = "http://127.0.0.1:8000/unsubscribe"


def unsubscribe_tokens() -> UnsubscribeTokens:
    return UnsubscribeTokens(UNSUBSCRIBE_SECRET.encode())


def renderer(*, room_url_template: str | None = None) -> EmailRenderer:
    """The renderer as the app builds it, with the test secret (and by default, as without a
    ROOM_URL_TEMPLATE, no room links)."""
    return EmailRenderer(
        sender=SENDER,
        message_id_domain=DOMAIN,
        unsubscribe=UnsubscribeLinks(
            url=UNSUBSCRIBE_URL, tokens=unsubscribe_tokens(), lifetime=timedelta(days=30)
        ),
        room_url_template=room_url_template,
    )


GENERAL = uuid.UUID("2b3c4d5e-6f7a-4b2c-9d3e-4f5a6b7c8d9e")
RANDOM = uuid.UUID("4d5e6f7a-8b9c-4d4e-8f5a-6b7c8d9eafb0")
DIRECT = uuid.UUID("5e6f7a8b-9cad-4e5f-9a6b-7c8d9eafb0c1")
# The room names of the rooms above ("" for the direct one), for `digest_entry`.
ROOM_NAMES = {GENERAL: "general", RANDOM: "random", DIRECT: ""}


def email_job(**overrides: Any) -> EmailRequested:
    fields: dict[str, Any] = {
        "notification_id": uuid.UUID("7d4f5a4e-3c1b-4e8a-9f0a-1b2c3d4e5f60"),
        "message_id": uuid.UUID("1a2b3c4d-5e6f-4a1b-8c2d-3e4f5a6b7c8d"),
        "room_id": GENERAL,
        "room_name": "general",
        "recipient_id": uuid.UUID("3c4d5e6f-7a8b-4c3d-8e4f-5a6b7c8d9eaf"),
        "to_address": "bob@example.test",
        "to_name": "Bob",
        "sender_display_name": "Alice",
        "message_content": "Hello everyone!",
        "sent_at": datetime(2026, 3, 14, 9, 26, 53, tzinfo=UTC),
    }
    fields.update(overrides)
    return EmailRequested(**fields)


def digest_entry(
    room_id: uuid.UUID, minute: int, text: str, sender: str = "Alice", **overrides: Any
) -> DigestEntry:
    """A message of room `room_id` sent at 14:`minute` UTC on 14 March 2026."""
    fields: dict[str, Any] = {
        "message_id": uuid.uuid5(uuid.NAMESPACE_URL, f"message-{room_id}-{minute}-{text}"),
        "room_id": room_id,
        "room_name": ROOM_NAMES.get(room_id, ""),
        "sender_display_name": sender,
        "message_content": text,
        "sent_at": datetime(2026, 3, 14, 14, minute, 0, tzinfo=UTC),
    }
    fields.update(overrides)
    return DigestEntry(**fields)


def digest_job(*entries: DigestEntry, omitted: int = 0, **overrides: Any) -> EmailRequested:
    """A digest of `entries` (oldest first) as the router sends it: its top-level message
    fields are those of the first entry."""
    first = entries[0]
    fields: dict[str, Any] = {
        "message_id": first.message_id,
        "room_id": first.room_id,
        "room_name": first.room_name,
        "sender_display_name": first.sender_display_name,
        "message_content": first.message_content,
        "sent_at": first.sent_at,
        "trigger": first.trigger,
        "digest": list(entries),
        "omitted": omitted,
    }
    fields.update(overrides)
    return email_job(**fields)


def reparsed(rendered: RenderedEmail) -> EmailMessage:
    """What a receiving server sees: the bytes parsed."""
    parsed = BytesParser(policy=policy.default).parsebytes(rendered.data)
    assert isinstance(parsed, EmailMessage)
    return parsed


def text_and_html(message: EmailMessage) -> tuple[str, str]:
    """The text and the HTML alternative of a message, decoded."""
    text = message.get_body(preferencelist=("plain",))
    html = message.get_body(preferencelist=("html",))
    assert text is not None
    assert html is not None
    return str(text.get_content()), str(html.get_content())


def email_jobs(*jobs: EmailRequested) -> EmailJobsRequested:
    """The jobs (of any messages) as the router publishes them."""
    return EmailJobsRequested(jobs=list(jobs))


def email_batch(*jobs: EmailRequested) -> EmailBatchRequested:
    """The jobs (of one message) as a router of the previous version batched them: still
    accepted."""
    return EmailBatchRequested(message_id=jobs[0].message_id, jobs=list(jobs))


def other_recipient(number: int) -> EmailRequested:
    """A job of `email_job`'s message for another recipient (`number` tells them apart)."""
    return email_job(
        notification_id=uuid.uuid5(uuid.NAMESPACE_URL, f"notification-{number}"),
        recipient_id=uuid.uuid5(uuid.NAMESPACE_URL, f"recipient-{number}"),
        to_address=f"user{number}@example.test",
        to_name=f"User {number}",
    )


def unit_settings(tmp_path: Path, database_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "email_file_dir": tmp_path / "emails",
        "unsubscribe_secret": UNSUBSCRIBE_SECRET,
    }
    values.update(overrides)
    return Settings(**values)


class RecordingBackend:
    """Records what it is asked to send. `failures` are raised first, one per send, whatever the
    notification; `fail` scripts failures for one notification (raised before those)."""

    name = "recording"

    def __init__(self, *failures: Exception) -> None:
        self.sent: list[tuple[uuid.UUID, RenderedEmail]] = []
        self.attempted: list[uuid.UUID] = []  # every send, failed or not
        self.failures = list(failures)
        self.failures_for: dict[uuid.UUID, list[Exception]] = {}
        self.closed = False

    def fail(self, notification_id: uuid.UUID, *failures: Exception) -> None:
        self.failures_for.setdefault(notification_id, []).extend(failures)

    async def send(self, message: RenderedEmail, *, notification_id: uuid.UUID) -> None:
        self.attempted.append(notification_id)
        scripted = self.failures_for.get(notification_id)
        if scripted:
            raise scripted.pop(0)
        if self.failures:
            raise self.failures.pop(0)
        self.sent.append((notification_id, message))

    @property
    def sent_ids(self) -> list[uuid.UUID]:
        return [notification_id for notification_id, _ in self.sent]

    async def close(self) -> None:
        self.closed = True


def transient() -> RetryableError:
    return RetryableError("smtp 451 4.3.0")
