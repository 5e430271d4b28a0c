"""Quiet hours and Do Not Disturb: when pushes wait, until when (on the user's wall clock,
across daylight-saving changes), who breaks through, and the summaries sent when they end."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from herald_shared.events import (
    Level,
    PushRequested,
    QuietHoursSnapshot,
    RoomKind,
    Trigger,
)
from notification_router.routing import (
    PENDING,
    WAITING,
    HeldPushes,
    MessageChange,
    QuietHours,
    Recipient,
    RoomSettings,
    SkipReason,
    WindowPlan,
    compose_push_summaries,
    decide_for,
    quiet_until,
)
from tests.support.router_factories import message_created, recipient

NIGHT = QuietHoursSnapshot(start="22:00", end="07:00", time_zone="Europe/Paris")
LUNCH = QuietHoursSnapshot(start="12:00", end="13:30", time_zone="Europe/Paris")


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.mark.parametrize(
    ("quiet", "now", "until"),
    [
        # Winter in Paris is UTC+1: 22:00-07:00 local is 21:00-06:00 UTC.
        (NIGHT, "2026-01-15T20:59:00", None),
        (NIGHT, "2026-01-15T21:00:00", "2026-01-16T06:00:00"),
        (NIGHT, "2026-01-16T02:00:00", "2026-01-16T06:00:00"),
        (NIGHT, "2026-01-16T05:59:59", "2026-01-16T06:00:00"),
        (NIGHT, "2026-01-16T06:00:00", None),
        # Summer is UTC+2.
        (NIGHT, "2026-07-15T20:30:00", "2026-07-16T05:00:00"),
        # The night Paris moves its clocks forward (29 March 2026, 02:00 → 03:00): the night
        # began at 22:00 UTC+1 and ends at 07:00 UTC+2, an hour shorter.
        (NIGHT, "2026-03-28T21:30:00", "2026-03-29T05:00:00"),
        # ... and back (25 October 2026, 03:00 → 02:00): an hour longer.
        (NIGHT, "2026-10-24T20:30:00", "2026-10-25T06:00:00"),
        # Hours within one day.
        (LUNCH, "2026-01-15T10:59:00", None),
        (LUNCH, "2026-01-15T11:00:00", "2026-01-15T12:30:00"),
        (LUNCH, "2026-01-15T12:30:00", None),
    ],
)
def test_quiet_hours_end_on_the_users_wall_clock(
    quiet: QuietHoursSnapshot, now: str, until: str | None
) -> None:
    hours = QuietHours.of(quiet)
    assert hours is not None

    assert hours.end_after(utc(now)) == (None if until is None else utc(until))


def new_york(start: str, end: str) -> QuietHoursSnapshot:
    return QuietHoursSnapshot(start=start, end=end, time_zone="America/New_York")


@pytest.mark.parametrize(
    ("quiet", "now", "until"),
    [
        # New York takes its clocks back on 1 November 2026 (02:00 EDT → 01:00 EST, 06:00 UTC):
        # 01:00-02:00 comes twice, at 05:00-06:00 UTC and again at 06:00-07:00 UTC.
        # An end in that hour: at 01:10 of the first pass the night ends at its 01:30 ...
        (new_york("23:00", "01:30"), "2026-11-01T05:10:00", "2026-11-01T05:30:00"),
        (new_york("23:00", "01:30"), "2026-11-01T05:40:00", None),
        # ... and at 01:10 of the second, at the 01:30 still to come, not at the one passed.
        (new_york("23:00", "01:30"), "2026-11-01T06:10:00", "2026-11-01T06:30:00"),
        (new_york("23:00", "01:30"), "2026-11-01T06:30:00", None),
    ],
)
def test_quiet_hours_that_end_in_an_hour_the_clock_goes_through_twice(
    quiet: QuietHoursSnapshot, now: str, until: str | None
) -> None:
    hours = QuietHours.of(quiet)
    assert hours is not None

    assert hours.end_after(utc(now)) == (None if until is None else utc(until))


@pytest.mark.parametrize(
    "time_zone",
    [
        "America",  # a directory of tzdata: IsADirectoryError
        "Europe/",
        "../etc",
        "/etc/localtime",
        "Europe//Paris",
        "zone.tab",  # a file of tzdata that is no zone
        "Nowhere/Special",
    ],
)
def test_a_time_zone_that_cannot_be_loaded_counts_as_utc(time_zone: str) -> None:
    hours = QuietHours.of(QuietHoursSnapshot(start="22:00", end="07:00", time_zone=time_zone))
    assert hours is not None

    assert hours.end_after(utc("2026-01-16T02:00:00")) == utc("2026-01-16T07:00:00")
    assert hours.end_after(utc("2026-01-16T12:00:00")) is None


def test_hours_that_start_and_end_alike_are_none() -> None:
    assert QuietHours.of(QuietHoursSnapshot(start="08:00", end="08:00", time_zone="UTC")) is None
    assert QuietHours.of(None) is None


def test_a_snooze_holds_pushes_until_it_ends_and_the_later_of_both_wins() -> None:
    now = utc("2026-01-16T05:00:00")  # in the night's quiet hours, which end 06:00 UTC
    event = message_created(recipient_ids=[uuid.uuid4()])
    snoozed_long = recipient(quiet_hours=NIGHT, snoozed_until=now + timedelta(hours=3))
    snoozed_short = recipient(quiet_hours=NIGHT, snoozed_until=now + timedelta(minutes=5))
    snooze_over = recipient(snoozed_until=now - timedelta(minutes=1))

    assert quiet_until(snoozed_long, event, now=now) == now + timedelta(hours=3)
    assert quiet_until(snoozed_short, event, now=now) == utc("2026-01-16T06:00:00")
    assert quiet_until(snooze_over, event, now=now) is None


def test_a_snooze_that_ends_in_quiet_hours_holds_pushes_until_they_end_and_the_other_way() -> None:
    event = message_created(recipient_ids=[uuid.uuid4()])
    evening = utc("2026-01-15T20:00:00")  # NIGHT: 22:00-07:00 in Paris, 21:00-06:00 UTC
    into_the_night = recipient(quiet_hours=NIGHT, snoozed_until=utc("2026-01-15T21:30:00"))
    night = utc("2026-01-16T05:00:00")
    into_the_morning = recipient(quiet_hours=NIGHT, snoozed_until=utc("2026-01-16T09:00:00"))

    assert quiet_until(into_the_night, event, now=evening) == utc("2026-01-16T06:00:00")
    assert quiet_until(into_the_morning, event, now=night) == utc("2026-01-16T09:00:00")


def test_a_direct_message_from_a_breakthrough_user_never_waits_anything_else_does() -> None:
    mum = uuid.uuid4()
    bob = recipient(quiet_hours=NIGHT, breakthrough_user_ids=[mum])
    night = utc("2026-01-16T02:00:00")
    from_mum = message_created(
        recipient_ids=[bob.user_id], sender_id=mum, room_kind=RoomKind.DIRECT, room_name=""
    )
    mum_in_a_group = message_created(recipient_ids=[bob.user_id], sender_id=mum)
    from_someone = message_created(
        recipient_ids=[bob.user_id], room_kind=RoomKind.DIRECT, room_name=""
    )

    assert quiet_until(bob, from_mum, now=night) is None
    assert quiet_until(bob, mum_in_a_group, now=night) is not None
    assert quiet_until(bob, from_someone, now=night) is not None


def test_during_quiet_hours_the_pushes_wait_and_the_email_does_not_care() -> None:
    bob = recipient(quiet_hours=NIGHT, devices=2)
    night = utc("2026-01-16T02:00:00")
    event = message_created(recipient_ids=[bob.user_id])

    decision = decide_for(event, bob, now=night)

    assert (decision.push, decision.email) == (WAITING, PENDING)
    assert decision.push_due == utc("2026-01-16T06:00:00")
    assert decision.held_pushes is not None
    assert len(decision.held_pushes.jobs) == 2
    assert decision.held_pushes.room_name == "general"
    assert [type(job).__name__ for job in decision.jobs] == ["EmailRequested"]


def test_a_skipped_push_is_not_held() -> None:
    bob = recipient(quiet_hours=NIGHT, push_level=Level.NONE)
    decision = decide_for(
        message_created(recipient_ids=[bob.user_id]), bob, now=utc("2026-01-16T02:00:00")
    )

    assert decision.push == f"skipped:{SkipReason.PUSH_DISABLED}"
    assert decision.held_pushes is None


ROOM = uuid.uuid4()
OTHER = uuid.uuid4()
NIGHT_NOW = utc("2026-01-16T02:00:00")
MORNING = utc("2026-01-16T06:00:00")


def held(
    bob: Recipient,
    *,
    room_id: uuid.UUID = ROOM,
    room_name: str = "general",
    minute: int = 0,
    mention: bool = False,
    direct: bool = False,
) -> HeldPushes:
    """What Bob's quiet night holds of a message (to the devices `bob` has)."""
    event = message_created(
        recipient_ids=[bob.user_id],
        room_id=room_id,
        room_name="" if direct else room_name,
        room_kind=RoomKind.DIRECT if direct else RoomKind.GROUP,
        mentions=[bob.user_id] if mention else [],
        sender_display_name="Alice",
        content="secret text",
        timestamp=NIGHT_NOW + timedelta(minutes=minute),
    )
    at_night = replace(bob, quiet_hours=QuietHours.of(NIGHT))
    decision = decide_for(event, at_night, now=event.timestamp)
    assert decision.held_pushes is not None
    return decision.held_pushes


def pushes(plan: WindowPlan) -> list[PushRequested]:
    assert all(isinstance(job, PushRequested) for job in plan.jobs)
    return [job for job in plan.jobs if isinstance(job, PushRequested)]


def test_one_summary_per_room_and_device_and_a_lone_message_as_it_was() -> None:
    bob = recipient(devices=2)
    in_general = [held(bob, minute=m) for m in range(12)]
    in_random = held(bob, room_id=OTHER, room_name="random", minute=30)
    window = uuid.uuid4()

    plan = compose_push_summaries(
        window, bob, [in_random, *in_general], read_markers={}, now=MORNING
    )
    again = compose_push_summaries(
        window, bob, [in_random, *in_general], read_markers={}, now=MORNING
    )

    summaries = [job for job in pushes(plan) if job.room_id == ROOM]
    assert sorted(job.device_id for job in summaries) == sorted(d.device_id for d in bob.devices)
    assert {(job.title, job.body) for job in summaries} == {
        ("#general", "12 new messages in #general")
    }
    assert {job.message_id for job in summaries} == {in_general[-1].message_id}
    # The lone message of #random goes as it was held.
    assert [job for job in pushes(plan) if job.room_id == OTHER] == in_random.jobs
    assert len(set(plan.sent)) == 13
    assert [job.notification_id for job in again.jobs] == [
        job.notification_id for job in pushes(plan)
    ]
    assert len({job.notification_id for job in pushes(plan)}) == 4


@pytest.mark.parametrize("direct", [False, True])
def test_previews_turned_off_while_a_push_waited_take_its_text_out(direct: bool) -> None:
    bob = recipient(devices=1)
    waited = held(bob, direct=direct)
    assert "secret text" in waited.jobs[0].body  # previews were on when it was held

    plan = compose_push_summaries(
        uuid.uuid4(), replace(bob, push_preview=False), [waited], read_markers={}, now=MORNING
    )

    where = "Alice" if direct else "Alice in #general"
    assert [(job.title, job.body) for job in pushes(plan)] == [(where, f"New message from {where}")]


def test_a_room_read_meanwhile_is_left_out_and_the_summary_counts_the_rest() -> None:
    bob = recipient(devices=1)
    messages = [held(bob, minute=m) for m in range(5)]

    plan = compose_push_summaries(
        uuid.uuid4(), bob, messages, read_markers={ROOM: messages[2].sent_at}, now=MORNING
    )
    all_read = compose_push_summaries(
        uuid.uuid4(), bob, messages, read_markers={ROOM: messages[-1].sent_at}, now=MORNING
    )

    assert [(job.title, job.body) for job in pushes(plan)] == [
        ("#general", "2 new messages in #general")
    ]
    assert plan.cancelled == {message.message_id: SkipReason.READ for message in messages[:3]}
    assert all_read.jobs == ()
    assert len(all_read.cancelled) == 5


def test_a_direct_rooms_summary_names_the_sender_and_keeps_the_urgent_lane() -> None:
    bob = recipient(devices=1)
    messages = [held(bob, direct=True, minute=m) for m in range(3)]

    plan = compose_push_summaries(uuid.uuid4(), bob, messages, read_markers={}, now=MORNING)

    ((title, body, trigger),) = {(job.title, job.body, job.trigger) for job in pushes(plan)}
    assert (title, body) == ("Alice", "3 new messages from Alice")
    assert trigger is Trigger.DIRECT


@pytest.mark.parametrize(
    ("changed", "mention", "left_out"),
    [
        ({"push_level": Level.NONE}, False, SkipReason.PUSH_DISABLED),
        ({"push_level": Level.MENTIONS}, False, SkipReason.LEVEL_MENTIONS),
        ({"push_level": Level.MENTIONS}, True, None),
        (
            {"rooms": {ROOM: RoomSettings(muted_until=MORNING + timedelta(days=1))}},
            False,
            SkipReason.MUTED,
        ),
        ({"devices": ()}, False, SkipReason.NO_DEVICE),
    ],
)
def test_settings_of_the_morning_apply_to_what_waited(
    changed: dict[str, Any], mention: bool, left_out: SkipReason | None
) -> None:
    bob = recipient(devices=1)
    message = held(bob, mention=mention)
    bob_now = replace(bob, **changed)

    plan = compose_push_summaries(uuid.uuid4(), bob_now, [message], read_markers={}, now=MORNING)

    if left_out is None:
        assert [job.message_id for job in pushes(plan)] == [message.message_id]
    else:
        assert plan.jobs == ()
        assert plan.cancelled == {message.message_id: left_out}


def test_a_lone_held_push_whose_device_is_gone_is_left_out() -> None:
    message = held(recipient(devices=1))
    bob_now = recipient(user_id=message.jobs[0].recipient_id, devices=1)  # another phone

    plan = compose_push_summaries(uuid.uuid4(), bob_now, [message], read_markers={}, now=MORNING)

    assert plan.jobs == ()
    assert plan.cancelled == {message.message_id: SkipReason.NO_DEVICE}
    assert plan.sent == ()


def test_held_pushes_of_a_deleted_message_are_not_sent_an_edited_one_says_the_new_text() -> None:
    bob = recipient(devices=1)
    hidden = replace(bob, push_preview=False)
    deleted = held(bob, minute=1)
    edited = held(bob, room_id=OTHER, room_name="random", minute=2)
    changes = {
        deleted.message_id: MessageChange(deleted=True),
        edited.message_id: MessageChange(content="fixed  text\nfor all"),
    }

    plan = compose_push_summaries(
        uuid.uuid4(), bob, [deleted, edited], read_markers={}, now=MORNING, changes=changes
    )
    hidden_edit = held(hidden, room_id=OTHER, room_name="random", minute=2)
    private = compose_push_summaries(
        uuid.uuid4(),
        hidden,
        [hidden_edit],
        read_markers={},
        now=MORNING,
        changes={hidden_edit.message_id: MessageChange(content="fixed text")},
    )

    assert [job.body for job in pushes(plan)] == ["fixed text for all"]
    assert plan.cancelled == {deleted.message_id: SkipReason.DELETED}
    # Without previews a push never shows text, edited or not.
    assert [job.body for job in pushes(private)] == ["New message from Alice in #random"]
