"""Badges and recalls as pure decisions: what each push's badge says, and what one recall per
device names."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from herald_shared.events import (
    MAX_RECALLED_NOTIFICATIONS,
    MAX_RECALLED_ROOMS,
    InvitationCreated,
    PushRequested,
    SenderInfo,
)
from notification_router.routing import (
    Badge,
    HeldPushes,
    RecalledPushes,
    ShownPush,
    SkipReason,
    WindowPlan,
    compose_push_summaries,
    compose_recalls,
    decide_for,
    unread_badges,
    with_badges,
)
from tests.support.router_factories import message_created, recipient

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


def pushes(plan: WindowPlan) -> list[PushRequested]:
    jobs = [job for job in plan.jobs if isinstance(job, PushRequested)]
    assert len(jobs) == len(plan.jobs)
    return jobs


def test_a_badge_counts_the_unread_messages_up_to_and_with_its_own() -> None:
    bob, carol = uuid.uuid4(), uuid.uuid4()
    room, other = uuid.uuid4(), uuid.uuid4()
    newer = message_created(recipient_ids=[bob, carol], room_id=room, timestamp=NOW)
    older = message_created(
        recipient_ids=[bob, carol], room_id=other, timestamp=NOW - timedelta(seconds=5)
    )
    # Carol already read `other` past the older message (on another device).
    markers = {(carol, other): NOW - timedelta(seconds=1)}
    # The counts once both are in, as recorded.
    totals = {bob: 12, carol: 1}
    rooms = {(bob, room): 5, (bob, other): 1, (carol, room): 1}

    badges = unread_badges([newer, older], totals, rooms, markers)

    assert badges[newer.message_id] == {bob: Badge(12, 5), carol: Badge(1, 1)}
    assert badges[older.message_id] == {bob: Badge(11, 1), carol: Badge(0, 0)}


def test_an_invitation_or_the_senders_own_message_adds_nothing() -> None:
    bob = uuid.uuid4()
    own = message_created(recipient_ids=[bob], sender_id=bob)
    invitation = InvitationCreated(
        invitation_id=uuid.uuid4(),
        room_id=uuid.uuid4(),
        room_name="design",
        invitee_id=bob,
        inviter=SenderInfo(user_id=uuid.uuid4(), username="alice", display_name="Alice"),
        timestamp=NOW,
    )

    badges = unread_badges([own, invitation], {bob: 3}, {}, {})

    assert badges[own.message_id] == {}
    assert badges[invitation.message_id] == {bob: Badge(3, 0)}


def test_every_device_push_gets_the_badge_and_the_decision_says_whether_it_is_unread() -> None:
    bob = recipient(devices=2)
    message = message_created(recipient_ids=[bob.user_id], timestamp=NOW)

    unread = decide_for(message, bob, now=NOW)
    already_read = decide_for(message, bob, now=NOW, read_up_to=NOW)
    stamped = with_badges(
        [*unread.jobs, *with_badges(unread.jobs, {})],
        {message.message_id: {bob.user_id: Badge(7, 2)}},
    )

    pushes = [job for job in stamped if isinstance(job, PushRequested)]
    assert [(job.badge, job.room_unread) for job in pushes] == [(7, 2)] * 4
    emails = [job for job in stamped if not isinstance(job, PushRequested)]
    assert len(emails) == 2  # e-mails have no badge, and are left as they are
    assert all(job.badge is None for job in unread.push_jobs)  # not known when decided
    assert unread.unread
    assert not already_read.unread
    assert already_read.push_jobs == ()


def shown(
    room_id: uuid.UUID, devices: list[uuid.UUID], *, seconds: float
) -> tuple[RecalledPushes, dict[uuid.UUID, uuid.UUID]]:
    """A message's pushes to `devices`, and their notification ids by device."""
    ids = {device: uuid.uuid4() for device in devices}
    entry = RecalledPushes(
        message_id=uuid.uuid4(),
        room_id=room_id,
        sent_at=NOW + timedelta(seconds=seconds),
        pushes=[ShownPush(notification_id=ids[device], device_id=device) for device in devices],
    )
    return entry, ids


def test_one_recall_per_device_names_its_rooms_and_notifications_newest_first() -> None:
    bob = recipient(devices=2)
    phone, tablet = (device.device_id for device in bob.devices)
    general, random = uuid.uuid4(), uuid.uuid4()
    old, old_ids = shown(general, [phone, tablet], seconds=1)
    new, new_ids = shown(random, [phone], seconds=2)
    window = uuid.uuid4()

    plan = compose_recalls(window, bob, [old, new], badge=4, now=NOW)

    by_device = {job.device_id: job for job in pushes(plan)}
    assert set(by_device) == {phone, tablet}
    phone_recall = by_device[phone].recall
    assert phone_recall is not None
    assert phone_recall.room_ids == [random, general]
    assert phone_recall.notification_ids == [new_ids[phone], old_ids[phone]]
    tablet_recall = by_device[tablet].recall
    assert tablet_recall is not None
    assert tablet_recall.room_ids == [general]
    assert all(job.badge == 4 and job.urgent and job.title == "" for job in pushes(plan))
    # The newest message recalled is the job's: its ledger row carries the recall's delivery.
    assert by_device[phone].message_id == new.message_id
    assert sorted(plan.sent) == sorted([old.message_id, new.message_id])
    # Composed again (a dispatcher that stopped before marking it): the same recalls.
    again = compose_recalls(window, bob, [new, old], badge=4, now=NOW)
    assert {job.notification_id for job in again.jobs} == {job.notification_id for job in plan.jobs}


def test_a_recall_goes_only_to_devices_the_user_still_has() -> None:
    bob = recipient(devices=1)
    (phone,) = (device.device_id for device in bob.devices)
    gone = uuid.uuid4()
    on_phone, _ = shown(uuid.uuid4(), [phone, gone], seconds=1)
    only_gone, _ = shown(uuid.uuid4(), [gone], seconds=2)

    plan = compose_recalls(uuid.uuid4(), bob, [on_phone, only_gone], badge=0, now=NOW)

    assert [job.device_id for job in pushes(plan)] == [phone]
    assert plan.sent == (on_phone.message_id,)
    assert plan.cancelled == {only_gone.message_id: SkipReason.NO_DEVICE}
    nobody = compose_recalls(uuid.uuid4(), None, [on_phone], badge=0, now=NOW)
    assert nobody.jobs == ()
    assert nobody.cancelled == {on_phone.message_id: SkipReason.NO_DEVICE}
    no_devices = compose_recalls(
        uuid.uuid4(), replace(bob, devices=()), [on_phone], badge=0, now=NOW
    )
    assert no_devices.jobs == ()


def test_a_recall_of_many_rooms_keeps_the_newest_within_the_limits() -> None:
    bob = recipient(devices=1)
    (phone,) = (device.device_id for device in bob.devices)
    entries = [
        shown(uuid.uuid4(), [phone], seconds=index)[0] for index in range(MAX_RECALLED_ROOMS + 10)
    ]

    (job,) = pushes(compose_recalls(uuid.uuid4(), bob, entries, badge=0, now=NOW))

    assert job.recall is not None
    newest_first = sorted(entries, key=lambda entry: entry.sent_at, reverse=True)
    assert job.recall.room_ids == [entry.room_id for entry in newest_first][:MAX_RECALLED_ROOMS]
    assert (
        job.recall.notification_ids
        == [entry.pushes[0].notification_id for entry in newest_first][:MAX_RECALLED_NOTIFICATIONS]
    )


def test_pushes_held_for_quiet_hours_carry_the_badge_of_when_they_go() -> None:
    bob = recipient(devices=1)
    room = uuid.uuid4()
    held = []
    for seconds in (0, 1):
        message = message_created(
            recipient_ids=[bob.user_id], room_id=room, timestamp=NOW + timedelta(seconds=seconds)
        )
        decision = decide_for(message, bob, now=NOW)
        held.append(
            HeldPushes(
                message_id=message.message_id,
                room_id=room,
                room_name="general",
                sender_display_name="Alice",
                sent_at=message.timestamp,
                trigger=decision.trigger,
                jobs=list(decision.push_jobs),
            )
        )

    one = compose_push_summaries(uuid.uuid4(), bob, held[:1], read_markers={}, now=NOW, badge=9)
    summary = compose_push_summaries(uuid.uuid4(), bob, held, read_markers={}, now=NOW, badge=9)

    assert [job.badge for job in pushes(one)] == [9]
    assert [job.badge for job in pushes(summary)] == [9]
