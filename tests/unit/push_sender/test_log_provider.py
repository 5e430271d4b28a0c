"""The zero-setup provider: one JSON line per push, never the full device token."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from push_sender.providers import LogProvider, ProviderAnswer, Verdict
from push_sender.providers.log import token_hint
from tests.unit.push_sender.support import DEVICE_TOKEN, push_job, recall_job


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


async def test_a_push_becomes_one_json_line_without_the_token(tmp_path: Path) -> None:
    path = tmp_path / "state" / "pushes.jsonl"  # the folder does not exist yet
    provider = LogProvider(path)
    job = push_job(title="Alice in général", body="On se voit à 9h ? 👋")

    answer = await provider.send(job)

    assert answer == ProviderAnswer.accepted()
    assert path.read_text(encoding="utf-8").count("\n") == 1
    [line] = lines(path)
    assert line == {
        "at": line["at"],
        "notification_id": str(job.notification_id),
        "message_id": str(job.message_id),
        "room_id": str(job.room_id),
        "recipient_id": str(job.recipient_id),
        "device_id": str(job.device_id),
        "platform": "fcm",
        "token": "…" + DEVICE_TOKEN[-6:],
        "title": "Alice in général",
        "body": "On se voit à 9h ? 👋",
        "collapse_id": str(job.notification_id),
        "badge": None,
        "recall": None,
    }
    assert DEVICE_TOKEN not in path.read_text(encoding="utf-8")


async def test_a_recall_and_a_badge_are_on_the_line(tmp_path: Path) -> None:
    path = tmp_path / "pushes.jsonl"
    job = recall_job(rooms=2, notifications=1, badge=3)
    assert job.recall is not None

    await LogProvider(path).send(job)

    [line] = lines(path)
    assert (line["title"], line["body"], line["badge"]) == ("", "", 3)
    assert line["recall"] == {
        "room_ids": [str(room) for room in job.recall.room_ids],
        "notification_ids": [str(job.recall.notification_ids[0])],
    }


async def test_concurrent_pushes_never_interleave(tmp_path: Path) -> None:
    path = tmp_path / "pushes.jsonl"
    provider = LogProvider(path)
    jobs = [push_job(body="x" * 5000) for _ in range(30)]

    await asyncio.gather(*(provider.send(job) for job in jobs))

    assert sorted(line["notification_id"] for line in lines(path)) == sorted(
        str(job.notification_id) for job in jobs
    )


async def test_an_unwritable_file_is_transient(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    provider = LogProvider(blocker / "pushes.jsonl")

    answer = await provider.send(push_job())

    assert answer.verdict is Verdict.TRANSIENT
    assert answer.reason.startswith("cannot write push log (")


def test_short_tokens_are_not_shown_at_all() -> None:
    assert token_hint("abc") == "…"
    assert token_hint("0123456789ab") == "…"
    assert token_hint("0123456789abc") == "…789abc"
