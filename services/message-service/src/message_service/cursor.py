"""The cursor of a message page: where the next (older) page starts, as the position of the last
message shown (its creation time and id, the order messages are listed in).

It reads `<microseconds since 1970 UTC>_<id as 32 hex digits>`: every text of that form
(`CURSOR_PATTERN`, in the OpenAPI description) is a position a database can hold. Cursors handed
out before that form (base64url of a JSON `[ISO time, id]`) are still read, so that a client
paging through a room across an upgrade is not refused.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import uuid
from datetime import UTC, datetime, timedelta

# At most 16 digits: up to the year 2286, within what Python and the database hold.
CURSOR_PATTERN = r"^[0-9]{1,16}_[0-9a-f]{32}$"
_CURSOR = re.compile(r"([0-9]{1,16})_([0-9a-f]{32})")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def encode_cursor(created_at: datetime, message_id: uuid.UUID) -> str:
    microseconds = (created_at - _EPOCH) // timedelta(microseconds=1)
    return f"{microseconds}_{message_id.hex}"


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    """The position `encode_cursor` wrote (or the older form did); ValueError for anything else."""
    found = _CURSOR.fullmatch(cursor)
    if found is None:
        return _decode_older_cursor(cursor)
    microseconds, message_id = found.groups()
    return _EPOCH + timedelta(microseconds=int(microseconds)), uuid.UUID(hex=message_id)


def _decode_older_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
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
