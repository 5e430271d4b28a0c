"""The router's decisions, table-driven: no broker, no database."""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from herald_shared.events import (
    MAX_ITEMS_PER_EVENT,
    Channel,
    DeliveryOutcome,
    DeviceSnapshot,
    EmailJobsRequested,
    EmailRequested,
    Level,
    MessageCreated,
    Notifiable,
    Platform,
    PushJobsRequested,
    PushRequested,
    RoomKind,
    RoomSettingsSnapshot,
    Trigger,
    UserUpdated,
    WebPushKeys,
    notification_id_for,
)
from herald_shared.text import truncate
from herald_shared.topology import routing_key_for
from notification_router import routing
from notification_router.routing import (
    ContentLimits,
    DeliveryStatus,
    Device,
    Recipient,
    batch_jobs,
    decide_for,
    has_urgent_recipient,
    plan_notifications,
    recipients_of,
    trigger_of,
)
from tests.support.router_factories import (
    NOW,
    invitation_created,
    message_created,
    recipient,
    user_updated,
)

ROOM = uuid.UUID("00000000-0000-0000-0000-00000000000a")
OTHER_ROOM = uuid.UUID("00000000-0000-0000-0000-00000000000b")
USER = uuid.UUID("00000000-0000-0000-0000-000000000001")
OTHER_USER = uuid.UUID("00000000-0000-0000-0000-000000000002")


@dataclass(frozen=True)
class Case:
    muted_room_ids: tuple[uuid.UUID, ...] = ()
    mentioned: bool = False
    push_enabled: bool = True
    email_enabled: bool = True
    devices: int = 1
    email: str | None = "alice@example.com"
    email_verified: bool = True
    expected_push: str = "pending"
    expected_email: str = "pending"
    expected_push_jobs: int = 1
    expected_email_job: bool = True


CASES = {
    "plain": Case(),
    "muted room": Case(
        muted_room_ids=(ROOM,),
        expected_push="skipped:muted",
        expected_email="skipped:muted",
        expected_push_jobs=0,
        expected_email_job=False,
    ),
    "another room muted": Case(muted_room_ids=(OTHER_ROOM,)),
    "mention in muted room still notifies": Case(muted_room_ids=(ROOM,), mentioned=True),
    "mention in unmuted room": Case(mentioned=True),
    "push off": Case(
        push_enabled=False, expected_push="skipped:push_disabled", expected_push_jobs=0
    ),
    "email off": Case(
        email_enabled=False, expected_email="skipped:email_disabled", expected_email_job=False
    ),
    "both off": Case(
        push_enabled=False,
        email_enabled=False,
        expected_push="skipped:push_disabled",
        expected_email="skipped:email_disabled",
        expected_push_jobs=0,
        expected_email_job=False,
    ),
    "no devices": Case(devices=0, expected_push="skipped:no_device", expected_push_jobs=0),
    "no email": Case(email=None, expected_email="skipped:no_email", expected_email_job=False),
    "empty email": Case(email="", expected_email="skipped:no_email", expected_email_job=False),
    # An address its owner has not confirmed is never mailed; the push is not concerned.
    "unverified email": Case(
        email_verified=False, expected_email="skipped:email_unverified", expected_email_job=False
    ),
    "unverified email, mentioned": Case(
        email_verified=False,
        mentioned=True,
        expected_email="skipped:email_unverified",
        expected_email_job=False,
    ),
    "no email beats unverified": Case(
        email=None,
        email_verified=False,
        expected_email="skipped:no_email",
        expected_email_job=False,
    ),
    "muted beats unverified": Case(
        muted_room_ids=(ROOM,),
        email_verified=False,
        expected_push="skipped:muted",
        expected_email="skipped:muted",
        expected_push_jobs=0,
        expected_email_job=False,
    ),
    "several devices": Case(devices=3, expected_push_jobs=3),
    "mention does not override push off": Case(
        muted_room_ids=(ROOM,),
        mentioned=True,
        push_enabled=False,
        expected_push="skipped:push_disabled",
        expected_push_jobs=0,
    ),
    "muted wins over a missing device": Case(
        muted_room_ids=(ROOM,),
        devices=0,
        email=None,
        expected_push="skipped:muted",
        expected_email="skipped:muted",
        expected_push_jobs=0,
        expected_email_job=False,
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_decision_per_channel(case: Case) -> None:
    user = recipient(
        user_id=USER,
        muted_room_ids=case.muted_room_ids,
        push_enabled=case.push_enabled,
        email_enabled=case.email_enabled,
        devices=case.devices,
        email=case.email,
        email_verified=case.email_verified,
    )
    event = message_created(
        recipient_ids=[USER], room_id=ROOM, mentions=[USER] if case.mentioned else []
    )

    decision = decide_for(event, user, now=NOW)

    assert decision.recipient_id == USER
    assert decision.mentioned is case.mentioned
    assert (decision.push, decision.email) == (case.expected_push, case.expected_email)
    assert len(decision.push_jobs) == case.expected_push_jobs
    assert (decision.email_job is not None) is case.expected_email_job
    expected_devices = [d.device_id for d in user.devices] if case.expected_push_jobs else []
    assert [job.device_id for job in decision.push_jobs] == expected_devices
    for job in decision.push_jobs:
        assert job.recipient_id == USER
        assert job.message_id == event.message_id
        assert job.room_id == ROOM
    if decision.email_job is not None:
        assert decision.email_job.to_address == case.email
        assert decision.email_job.to_name == "Alice"
        assert decision.email_job.sender_display_name == "John Doe"
        assert decision.email_job.message_content == event.message_content
        assert decision.email_job.sent_at == event.timestamp


def test_an_address_is_mailed_only_once_verified() -> None:
    assert routing.email_address(recipient(email="a@example.test")) == "a@example.test"
    assert routing.email_address(recipient(email="a@example.test", email_verified=False)) == (
        routing.SkipReason.EMAIL_UNVERIFIED
    )
    assert routing.email_address(recipient(email=None)) == routing.SkipReason.NO_EMAIL
    assert routing.email_address(recipient(email=None, email_verified=False)) == (
        routing.SkipReason.NO_EMAIL
    )
    # A snapshot from a producer older than verification says nothing: its address was mailed.
    legacy = user_updated(email="a@example.test").model_dump(exclude={"email_verified"})
    assert Recipient.from_snapshot(UserUpdated(**legacy)).email_verified


# The precedence table of docs/notifications.md, row by row, on one channel (push; e-mail takes
# the same path with its own level): what the message is to the recipient, their default level,
# their level for the room ("default": none set), whether the room is muted now → the decision.
MUTE_ENDED = NOW - timedelta(seconds=1)
MUTE_RUNS = NOW + timedelta(hours=1)


@dataclass(frozen=True)
class Row:
    trigger: Trigger
    default: Level
    room: Level | None = None
    muted_until: datetime | None = None
    expected: str = "pending"
    named: bool = False  # a direct message that also says @recipient


PRECEDENCE = {
    "all: a direct message": Row(Trigger.DIRECT, Level.ALL),
    "mentions: a direct message": Row(Trigger.DIRECT, Level.MENTIONS),
    "none: not even a direct message": Row(
        Trigger.DIRECT, Level.NONE, expected="skipped:push_disabled"
    ),
    "muted: a direct room muted is silent": Row(
        Trigger.DIRECT, Level.ALL, muted_until=MUTE_RUNS, expected="skipped:muted"
    ),
    "muted: a direct message naming the recipient breaks the mute": Row(
        Trigger.DIRECT, Level.ALL, muted_until=MUTE_RUNS, named=True
    ),
    "all: a plain message": Row(Trigger.MESSAGE, Level.ALL),
    "all: a room-wide mention": Row(Trigger.ROOM_MENTION, Level.ALL),
    "all: a personal mention": Row(Trigger.MENTION, Level.ALL),
    "mentions: a plain message is skipped": Row(
        Trigger.MESSAGE, Level.MENTIONS, expected="skipped:level_mentions"
    ),
    "mentions: a room-wide mention": Row(Trigger.ROOM_MENTION, Level.MENTIONS),
    "mentions: a personal mention": Row(Trigger.MENTION, Level.MENTIONS),
    "none: a plain message": Row(Trigger.MESSAGE, Level.NONE, expected="skipped:push_disabled"),
    "none: not even a personal mention": Row(
        Trigger.MENTION, Level.NONE, expected="skipped:push_disabled"
    ),
    "the room's all beats a default of mentions": Row(Trigger.MESSAGE, Level.MENTIONS, Level.ALL),
    "the room's none beats a default of all": Row(
        Trigger.MENTION, Level.ALL, Level.NONE, expected="skipped:push_disabled"
    ),
    "the room's mentions beats a default of all": Row(
        Trigger.MESSAGE, Level.ALL, Level.MENTIONS, expected="skipped:level_mentions"
    ),
    "muted: a plain message is silent": Row(
        Trigger.MESSAGE, Level.ALL, muted_until=MUTE_RUNS, expected="skipped:muted"
    ),
    "muted: a room-wide mention does not break the mute": Row(
        Trigger.ROOM_MENTION, Level.ALL, muted_until=MUTE_RUNS, expected="skipped:muted"
    ),
    "muted: a personal mention breaks the mute": Row(
        Trigger.MENTION, Level.ALL, muted_until=MUTE_RUNS
    ),
    "muted: a personal mention breaks the mute, not a level of none": Row(
        Trigger.MENTION, Level.NONE, muted_until=MUTE_RUNS, expected="skipped:push_disabled"
    ),
    "muted: the mute is said before the level": Row(
        Trigger.MESSAGE, Level.MENTIONS, muted_until=MUTE_RUNS, expected="skipped:muted"
    ),
    "a mute that has ended silences nothing": Row(
        Trigger.MESSAGE, Level.ALL, muted_until=MUTE_ENDED
    ),
    "all: an invitation": Row(Trigger.INVITATION, Level.ALL),
    "mentions: an invitation": Row(Trigger.INVITATION, Level.MENTIONS),
    "none: not even an invitation": Row(
        Trigger.INVITATION, Level.NONE, expected="skipped:push_disabled"
    ),
    "the room's none (from before the invitee left) beats an invitation": Row(
        Trigger.INVITATION, Level.ALL, Level.NONE, expected="skipped:push_disabled"
    ),
    "muted: an invitation breaks a mute left from before": Row(
        Trigger.INVITATION, Level.MENTIONS, muted_until=MUTE_RUNS
    ),
}


@pytest.mark.parametrize("row", PRECEDENCE.values(), ids=PRECEDENCE.keys())
def test_precedence(row: Row) -> None:
    user = recipient(
        user_id=USER,
        push_level=row.default,
        email_level=Level.NONE,
        rooms=[RoomSettingsSnapshot(room_id=ROOM, push=row.room, muted_until=row.muted_until)],
    )
    event: Notifiable = message_created(
        recipient_ids=[USER],
        room_id=ROOM,
        mentions=[USER] if row.trigger is Trigger.MENTION or row.named else [],
        room_mentioned=row.trigger is Trigger.ROOM_MENTION,
        room_kind=RoomKind.DIRECT if row.trigger is Trigger.DIRECT else RoomKind.GROUP,
    )
    if row.trigger is Trigger.INVITATION:
        event = invitation_created(invitee_id=USER, room_id=ROOM)

    decision = decide_for(event, user, now=NOW)

    assert decision.trigger is row.trigger
    assert decision.push == row.expected
    assert len(decision.push_jobs) == (1 if row.expected == "pending" else 0)
    assert all(job.trigger is row.trigger for job in decision.push_jobs)
    assert decision.email_job is None  # e-mail at none throughout


@pytest.mark.parametrize(
    ("mentions_user", "room_mentioned", "expected"),
    [
        (True, True, Trigger.MENTION),  # a personal mention is the stronger reason
        (True, False, Trigger.MENTION),
        (False, True, Trigger.ROOM_MENTION),
        (False, False, Trigger.MESSAGE),
    ],
)
def test_the_trigger_is_the_strongest_reason(
    mentions_user: bool, room_mentioned: bool, expected: Trigger
) -> None:
    event = message_created(
        recipient_ids=[USER],
        mentions=[USER] if mentions_user else [],
        room_mentioned=room_mentioned,
    )

    assert trigger_of(event, USER) is expected


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (message_created(recipient_ids=[USER], room_kind=RoomKind.DIRECT), True),
        (invitation_created(invitee_id=USER, room_id=ROOM), True),
        (message_created(recipient_ids=[USER, OTHER_USER], mentions=[OTHER_USER]), True),
        (message_created(recipient_ids=[USER], room_mentioned=True), False),
        (message_created(recipient_ids=[USER, OTHER_USER]), False),
    ],
    ids=["direct", "invitation", "mention", "room mention", "chatter"],
)
def test_an_event_has_an_urgent_recipient_exactly_when_a_trigger_of_it_is_urgent(
    event: Notifiable, expected: bool
) -> None:
    assert has_urgent_recipient(event) is expected
    assert expected is any(trigger_of(event, user).urgent for user in recipients_of(event))


def test_levels_are_per_channel_and_per_room() -> None:
    user = recipient(
        user_id=USER,
        push_level=Level.MENTIONS,
        email_level=Level.ALL,
        rooms=[RoomSettingsSnapshot(room_id=OTHER_ROOM, email=Level.NONE)],
    )
    here = decide_for(message_created(recipient_ids=[USER], room_id=ROOM), user, now=NOW)
    there = decide_for(message_created(recipient_ids=[USER], room_id=OTHER_ROOM), user, now=NOW)

    assert (here.push, here.email) == ("skipped:level_mentions", "pending")
    assert here.email_job is not None
    assert here.email_job.trigger is Trigger.MESSAGE
    assert (there.push, there.email) == ("skipped:level_mentions", "skipped:email_disabled")


def test_an_older_snapshot_means_all_or_none_and_mutes_with_no_end() -> None:
    older = recipient(user_id=USER, push_enabled=True, email_enabled=False, muted_room_ids=[ROOM])

    assert (older.push_level, older.email_level) == (Level.ALL, Level.NONE)
    assert older.muted(ROOM, now=datetime(9999, 12, 31, tzinfo=UTC))
    assert not older.muted(OTHER_ROOM, now=NOW)


@pytest.mark.parametrize(
    ("listed", "expected"),
    [
        (["sender", "a", "b"], ["a", "b"]),
        (["a", "sender"], ["a"]),
        (["sender"], []),
        (["a", "b", "a", "b"], ["a", "b"]),
        ([], []),
    ],
    ids=["sender-first", "sender-last", "only-sender", "duplicates", "nobody"],
)
def test_sender_is_excluded_and_each_recipient_decided_once(
    listed: list[str], expected: list[str]
) -> None:
    ids = {name: uuid.uuid4() for name in ("sender", "a", "b")}
    event = message_created(recipient_ids=[ids[n] for n in listed], sender_id=ids["sender"])
    known = {user_id: recipient(user_id=user_id) for user_id in ids.values()}

    plan = plan_notifications(event, known, now=NOW)

    assert recipients_of(event) == tuple(ids[n] for n in expected)
    assert [d.recipient_id for d in plan.decisions] == [ids[n] for n in expected]
    assert plan.missing_recipient_ids == ()


def test_recipients_without_projection_are_reported_missing() -> None:
    known, unknown = uuid.uuid4(), uuid.uuid4()
    event = message_created(recipient_ids=[known, unknown])

    plan = plan_notifications(event, {known: recipient(user_id=known)}, now=NOW)

    assert [d.recipient_id for d in plan.decisions] == [known]
    assert plan.missing_recipient_ids == (unknown,)


def test_notification_ids_are_deterministic_and_distinct() -> None:
    user = recipient(user_id=USER, devices=2)
    event = message_created(recipient_ids=[USER])

    first = decide_for(event, user, now=NOW)
    again = decide_for(event, user, now=NOW.replace(hour=13))

    assert [job.notification_id for job in first.jobs] == [
        job.notification_id for job in again.jobs
    ]
    assert [job.event_id for job in first.jobs] == [job.notification_id for job in first.jobs]
    expected_push = [
        notification_id_for(
            message_id=event.message_id,
            recipient_id=USER,
            channel=Channel.PUSH,
            target=str(device.device_id),
        )
        for device in user.devices
    ]
    assert [job.notification_id for job in first.push_jobs] == expected_push
    assert first.email_job is not None
    assert first.email_job.notification_id == notification_id_for(
        message_id=event.message_id, recipient_id=USER, channel=Channel.EMAIL
    )
    assert len({job.notification_id for job in first.jobs}) == 3
    other_message = message_created(recipient_ids=[USER])
    assert not {job.notification_id for job in decide_for(other_message, user, now=NOW).jobs} & {
        job.notification_id for job in first.jobs
    }


@pytest.mark.parametrize(
    ("room_name", "sender", "content", "expected_title", "expected_body"),
    [
        ("general", "John Doe", "Hello everyone! 👋", "John Doe in general", "Hello everyone! 👋"),
        ("", "John Doe", "hi", "John Doe", "hi"),
        (
            "  team\nroom ",
            "Ann\r\nX",
            "line one\n\nline  two",
            "Ann X in team room",
            "line one line two",
        ),
        ("general", "   ", "hi", "john_doe in general", "hi"),
        ("general", "Bob", "x" * 500, "Bob in general", "x" * 19 + "…"),
        ("r" * 50, "Bob", "hi", "Bob in " + "r" * 12 + "…", "hi"),
    ],
    ids=[
        "room",
        "direct-chat",
        "whitespace-collapsed",
        "blank-display-name",
        "long-body",
        "long-title",
    ],
)
def test_push_title_and_body(
    room_name: str, sender: str, content: str, expected_title: str, expected_body: str
) -> None:
    limits = ContentLimits(title_max_chars=20, body_max_chars=20)
    user = recipient(user_id=USER)
    event = message_created(
        recipient_ids=[USER], room_name=room_name, sender_display_name=sender, content=content
    )

    (job,) = decide_for(event, user, now=NOW, limits=limits).push_jobs

    assert (job.title, job.body) == (expected_title, expected_body)


@pytest.mark.parametrize(
    ("room_name", "sender", "content", "expected_title", "expected_body"),
    [
        (
            "general",
            "Alice",
            "The secret plan",
            "Alice in #general",
            "New message from Alice in #general",
        ),
        ("", "Alice", "The secret plan", "Alice", "New message from Alice"),
        ("#general", "Alice", "x", "Alice in #general", "New message from Alice in #general"),
        (
            "  team\nroom ",
            "Ann\r\nX",
            "x",
            "Ann X in #team room",
            "New message from Ann X in #team room",
        ),
        ("general", "   ", "x", "john_doe in #general", "New message from john_doe in #general"),
        (
            "r" * 50,
            "Bob",
            "x",
            "Bob in #" + "r" * 50,
            "New message from Bob in #" + "r" * 34 + "…",
        ),
    ],
    ids=["room", "direct-chat", "room-name-with-hash", "whitespace", "blank-display-name", "long"],
)
def test_push_content_without_preview_carries_no_text(
    room_name: str, sender: str, content: str, expected_title: str, expected_body: str
) -> None:
    event = message_created(
        recipient_ids=[USER], room_name=room_name, sender_display_name=sender, content=content
    )

    title, body = routing.push_content(
        event, preview=False, limits=ContentLimits(title_max_chars=60, body_max_chars=60)
    )

    assert (title, body) == (expected_title, expected_body)
    assert content not in title + body


def test_push_content_with_preview_is_title_and_text() -> None:
    event = message_created(recipient_ids=[USER], content="The secret plan")
    assert routing.push_content(event, preview=True) == ("John Doe in general", "The secret plan")


def test_the_privacy_setting_reaches_every_push_job() -> None:
    snapshot = user_updated(user_id=USER, devices=2)
    private = snapshot.model_copy(
        update={"preferences": snapshot.preferences.model_copy(update={"push_preview": False})}
    )
    event = message_created(recipient_ids=[USER], content="The secret plan")

    jobs = decide_for(event, Recipient.from_snapshot(private), now=NOW).push_jobs
    previews = decide_for(event, Recipient.from_snapshot(snapshot), now=NOW).push_jobs

    assert [(job.title, job.body) for job in jobs] == [
        ("John Doe in #general", "New message from John Doe in #general")
    ] * 2
    assert {job.body for job in previews} == {"The secret plan"}


@pytest.mark.parametrize(
    ("text", "max_chars", "expected"),
    [
        ("short", 10, "short"),
        ("exactly10!", 10, "exactly10!"),
        ("abcdefghijk", 5, "abcd…"),
        ("hello world", 7, "hello…"),
        ("👋👋👋👋👋👋", 4, "👋👋👋…"),
        ("👍🏽👍🏽👍🏽", 4, "👍🏽…"),  # never strip a skin tone off its emoji
        ("ab👨‍👩‍👧cd", 6, "ab…"),  # a joined family stays whole or goes
        ("🇫🇷🇩🇪🇮🇹", 4, "🇫🇷…"),  # never half a flag
        ("🇫🇷🇩🇪🇮🇹", 5, "🇫🇷🇩🇪…"),
        ("e\u0301e\u0301e\u0301", 4, "e\u0301…"),  # the accent stays on its letter
        ("❤️❤️❤️", 4, "❤️…"),  # variation selector stays with its heart
        ("\u0301" * 10, 5, "…"),  # no boundary at all: nothing but the ellipsis
    ],
    ids=[
        "fits",
        "exact",
        "ascii",
        "trailing-space",
        "emoji",
        "skin-tone",
        "zwj-sequence",
        "flags-odd-cut",
        "flags-even-cut",
        "combining-accent",
        "variation-selector",
        "degenerate",
    ],
)
def test_truncation_keeps_characters_whole(text: str, max_chars: int, expected: str) -> None:
    result = truncate(text, max_chars)

    assert result == expected
    assert len(result) <= max_chars
    assert text.startswith(result.removesuffix("…"))
    result.encode("utf-8")  # always valid text


@pytest.mark.parametrize(
    ("current", "outcome", "replaced"),
    [
        (DeliveryStatus.PENDING, DeliveryOutcome.DELIVERED, True),
        (DeliveryStatus.PENDING, DeliveryOutcome.FAILED, True),
        (DeliveryStatus.FAILED, DeliveryOutcome.DELIVERED, True),
        (DeliveryStatus.FAILED, DeliveryOutcome.FAILED, False),
        (DeliveryStatus.DELIVERED, DeliveryOutcome.FAILED, False),
        (DeliveryStatus.DELIVERED, DeliveryOutcome.DELIVERED, False),
    ],
)
def test_a_report_never_moves_a_final_status_back(
    current: DeliveryStatus, outcome: DeliveryOutcome, replaced: bool
) -> None:
    assert (current in routing.statuses_replaceable_by(outcome)) is replaced


def test_a_push_job_carries_the_device_registration_time_and_web_push_keys() -> None:
    registered = datetime(2026, 1, 20, 8, 30, tzinfo=UTC)
    keys = WebPushKeys(p256dh="BCVxsr7N_eNgVRqvHtD0zTZsEc6", auth="BTBZMqHH6r4Tts7J_aSIgg")
    snapshot = user_updated(user_id=USER, devices=0).model_copy(
        update={
            "devices": [
                DeviceSnapshot(
                    device_id=uuid.uuid4(),
                    platform=Platform.WEB_PUSH,
                    token="https://fcm.googleapis.com/fcm/send/abc",
                    token_updated_at=registered,
                    web_push_keys=keys,
                ),
                DeviceSnapshot(device_id=uuid.uuid4(), platform=Platform.FCM, token="fcm-token"),
            ]
        }
    )
    event = message_created(recipient_ids=[USER], room_id=ROOM)

    decision = decide_for(event, Recipient.from_snapshot(snapshot), now=NOW)

    browser, phone = decision.push_jobs
    assert (browser.platform, browser.token) == (
        Platform.WEB_PUSH,
        "https://fcm.googleapis.com/fcm/send/abc",
    )
    assert (browser.token_updated_at, browser.web_push_keys) == (registered, keys)
    assert (phone.token_updated_at, phone.web_push_keys) == (None, None)


def jobs_of(
    event: MessageCreated, *, pushes: dict[Platform, int] | None = None, emails: int = 0
) -> list[PushRequested | EmailRequested]:
    """The jobs for recipients with one device each (`pushes`: how many per platform) and for
    `emails` recipients with an address and no device."""
    with_device = [
        Recipient(
            user_id=uuid.uuid4(),
            version=1,
            display_name="Someone",
            email=None,
            devices=(Device(device_id=uuid.uuid4(), platform=platform, token="secret-token"),),
        )
        for platform, count in (pushes or {}).items()
        for _ in range(count)
    ]
    with_address = [
        Recipient(user_id=uuid.uuid4(), version=1, display_name="Someone", email="s@example.com")
        for _ in range(emails)
    ]
    return [
        job
        for someone in (*with_device, *with_address)
        for job in decide_for(event, someone, now=NOW).jobs
    ]


def kind(batch: PushJobsRequested | EmailJobsRequested) -> str:
    return str(batch.platform) if isinstance(batch, PushJobsRequested) else "email"


FULL = MAX_ITEMS_PER_EVENT
HALF = MAX_ITEMS_PER_EVENT // 2
FCM, APNS, WEB = Platform.FCM, Platform.APNS, Platform.WEB_PUSH

# (push devices per platform, e-mail recipients) -> [(platform or "email", jobs)] in order
BATCH_CASES: dict[str, tuple[dict[Platform, int], int, list[tuple[str, int]]]] = {
    "nothing to send": ({}, 0, []),
    "one push": ({FCM: 1}, 0, [("fcm", 1)]),
    "one e-mail": ({}, 1, [("email", 1)]),
    "one batch per platform, then the e-mails": (
        {WEB: 1, FCM: 3, APNS: 2},
        4,
        [("apns", 2), ("fcm", 3), ("webpush", 1), ("email", 4)],
    ),
    "exactly full batches": ({FCM: FULL}, FULL, [("fcm", FULL), ("email", FULL)]),
    "one over a full batch": (
        {FCM: FULL + 1},
        FULL + 1,
        [("fcm", FULL), ("fcm", 1), ("email", FULL), ("email", 1)],
    ),
    "chunked per platform": (
        {FCM: 2 * FULL + 1, APNS: FULL + HALF},
        2 * FULL + HALF,
        [
            ("apns", FULL),
            ("apns", HALF),
            ("fcm", FULL),
            ("fcm", FULL),
            ("fcm", 1),
            ("email", FULL),
            ("email", FULL),
            ("email", HALF),
        ],
    ),
}


@pytest.mark.parametrize(
    ("pushes", "emails", "expected"), BATCH_CASES.values(), ids=BATCH_CASES.keys()
)
def test_jobs_are_batched_per_platform_in_chunks(
    pushes: dict[Platform, int], emails: int, expected: list[tuple[str, int]]
) -> None:
    event = message_created(recipient_ids=[])
    jobs = jobs_of(event, pushes=pushes, emails=emails)

    batches = batch_jobs(jobs, now=NOW)

    assert [(kind(batch), len(batch.jobs)) for batch in batches] == expected
    batched = [job.notification_id for batch in batches for job in batch.jobs]
    assert sorted(batched) == sorted(job.notification_id for job in jobs)  # each once
    for batch in batches:
        assert batch.occurred_at == NOW
        assert {job.message_id for job in batch.jobs} == {event.message_id}
        ids = [job.notification_id for job in batch.jobs]
        assert ids == sorted(ids)


def test_batches_depend_on_the_set_of_jobs_not_their_order() -> None:
    event = message_created(recipient_ids=[])
    jobs = jobs_of(event, pushes={FCM: FULL + 3, APNS: 2}, emails=5)

    batches = batch_jobs(jobs, now=NOW)

    assert batch_jobs(random.sample(jobs, len(jobs)), now=NOW) == batches
    assert batch_jobs([*jobs, *jobs], now=NOW) == batches  # a job listed twice, batched once
    # The event id names the batch's jobs: the same jobs, the same id; others, another one.
    assert len({batch.event_id for batch in batches}) == len(batches)
    *pushes, emails = batches
    *same_pushes, fewer_emails = batch_jobs(jobs[:-1], now=NOW)  # one e-mail less
    assert [batch.event_id for batch in same_pushes] == [batch.event_id for batch in pushes]
    assert fewer_emails.event_id != emails.event_id


def test_dms_and_mentions_go_in_the_urgent_lane() -> None:
    alice, bob = uuid.uuid4(), uuid.uuid4()
    chatter = message_created(recipient_ids=[alice, bob], mentions=[bob])
    direct = message_created(recipient_ids=[alice], room_kind=RoomKind.DIRECT)
    users = {user: recipient(user_id=user) for user in (alice, bob)}
    jobs = [
        job
        for event in (chatter, direct)
        for decision in plan_notifications(event, users, now=NOW).decisions
        for job in decision.jobs
    ]

    batches = batch_jobs(jobs, now=NOW)

    lanes = {
        (kind(batch), batch.urgent): sorted(str(job.trigger) for job in batch.jobs)
        for batch in batches
    }
    assert lanes == {
        ("fcm", True): ["dm", "mention"],  # Alice's DM and Bob's mention, ahead
        ("fcm", False): ["message"],  # Alice in the room
        ("email", True): ["dm", "mention"],
        ("email", False): ["message"],
    }
    assert [batch.urgent for batch in batches] == [True, False, True, False]  # urgent first
    assert {routing_key_for(batch) for batch in batches} == {
        "notification.push.send.urgent",
        "notification.push.send",
        "notification.email.send.urgent",
        "notification.email.send",
    }


def test_jobs_of_many_messages_share_an_event_per_platform() -> None:
    """What the router decided for many messages at once goes out in as few events as fit."""
    first, second = message_created(recipient_ids=[]), message_created(recipient_ids=[])
    jobs = [
        *jobs_of(first, pushes={FCM: 2, APNS: 1}, emails=1),
        *jobs_of(second, pushes={FCM: 1}, emails=2),
    ]

    batches = batch_jobs(jobs, now=NOW)

    assert [(kind(batch), len(batch.jobs)) for batch in batches] == [
        ("apns", 1),
        ("fcm", 3),
        ("email", 3),
    ]
    fcm = batches[1]
    assert sorted(job.message_id for job in fcm.jobs) == sorted(
        [first.message_id, first.message_id, second.message_id]
    )
    for batch in batches:
        ids = [job.notification_id for job in batch.jobs]
        assert ids == sorted(ids)


def test_many_messages_above_an_events_size_are_cut_in_full_events_and_the_rest() -> None:
    events = [message_created(recipient_ids=[]) for _ in range(3)]
    jobs = [job for event in events for job in jobs_of(event, pushes={FCM: HALF + 1}, emails=HALF)]

    batches = batch_jobs(jobs, now=NOW)

    assert [(kind(batch), len(batch.jobs)) for batch in batches] == [
        ("fcm", FULL),
        ("fcm", 3 * (HALF + 1) - FULL),
        ("email", FULL),
        ("email", 3 * HALF - FULL),
    ]
    batched = [job.notification_id for batch in batches for job in batch.jobs]
    assert sorted(batched) == sorted(job.notification_id for job in jobs)


def test_an_invitation_is_one_urgent_notification_for_its_invitee_that_says_who_and_where() -> None:
    invitee = recipient(user_id=USER, email_level=Level.MENTIONS)
    event = invitation_created(
        invitee_id=USER, room_id=ROOM, room_name="general", inviter_display_name="Alice"
    )

    plan = plan_notifications(event, {USER: invitee}, now=NOW)

    (decision,) = plan.decisions
    assert decision.trigger is Trigger.INVITATION
    assert not decision.mentioned  # the ledger's `mentioned` is about a message's text
    (push,) = decision.push_jobs
    assert (push.title, push.body) == ("#general", "Alice invited you to #general")
    assert push.message_id == event.invitation_id
    assert decision.email_job is not None
    assert decision.email_job.trigger is Trigger.INVITATION
    assert decision.email_job.message_content == ""
    assert decision.email_job.sender_display_name == "Alice"
    batches = batch_jobs(decision.jobs, now=NOW)
    assert all(batch.urgent for batch in batches)


def test_an_invitation_of_oneself_notifies_nobody() -> None:
    event = invitation_created(invitee_id=USER, inviter_id=USER)

    assert recipients_of(event) == ()


# Presence rows of the table: the room in view silences both channels for any trigger, while a
# stream is open; e-mail waits until the recipient has had no stream for EMAIL_GRACE.
IN_VIEW = routing.Presence(online_until=NOW + timedelta(seconds=30), room_in_view=ROOM)
ELSEWHERE = routing.Presence(online_until=NOW + timedelta(seconds=30), room_in_view=OTHER_ROOM)
JUST_LEFT = routing.Presence(online_until=NOW - timedelta(seconds=59), room_in_view=ROOM)
LONG_GONE = routing.Presence(online_until=NOW - timedelta(seconds=61), room_in_view=ROOM)


@dataclass(frozen=True)
class PresenceRow:
    trigger: Trigger
    presence: routing.Presence | None
    push: str
    email: str
    muted: bool = False


PRESENCE = {
    "offline: both": PresenceRow(Trigger.MENTION, None, "pending", "pending"),
    "the room in view: a mention reached the screen": PresenceRow(
        Trigger.MENTION, IN_VIEW, "skipped:active_in_room", "skipped:active_in_room"
    ),
    "the room in view: a direct message too": PresenceRow(
        Trigger.DIRECT, IN_VIEW, "skipped:active_in_room", "skipped:active_in_room"
    ),
    "another room in view: push, and no e-mail while online": PresenceRow(
        Trigger.MENTION, ELSEWHERE, "pending", "skipped:online"
    ),
    "a stream ended 59 s ago: push, e-mail still waits": PresenceRow(
        Trigger.MENTION, JUST_LEFT, "pending", "skipped:online"
    ),
    "a stream ended 61 s ago (its room no longer in view): both": PresenceRow(
        Trigger.MENTION, LONG_GONE, "pending", "pending"
    ),
    "the level still says first": PresenceRow(
        Trigger.MESSAGE, IN_VIEW, "skipped:level_mentions", "skipped:level_mentions"
    ),
    "the mute still says first": PresenceRow(
        Trigger.ROOM_MENTION, IN_VIEW, "skipped:muted", "skipped:muted", muted=True
    ),
}


@pytest.mark.parametrize("row", PRESENCE.values(), ids=PRESENCE.keys())
def test_presence(row: PresenceRow) -> None:
    user = recipient(
        user_id=USER,
        push_level=Level.MENTIONS,
        email_level=Level.MENTIONS,
        rooms=[RoomSettingsSnapshot(room_id=ROOM, muted_until=MUTE_RUNS if row.muted else None)],
    )
    event = message_created(
        recipient_ids=[USER],
        room_id=ROOM,
        mentions=[USER] if row.trigger is Trigger.MENTION else [],
        room_mentioned=row.trigger is Trigger.ROOM_MENTION,
        room_kind=RoomKind.DIRECT if row.trigger is Trigger.DIRECT else RoomKind.GROUP,
    )

    plan = plan_notifications(
        event, {USER: user}, now=NOW, presence={USER: row.presence} if row.presence else {}
    )

    (decision,) = plan.decisions
    assert (decision.push, decision.email) == (row.push, row.email)
    assert bool(decision.push_jobs) is (row.push == "pending")
    assert (decision.email_job is not None) is (row.email == "pending")


def test_the_email_grace_is_a_setting() -> None:
    user = recipient(user_id=USER, email_level=Level.ALL)
    event = message_created(recipient_ids=[USER], room_id=ROOM)

    decision = decide_for(
        event, user, now=NOW, presence=JUST_LEFT, email_grace=timedelta(seconds=30)
    )

    assert decision.email == "pending"


@pytest.mark.parametrize(
    ("trigger", "read_offset_s", "expected"),
    [
        (Trigger.DIRECT, 0, "skipped:read"),  # read up to this very message
        (Trigger.MENTION, 5, "skipped:read"),  # read past it
        (Trigger.MESSAGE, 5, "skipped:read"),
        (Trigger.MENTION, -1, "pending"),  # read up to an earlier one only
    ],
)
def test_a_message_already_read_notifies_nothing(
    trigger: Trigger, read_offset_s: float, expected: str
) -> None:
    user = recipient(user_id=USER, push_level=Level.ALL, email_level=Level.ALL)
    event = message_created(
        recipient_ids=[USER],
        room_id=ROOM,
        mentions=[USER] if trigger is Trigger.MENTION else [],
        room_kind=RoomKind.DIRECT if trigger is Trigger.DIRECT else RoomKind.GROUP,
    )
    read_up_to = event.timestamp + timedelta(seconds=read_offset_s)

    plan = plan_notifications(event, {USER: user}, now=NOW, read_markers={(USER, ROOM): read_up_to})
    other_room = plan_notifications(
        event, {USER: user}, now=NOW, read_markers={(USER, OTHER_ROOM): read_up_to}
    )

    (decision,) = plan.decisions
    assert (decision.push, decision.email) == (expected, expected)
    assert other_room.decisions[0].push == "pending"  # a marker is per room


def test_an_invitation_is_never_read_away() -> None:
    user = recipient(user_id=USER)
    event = invitation_created(invitee_id=USER, room_id=ROOM)

    decision = decide_for(event, user, now=NOW, read_up_to=event.timestamp)

    assert decision.push == "pending"
