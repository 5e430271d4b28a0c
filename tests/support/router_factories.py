"""Builders of notification-router's inputs, shared by its unit and integration tests."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from herald_shared.events import (
    DeviceSnapshot,
    InvitationCreated,
    Level,
    MessageCreated,
    Platform,
    PreferencesSnapshot,
    QuietHoursSnapshot,
    RoomKind,
    RoomSettingsSnapshot,
    SenderInfo,
    UserUpdated,
)
from notification_router.routing import Recipient

NOW = datetime(2026, 1, 27, 12, 0, 5, tzinfo=UTC)
SENT_AT = datetime(2026, 1, 27, 12, 0, 0, tzinfo=UTC)


def user_updated(
    *,
    user_id: uuid.UUID | None = None,
    version: int = 1,
    display_name: str = "Alice",
    email: str | None = "alice@example.com",
    devices: int | Sequence[uuid.UUID] = 1,
    push_enabled: bool = True,
    email_enabled: bool = True,
    muted_room_ids: Sequence[uuid.UUID] = (),
    push_level: Level | None = None,
    email_level: Level | None = None,
    rooms: Sequence[RoomSettingsSnapshot] = (),
    time_zone: str = "Europe/Paris",
    email_delay: int = 0,
    quiet_hours: QuietHoursSnapshot | None = None,
    snoozed_until: datetime | None = None,
    breakthrough_user_ids: Sequence[uuid.UUID] = (),
    email_verified: bool = True,
) -> UserUpdated:
    """A snapshot as message-service makes it; without levels, as an older one did (the
    booleans only: `all` when on)."""
    user_id = user_id or uuid.uuid4()
    device_ids = (
        [uuid.uuid4() for _ in range(devices)] if isinstance(devices, int) else list(devices)
    )
    return UserUpdated(
        user_id=user_id,
        version=version,
        username=display_name.lower(),
        display_name=display_name,
        email=email,
        devices=[
            DeviceSnapshot(
                device_id=device_id, platform=Platform.FCM, token=f"secret-token-{device_id}"
            )
            for device_id in device_ids
        ],
        preferences=PreferencesSnapshot(
            push_enabled=push_enabled,
            email_enabled=email_enabled,
            muted_room_ids=list(muted_room_ids),
            push=push_level,
            email=email_level,
            rooms=list(rooms),
            email_delay=email_delay,
            quiet_hours=quiet_hours,
            snoozed_until=snoozed_until,
            breakthrough_user_ids=list(breakthrough_user_ids),
        ),
        time_zone=time_zone,
        email_verified=email_verified,
    )


def recipient(**kwargs: Any) -> Recipient:
    return Recipient.from_snapshot(user_updated(**kwargs))


def message_created(
    *,
    recipient_ids: Sequence[uuid.UUID],
    sender_id: uuid.UUID | None = None,
    room_id: uuid.UUID | None = None,
    room_name: str = "general",
    content: str = "Hello everyone! 👋",
    mentions: Sequence[uuid.UUID] = (),
    room_mentioned: bool = False,
    room_kind: RoomKind = RoomKind.GROUP,
    sender_display_name: str = "John Doe",
    timestamp: datetime = SENT_AT,
) -> MessageCreated:
    sender_id = sender_id or uuid.uuid4()
    return MessageCreated(
        message_id=uuid.uuid4(),
        room_id=room_id or uuid.uuid4(),
        room_name=room_name,
        sender_id=sender_id,
        recipient_ids=list(recipient_ids),
        message_content=content,
        sender_info=SenderInfo(
            user_id=sender_id, username="john_doe", display_name=sender_display_name
        ),
        mentions=list(mentions),
        room_mentioned=room_mentioned,
        room_kind=room_kind,
        timestamp=timestamp,
    )


def invitation_created(
    *,
    invitee_id: uuid.UUID,
    inviter_id: uuid.UUID | None = None,
    room_id: uuid.UUID | None = None,
    room_name: str = "general",
    inviter_display_name: str = "Alice",
    timestamp: datetime = SENT_AT,
) -> InvitationCreated:
    inviter_id = inviter_id or uuid.uuid4()
    return InvitationCreated(
        invitation_id=uuid.uuid4(),
        room_id=room_id or uuid.uuid4(),
        room_name=room_name,
        invitee_id=invitee_id,
        inviter=SenderInfo(user_id=inviter_id, username="alice", display_name=inviter_display_name),
        timestamp=timestamp,
    )
