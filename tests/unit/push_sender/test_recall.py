"""A recall names as much as fits a provider's payload: notification ids give way first, from the
end, then rooms."""

from __future__ import annotations

import uuid

from herald_shared.events import PushRecall
from push_sender.providers.recall import fit_recall


def a_recall(rooms: int, notifications: int) -> PushRecall:
    return PushRecall(
        room_ids=[uuid.uuid4() for _ in range(rooms)],
        notification_ids=[uuid.uuid4() for _ in range(notifications)],
    )


def test_what_fits_is_kept_whole_and_in_order() -> None:
    recall = a_recall(3, 2)

    rooms, ids = fit_recall(recall, lambda rooms, ids: True)

    assert rooms == [str(room) for room in recall.room_ids]
    assert ids == [str(notification) for notification in recall.notification_ids]


def test_notification_ids_give_way_first_from_the_end() -> None:
    recall = a_recall(3, 4)

    rooms, ids = fit_recall(recall, lambda rooms, ids: len(rooms) + len(ids) <= 5)

    assert rooms == [str(room) for room in recall.room_ids]
    # The newest, listed first, stay.
    assert ids == [str(notification) for notification in recall.notification_ids[:2]]


def test_then_rooms_from_the_end() -> None:
    recall = a_recall(4, 3)

    rooms, ids = fit_recall(recall, lambda rooms, ids: len(rooms) + len(ids) <= 2)

    assert rooms == [str(room) for room in recall.room_ids[:2]]
    assert ids == []


def test_one_room_always_stays() -> None:
    recall = a_recall(2, 1)

    assert fit_recall(recall, lambda rooms, ids: False) == ([str(recall.room_ids[0])], [])
