"""Push text fitted to a provider's byte limit, never splitting a character; FCM's payloads:
ids, badge, recalls."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from herald_shared.events import Trigger
from herald_shared.text import fit_title_and_body, truncate_to_size, utf8_size
from push_sender.providers.fcm import PAYLOAD_LIMIT, FcmProvider, build_message, json_text_size
from push_sender.settings import FcmSettings
from tests.fakes.fcm import FakeFcm
from tests.unit.push_sender.support import DEVICE_TOKEN, push_job, recall_job


@pytest.mark.parametrize(
    ("text", "max_size", "expected"),
    [
        ("short", 10, "short"),
        ("abcdefghij", 10, "abcdefghij"),
        ("abcdefghijk", 10, "abcdefg…"),  # "…" is 3 bytes
        ("héllo wörld", 9, "héllo…"),
        ("👋👋👋👋", 12, "👋👋…"),  # 4 bytes each, never half of one
        ("👍🏽👍🏽👍🏽", 14, "👍🏽…"),  # the skin tone stays with its emoji
        ("🇫🇷🇩🇪🇮🇹", 14, "🇫🇷…"),  # never half a flag
        ("e\u0301e\u0301e\u0301", 8, "e\u0301…"),  # the accent stays on its letter
        ("abc", 2, ""),  # not even the ellipsis fits
    ],
)
def test_truncation_by_size_keeps_characters_whole(text: str, max_size: int, expected: str) -> None:
    result = truncate_to_size(text, max_size)
    assert result == expected
    assert utf8_size(result) <= max_size


@pytest.mark.parametrize(
    ("title", "body", "budget", "expected"),
    [
        ("Alice", "hello", 10, ("Alice", "hello")),
        ("Alice", "hello world", 12, ("Alice", "hell…")),  # the body gives way first
        ("Alice in general", "hello", 10, ("Alice i…", "")),  # then the title
    ],
)
def test_title_and_body_fit_their_budget(
    title: str, body: str, budget: int, expected: tuple[str, str]
) -> None:
    assert fit_title_and_body(title, body, budget=budget) == expected


def test_json_size_is_never_below_utf8_size() -> None:
    for text in ("plain", 'quote " and \\', "héllo", "👋", "日本語", "\n\t"):
        assert json_text_size(text) >= utf8_size(text)


@pytest.mark.parametrize("body", ["x" * 5000, "👋" * 3000, "日本語" * 2000, '"' * 5000])
@pytest.mark.parametrize("badge", [None, 2**31 - 1])
def test_an_fcm_payload_fits_fcms_limit(body: str, badge: int | None) -> None:
    message = build_message(push_job(body=body, badge=badge, trigger=Trigger.DIRECT))["message"]
    payload = {"notification": message["notification"], "data": message["data"]}
    assert len(json.dumps(payload).encode()) <= PAYLOAD_LIMIT
    # What an iPhone receives through FCM: `aps` with the alert, and the data keys beside it.
    aps = {**message["apns"]["payload"]["aps"], "alert": message["notification"]}
    assert len(json.dumps({"aps": aps, **message["data"]}).encode()) <= PAYLOAD_LIMIT
    assert message["notification"]["body"].endswith("…")
    assert body.startswith(message["notification"]["body"][:-1])


def test_a_short_fcm_payload_is_untouched() -> None:
    job = push_job()
    message = build_message(job)["message"]
    assert message["notification"] == {"title": job.title, "body": job.body}


@pytest.mark.parametrize(
    ("trigger", "android", "apns", "sound"),
    [
        (Trigger.DIRECT, "HIGH", "10", {"sound": "default"}),
        (Trigger.MENTION, "HIGH", "10", {"sound": "default"}),
        (Trigger.ROOM_MENTION, "NORMAL", "5", {}),
        (Trigger.MESSAGE, "NORMAL", "5", {}),
    ],
)
async def test_fcm_has_one_notification_per_room_and_urgency_by_trigger(
    fcm: FakeFcm,
    credentials: Path,
    trigger: Trigger,
    android: str,
    apns: str,
    sound: dict[str, str],
) -> None:
    provider = FcmProvider.from_settings(
        FcmSettings(credentials_file=credentials, base_url=fcm.base_url)
    )
    job = push_job(body="👋" * 3000, trigger=trigger)
    try:
        answer = await provider.send(job)
    finally:
        await provider.aclose()

    assert answer.verdict == "accepted"  # the local FCM server checks the 4096-byte limit
    [sent] = fcm.messages_to(DEVICE_TOKEN)
    message = sent["message"]
    room = str(job.room_id)
    assert message["android"] == {
        "priority": android,
        "collapse_key": room,
        "notification": {"tag": room},
    }
    assert message["apns"] == {
        "headers": {"apns-collapse-id": str(job.notification_id), "apns-priority": apns},
        "payload": {"aps": {"thread-id": room, **sound}},
    }


async def test_fcm_carries_the_badge_to_ios_and_the_rooms_count_to_android(
    fcm: FakeFcm, credentials: Path
) -> None:
    provider = FcmProvider.from_settings(
        FcmSettings(credentials_file=credentials, base_url=fcm.base_url)
    )
    job = push_job(badge=7, room_unread=2)
    try:
        answer = await provider.send(job)
    finally:
        await provider.aclose()

    assert answer.verdict == "accepted"
    [sent] = fcm.messages_to(DEVICE_TOKEN)
    message = sent["message"]
    room = str(job.room_id)
    assert message["notification"] == {"title": job.title, "body": job.body}
    # A launcher adds up the counts of the notifications on screen (one per room): the total.
    assert message["android"]["notification"] == {"tag": room, "notification_count": 2}
    assert message["apns"]["payload"] == {"aps": {"thread-id": room, "badge": 7}}
    assert "badge" not in message["data"]


@pytest.mark.parametrize(("badge", "data_badge"), [(3, {"badge": "3"}), (None, {})])
async def test_a_recall_is_a_data_message_and_a_background_push_on_ios(
    fcm: FakeFcm, credentials: Path, badge: int | None, data_badge: dict[str, str]
) -> None:
    provider = FcmProvider.from_settings(
        FcmSettings(credentials_file=credentials, base_url=fcm.base_url)
    )
    job = recall_job(rooms=2, notifications=3, badge=badge)
    assert job.recall is not None
    try:
        answer = await provider.send(job)
    finally:
        await provider.aclose()

    assert answer.verdict == "accepted"
    [sent] = fcm.messages_to(DEVICE_TOKEN)
    assert sent["message"] == {
        "token": DEVICE_TOKEN,
        # No `notification`: FCM hands the data to the app and shows nothing.
        "data": {
            "type": "recall",
            "room_ids": ",".join(str(room) for room in job.recall.room_ids),
            "notification_ids": ",".join(str(n) for n in job.recall.notification_ids),
            **data_badge,
        },
        # Now, and replacing nothing waiting at FCM: no collapse key.
        "android": {"priority": "HIGH"},
        "apns": {
            "headers": {"apns-push-type": "background", "apns-priority": "5"},
            "payload": {"aps": {"content-available": 1}},
        },
    }


def test_a_recall_of_rooms_alone_names_no_notification() -> None:
    data = build_message(recall_job(rooms=1))["message"]["data"]

    assert data["notification_ids"] == ""
    assert "," not in data["room_ids"]
