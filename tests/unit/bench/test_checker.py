"""The benchmark's checker: complete, lost and not drained notifications, repeats, strays."""

from __future__ import annotations

import uuid

import pytest

from bench.checker import EmailRecord, PushRecord, Tally, classify
from bench.load import BenchUser, Population, Posted, Room


def email_id(message_id: uuid.UUID, recipient_id: uuid.UUID) -> uuid.UUID:
    return uuid.uuid5(uuid.NAMESPACE_URL, f"{message_id}:{recipient_id}:email")


def population(room_size: int = 3, email: tuple[int, ...] = (2,)) -> Population:
    users = tuple(
        BenchUser(
            index=i,
            id=uuid.uuid4(),
            username=f"user{i}",
            token=f"api-{i}",
            device_id=uuid.uuid4(),
            device_token=f"device-{i}",
            email=f"user{i}@bench.example",
            email_enabled=i in email,
        )
        for i in range(room_size)
    )
    return Population(users=users, rooms=(Room(id=uuid.uuid4(), members=tuple(range(room_size))),))


def posted(index: int = 0, sender: int = 0, at: float = 100.0) -> Posted:
    return Posted(
        index=index,
        message_id=uuid.uuid4(),
        room=0,
        sender=sender,
        accepted_at=at,
        request_seconds=0.01,
    )


def push(message: Posted, user: int, at: float) -> PushRecord:
    return PushRecord(
        at, f"n-{message.message_id}-{user}", str(message.message_id), f"device-{user}"
    )


def email(people: Population, message: Posted, user: int, at: float) -> EmailRecord:
    notification = email_id(message.message_id, people.users[user].id)
    return EmailRecord(at, f"<{notification}@bench.example>", (people.users[user].email,))


def tally_of(people: Population) -> Tally:
    return Tally(people, email_notification_id=email_id)


def deliver_all(tally: Tally, people: Population, message: Posted) -> None:
    for user in (1, 2):
        tally.push(push(message, user, message.accepted_at + 0.5))
        tally.ledger_row(message.message_id, people.users[user].id)
    tally.email(email(people, message, 2, message.accepted_at + 0.8))


def test_missing_is_not_drained_until_the_pipeline_settled_or_a_sender_gave_up() -> None:
    assert classify(False, settled=False, failed=False) == "complete"
    assert classify(True, settled=False, failed=False) == "not drained"
    assert classify(True, settled=True, failed=False) == "lost"
    assert classify(True, settled=False, failed=True) == "lost"


def test_every_owed_delivery_accepted_once_is_complete_with_its_latencies() -> None:
    people = population()
    tally = tally_of(people)
    message = posted()
    tally.register(message)
    deliver_all(tally, people, message)

    assert tally.all_delivered
    result = tally.result(settled=False)
    assert (result.notifications_expected, result.completed) == (2, 2)
    assert (result.lost, result.not_drained, result.duplicates, result.unexpected) == (0, 0, 0, 0)
    assert sorted(result.completed_at) == [100.5, 100.8]  # the later of push and e-mail
    assert list(result.push_latency) == [0.5, 0.5]
    assert list(result.email_latency) == [pytest.approx(0.8)]


def test_a_missing_push_is_not_drained_while_work_is_queued_and_lost_once_settled() -> None:
    people = population()
    tally = tally_of(people)
    message = posted()
    tally.register(message)
    tally.push(push(message, 1, 100.5))
    tally.email(email(people, message, 2, 100.6))
    for user in (1, 2):
        tally.ledger_row(message.message_id, people.users[user].id)

    assert not tally.all_delivered
    backlog = tally.result(settled=False)
    assert (backlog.completed, backlog.not_drained, backlog.lost) == (1, 1, 0)
    assert backlog.not_drained_by_part == {"push": 1}
    assert backlog.not_drained_message_ids == [str(message.message_id)]

    settled = tally.result(settled=True)
    assert (settled.completed, settled.not_drained, settled.lost) == (1, 0, 1)
    assert settled.lost_by_part == {"push": 1}
    assert settled.lost_message_ids == [str(message.message_id)]


def test_a_delivery_the_ledger_marks_failed_is_lost_even_before_the_pipeline_settled() -> None:
    people = population()
    tally = tally_of(people)
    message = posted()
    tally.register(message)
    tally.push(push(message, 1, 100.5))
    tally.delivery_failed(message.message_id, people.users[2].id, "push")

    result = tally.result(settled=False)
    # user 2: push failed (lost); its e-mail is missing too but that alone would be a backlog
    assert (result.lost, result.not_drained) == (1, 0)
    assert result.lost_by_part == {"push": 1, "email": 1}


def test_repeats_strays_and_records_arriving_before_the_201_was_seen() -> None:
    people = population()
    tally = tally_of(people)
    message = posted()
    early = push(message, 1, 100.4)
    tally.push(early)  # FCM accepted it before the load generator read the 201
    tally.register(message)
    deliver_all(tally, people, message)
    tally.push(push(message, 1, 101.0))  # a repeat: same notification again
    tally.email(email(people, message, 2, 101.5))  # a repeated e-mail
    tally.push(push(message, 0, 100.6))  # to the sender: nobody was owed it
    tally.ledger_row(message.message_id, people.users[1].id)  # a second ledger row
    tally.push(push(posted(), 1, 100.7))  # a message never posted here

    result = tally.result(settled=True)
    assert result.completed == 2
    assert dict(result.duplicates_by_kind) == {
        "ledger_rows": 1,
        "push_deliveries": 2,
        "email_deliveries": 1,
    }
    assert result.unexpected == 2
    assert tally.push_records == 4  # owed pushes, repeats included
    assert tally.pushes_accepted == 2
    assert min(result.push_accepted_at) == 100.4  # the first acceptance counts
    assert tally.last_push_at == 101.0


def test_without_a_ledger_to_read_only_deliveries_decide() -> None:
    people = population()
    tally = tally_of(people)
    message = posted()
    tally.register(message)
    for user in (1, 2):
        tally.push(push(message, user, 100.5))
    tally.email(email(people, message, 2, 100.6))

    result = tally.result(settled=True)
    assert (result.completed, result.lost) == (2, 0)


def test_slots_stay_per_message_over_many_messages() -> None:
    people = population(room_size=4, email=())
    tally = tally_of(people)
    messages = [posted(index=i, sender=i % 4, at=100.0 + i) for i in range(50)]
    for message in messages:
        tally.register(message)
    for message in messages:
        for user in range(4):
            if user != message.sender:
                tally.push(push(message, user, message.accepted_at + 0.25))

    result = tally.result(settled=True)
    assert (result.notifications_expected, result.completed, result.lost) == (150, 150, 0)
    assert set(result.push_latency) == {0.25}
    assert result.duplicates == 0


def test_push_latencies_and_pending_pushes_of_one_room() -> None:
    people = population()
    tally = tally_of(people)
    early, late = posted(0, sender=0, at=100.0), posted(1, sender=1, at=101.0)
    for message in (early, late):
        tally.register(message)
    tally.push(push(early, 1, 100.2))
    tally.push(push(early, 2, 101.5))
    tally.push(push(late, 0, 101.1))

    assert sorted(tally.push_latencies(0)) == [pytest.approx(0.1), pytest.approx(0.2), 1.5]
    assert tally.push_latencies(1) == []
    # At 101.2: early's push to user 2 not yet, late's to user 2 never (so far).
    assert tally.pushes_pending_at(101.2, 0) == 2
    assert tally.pushes_pending_at(100.1, 0) == 2  # late not posted yet: early's two
