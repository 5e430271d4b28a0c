"""A recall names as much as fits a provider's payload: notification ids give way first, from the
end, then rooms; the largest recall the events allow fits every provider whole."""

from __future__ import annotations

import json
import uuid

from herald_shared.events import (
    MAX_RECALLED_NOTIFICATIONS,
    MAX_RECALLED_ROOMS,
    Platform,
    PushRecall,
)
from push_sender.providers import apns, fcm, webpush
from push_sender.providers.recall import fit_recall
from tests.unit.push_sender.support import recall_job


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


def test_the_largest_recall_fits_every_provider_whole() -> None:
    # The most ids a recall may name, and a badge as long as any: nothing is left out.
    job = recall_job(MAX_RECALLED_ROOMS, MAX_RECALLED_NOTIFICATIONS, badge=2**31 - 1)
    assert job.recall is not None
    rooms = [str(room) for room in job.recall.room_ids]
    ids = [str(notification) for notification in job.recall.notification_ids]

    message = fcm.build_message(job)["message"]
    data, aps = message["data"], message["apns"]["payload"]["aps"]
    assert (data["room_ids"], data["notification_ids"]) == (",".join(rooms), ",".join(ids))
    # What FCM counts, and what an iPhone receives through it (the data keys beside `aps`).
    assert len(json.dumps({"data": data}).encode()) <= fcm.PAYLOAD_LIMIT
    assert len(json.dumps({"aps": aps, **data}).encode()) <= apns.MAX_PAYLOAD_BYTES

    ios = apns.build_payload(job.model_copy(update={"platform": Platform.APNS}))
    assert len(ios) <= apns.MAX_PAYLOAD_BYTES
    payload = json.loads(ios)
    assert (payload["room_ids"], payload["notification_ids"]) == (rooms, ids)

    browser = webpush.build_payload(job.model_copy(update={"platform": Platform.WEB_PUSH}))
    assert len(browser) <= webpush.MAX_PLAINTEXT_BYTES
    payload = json.loads(browser)
    assert (payload["room_ids"], payload["notification_ids"]) == (rooms, ids)
