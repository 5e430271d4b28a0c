"""The opaque cursor of a message page: where the next (older) page starts, as the position of the
last message shown (its creation time and id, the order messages are listed in)."""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from datetime import UTC, datetime


def encode_cursor(created_at: datetime, message_id: uuid.UUID) -> str:
    raw = json.dumps([created_at.isoformat(), str(message_id)], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    """The position `encode_cursor` wrote; ValueError for anything else."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, message_id = json.loads(raw)
        position = datetime.fromisoformat(created_at), uuid.UUID(message_id)
    except (binascii.Error, ValueError, TypeError, AttributeError):
        raise ValueError("invalid cursor") from None
    if position[0].tzinfo is None:
        raise ValueError("invalid cursor")
    try:
        position[0].astimezone(UTC)  # year 1 at +01:00 is no instant a database can hold
    except OverflowError:
        raise ValueError("invalid cursor") from None
    return position
