"""E-mail that waits: the decision to wait, and the digest of a window that ended (pure)."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest

from herald_shared.events import (
    MAX_DIGEST_ENTRIES,
    Channel,
    EmailRequested,
    Level,
    RoomKind,
    RoomSettingsSnapshot,
    Trigger,
    notification_id_for,
)
from notification_router.routing import (
    PENDING,
    WAITING,
    MessageChange,
    SkipReason,
    WindowPlan,
    compose_digest,
    decide_for,
)
from tests.support.router_factories import SENT_AT, message_created, recipient

NOW = SENT_AT + timedelta(minutes=2)
GENERAL = uuid.uuid4()
RANDOM = uuid.uuid4()


def waiting_email(
    bob_id: uuid.UUID,
    *,
    room_id: uuid.UUID = GENERAL,
    room_name: str = "general",
    seconds: int = 0,
    content: str = "hello",
    mentions: bool = False,
) -> EmailRequested:
    """Bob's e-mail for a message `seconds` after SENT_AT, as `decide_for` keeps it."""
    bob = recipient(user_id=bob_id, email_delay=120)
    event = message_created(
        recipient_ids=[bob_id],
        room_id=room_id,
        room_name=room_name,
        content=content,
        mentions=[bob_id] if mentions else [],
        timestamp=SENT_AT + timedelta(seconds=seconds),
    )
    job = decide_for(event, bob, now=event.timestamp).waiting_email
    assert job is not None
    return job


def digest(plan: WindowPlan) -> EmailRequested:
    """The one e-mail a window sends."""
    (job,) = plan.jobs
    assert isinstance(job, EmailRequested)
    return job


def test_an_email_delay_makes_the_email_wait_and_leaves_the_push_alone() -> None:
    bob = recipient(email_delay=120, devices=1)
    event = message_created(recipient_ids=[bob.user_id])

    decision = decide_for(event, bob, now=SENT_AT)

    assert (decision.push, decision.email) == (PENDING, WAITING)
    assert decision.email_delay == timedelta(seconds=120)
    assert [type(job).__name__ for job in decision.jobs] == ["PushRequested"]
    assert decision.waiting_email is not None
    assert decision.waiting_email.message_id == event.message_id


def test_without_a_delay_the_email_goes_at_once() -> None:
    bob = recipient(email_delay=0, devices=0)
    decision = decide_for(message_created(recipient_ids=[bob.user_id]), bob, now=SENT_AT)

    assert decision.email == PENDING
    assert decision.waiting_email is None
    assert [type(job).__name__ for job in decision.jobs] == ["EmailRequested"]


def test_a_skipped_email_does_not_wait() -> None:
    bob = recipient(email_delay=120, email_level=Level.NONE)
    decision = decide_for(message_created(recipient_ids=[bob.user_id]), bob, now=SENT_AT)

    assert decision.email == f"skipped:{SkipReason.EMAIL_DISABLED}"
    assert decision.waiting_email is None


def test_a_digest_lists_every_unread_message_oldest_first_to_the_address_of_now() -> None:
    bob = recipient(email="bob@new.example", display_name="Bob", email_delay=120)
    digest_id = uuid.uuid4()
    first = waiting_email(bob.user_id, seconds=1, content="first")
    second = waiting_email(bob.user_id, room_id=RANDOM, room_name="random", seconds=2)
    third = waiting_email(bob.user_id, seconds=3, content="third")

    plan = compose_digest(digest_id, bob, [third, first, second], read_markers={}, now=NOW)
    assert [entry.message_id for entry in digest(plan).digest] == [
        first.message_id,
        second.message_id,
        third.message_id,
    ]
    assert plan.sent == (first.message_id, second.message_id, third.message_id)
    assert plan.cancelled == {}
    assert (digest(plan).to_address, digest(plan).to_name) == ("bob@new.example", "Bob")
    assert digest(plan).message_id == first.message_id  # the top level is the first entry
    assert digest(plan).message_content == "first"
    assert digest(plan).omitted == 0
    assert digest(plan).digest[1].room_name == "random"


def test_a_digest_is_the_same_email_however_often_it_is_composed() -> None:
    bob = recipient(email_delay=120)
    digest_id = uuid.uuid4()
    waiting = [waiting_email(bob.user_id, seconds=1)]

    once = compose_digest(digest_id, bob, waiting, read_markers={}, now=NOW)
    again = compose_digest(digest_id, bob, waiting, read_markers={}, now=NOW + timedelta(1))
    other = compose_digest(uuid.uuid4(), bob, waiting, read_markers={}, now=NOW)
    assert digest(once).notification_id == digest(again).notification_id == digest(once).event_id
    assert digest(other).notification_id != digest(once).notification_id
    # Never the id of the single e-mail the first message would have had.
    assert digest(once).notification_id != notification_id_for(
        message_id=waiting[0].message_id, recipient_id=bob.user_id, channel=Channel.EMAIL
    )


def test_what_was_read_meanwhile_is_left_out_and_a_window_all_read_sends_nothing() -> None:
    bob = recipient(email_delay=120)
    in_general = [waiting_email(bob.user_id, seconds=s) for s in (1, 2, 3)]
    in_random = waiting_email(bob.user_id, room_id=RANDOM, room_name="random", seconds=4)
    read_up_to_second = {GENERAL: in_general[1].sent_at}

    plan = compose_digest(
        uuid.uuid4(), bob, [*in_general, in_random], read_markers=read_up_to_second, now=NOW
    )
    all_read = compose_digest(
        uuid.uuid4(),
        bob,
        in_general,
        read_markers={GENERAL: in_general[2].sent_at},
        now=NOW,
    )

    assert plan.sent == (in_general[2].message_id, in_random.message_id)
    assert plan.cancelled == {
        in_general[0].message_id: SkipReason.READ,
        in_general[1].message_id: SkipReason.READ,
    }
    assert all_read.jobs == ()
    assert all_read.sent == ()
    assert set(all_read.cancelled.values()) == {SkipReason.READ}


@pytest.mark.parametrize(
    ("changed", "mentions", "left_out"),
    [
        ({"email_level": Level.NONE}, False, SkipReason.EMAIL_DISABLED),
        ({"email_level": Level.MENTIONS}, False, SkipReason.LEVEL_MENTIONS),
        ({"email_level": Level.MENTIONS}, True, None),
        (
            {"rooms": [RoomSettingsSnapshot(room_id=GENERAL, muted_until=NOW + timedelta(1))]},
            False,
            SkipReason.MUTED,
        ),
        (
            {"rooms": [RoomSettingsSnapshot(room_id=GENERAL, muted_until=NOW + timedelta(1))]},
            True,
            None,
        ),
        ({"email": None}, False, SkipReason.NO_EMAIL),
        # Unverified while it waited (a bounce too many, a new address): not sent.
        ({"email_verified": False}, True, SkipReason.EMAIL_UNVERIFIED),
    ],
)
def test_settings_changed_since_the_message_apply_when_the_window_ends(
    changed: dict[str, object], mentions: bool, left_out: SkipReason | None
) -> None:
    bob_id = uuid.uuid4()
    waiting = waiting_email(bob_id, mentions=mentions)
    bob_now = recipient(user_id=bob_id, email_delay=120, **changed)

    plan = compose_digest(uuid.uuid4(), bob_now, [waiting], read_markers={}, now=NOW)

    if left_out is None:
        assert plan.sent == (waiting.message_id,)
    else:
        assert plan.jobs == ()
        assert plan.cancelled == {waiting.message_id: left_out}


def test_a_recipient_gone_from_the_projection_gets_nothing() -> None:
    waiting = waiting_email(uuid.uuid4())

    plan = compose_digest(uuid.uuid4(), None, [waiting], read_markers={}, now=NOW)

    assert plan.jobs == ()
    assert plan.cancelled == {waiting.message_id: SkipReason.NO_EMAIL}


def test_a_long_window_lists_the_first_entries_and_counts_the_rest() -> None:
    bob = recipient(email_delay=3600)
    waiting = [waiting_email(bob.user_id, seconds=s) for s in range(MAX_DIGEST_ENTRIES + 7)]

    plan = compose_digest(uuid.uuid4(), bob, waiting, read_markers={}, now=NOW)
    assert len(digest(plan).digest) == MAX_DIGEST_ENTRIES
    assert digest(plan).omitted == 7
    assert len(plan.sent) == MAX_DIGEST_ENTRIES + 7
    assert digest(plan).digest[-1].message_id == waiting[MAX_DIGEST_ENTRIES - 1].message_id


def test_a_digest_keeps_each_entrys_trigger_and_room_kind() -> None:
    bob = recipient(email_delay=120)
    dm = decide_for(
        message_created(recipient_ids=[bob.user_id], room_name="", room_kind=RoomKind.DIRECT),
        bob,
        now=SENT_AT,
    ).waiting_email
    assert dm is not None

    plan = compose_digest(uuid.uuid4(), bob, [dm], read_markers={}, now=NOW)
    assert digest(plan).digest[0].trigger is Trigger.DIRECT
    assert digest(plan).digest[0].room_name == ""


def test_a_deleted_message_is_left_out_and_an_edited_one_tells_its_latest_text() -> None:
    bob = recipient(email_delay=120)
    deleted = waiting_email(bob.user_id, seconds=1, content="oops")
    edited = waiting_email(bob.user_id, seconds=2, content="teh typo")
    kept = waiting_email(bob.user_id, seconds=3, content="as it was")
    changes = {
        deleted.message_id: MessageChange(deleted=True),
        edited.message_id: MessageChange(content="the typo, fixed"),
    }

    plan = compose_digest(
        uuid.uuid4(), bob, [deleted, edited, kept], read_markers={}, now=NOW, changes=changes
    )
    all_deleted = compose_digest(
        uuid.uuid4(),
        bob,
        [deleted],
        read_markers={},
        now=NOW,
        changes={deleted.message_id: MessageChange(deleted=True)},
    )

    assert [entry.message_content for entry in digest(plan).digest] == [
        "the typo, fixed",
        "as it was",
    ]
    assert plan.cancelled == {deleted.message_id: SkipReason.DELETED}
    assert all_deleted.jobs == ()
