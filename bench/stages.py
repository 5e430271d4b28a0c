"""Where a message's push spent its time: each stage's moment after the message's 201, read back
from the services' own tables before the run's databases are dropped.

The stages, in order: the outbox relay published the message's event (message-service's
`outbox.published_at`), the router decided its recipient (`notifications.decided_at`),
push-sender stored the job (`push_deliveries.created_at`, its claim) and finished it
(`finished_at`, after the provider's answer), and the provider fake accepted it (the lease's
`claimed_at` is cleared when a job finishes, so it says nothing afterwards).
Every process runs on this machine, so the clocks agree; each service stamps its own
`utc_now()`, so a stage is when that service got to it, not when its transaction committed.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from bench.load import Posted

STAGES = ("published", "decided", "stored", "finished", "accepted")


@dataclass(frozen=True)
class Timeline:
    """One message's stages, in seconds after its 201 (None: no row says)."""

    index: int
    offsets: dict[str, float | None]


async def read_timelines(
    *,
    message_db: str,
    router_db: str,
    push_db: str,
    messages: Sequence[Posted],
    accepted_after_201: Sequence[float | None],
) -> list[Timeline]:
    """The stages of `messages` (each with one recipient: direct messages), whose pushes the
    provider accepted `accepted_after_201` seconds after their 201."""
    ids = [message.message_id for message in messages]
    moments: dict[str, dict[Any, float]] = {}
    for dsn, query in (
        # The relay's rows name their message in the JSON payload only.
        (
            message_db,
            "SELECT (payload::json->>'message_id')::uuid AS id, published_at AS published"
            " FROM outbox WHERE event_type = 'new_message'"
            " AND (payload::json->>'message_id')::uuid = ANY($1::uuid[])",
        ),
        (
            router_db,
            "SELECT message_id AS id, min(decided_at) AS decided FROM notifications"
            " WHERE message_id = ANY($1::uuid[]) GROUP BY message_id",
        ),
        (
            push_db,
            "SELECT message_id AS id, min(created_at) AS stored, min(finished_at) AS finished"
            " FROM push_deliveries WHERE message_id = ANY($1::uuid[]) GROUP BY message_id",
        ),
    ):
        connection = await asyncpg.connect(dsn)
        try:
            rows = await connection.fetch(query, ids)
        finally:
            await connection.close()
        for row in rows:
            for stage, moment in row.items():
                if stage != "id" and moment is not None:
                    moments.setdefault(stage, {})[row["id"]] = _epoch(moment)
    timelines = []
    for message, accepted in zip(messages, accepted_after_201, strict=True):
        offsets: dict[str, float | None] = {}
        for stage in STAGES[:-1]:
            moment = moments.get(stage, {}).get(message.message_id)
            offsets[stage] = None if moment is None else moment - message.accepted_at
        offsets["accepted"] = accepted
        timelines.append(Timeline(message.index, offsets))
    return timelines


def summarize(timelines: Sequence[Timeline], *, slowest: int = 5) -> dict[str, Any]:
    """Per stage, p50 and max of its offset after the 201 and of its step from the stage
    before; and the `slowest` messages' whole timelines (by acceptance), in ms."""
    steps: dict[str, list[float]] = {stage: [] for stage in STAGES}
    offsets: dict[str, list[float]] = {stage: [] for stage in STAGES}
    for timeline in timelines:
        before = 0.0
        for stage in STAGES:
            offset = timeline.offsets[stage]
            if offset is None:
                continue
            offsets[stage].append(offset)
            steps[stage].append(offset - before)
            before = offset
    by_acceptance = sorted(
        (timeline for timeline in timelines if timeline.offsets["accepted"] is not None),
        key=lambda timeline: timeline.offsets["accepted"] or 0.0,
    )
    return {
        "stages": {
            stage: {
                "after_201_p50_ms": _ms(_median(offsets[stage])),
                "after_201_max_ms": _ms(max(offsets[stage], default=None)),
                "step_p50_ms": _ms(_median(steps[stage])),
                "step_max_ms": _ms(max(steps[stage], default=None)),
            }
            for stage in STAGES
        },
        "slowest": [
            {"index": timeline.index} | {stage: _ms(timeline.offsets[stage]) for stage in STAGES}
            for timeline in by_acceptance[-slowest:]
        ],
    }


def rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """The table's lines: a stage per line, then the slowest messages."""
    lines = [
        (
            f"stage: {stage}",
            f"after the 201 p50 {figures['after_201_p50_ms']} max {figures['after_201_max_ms']}"
            f"  step p50 {figures['step_p50_ms']} max {figures['step_max_ms']} (ms)",
        )
        for stage, figures in summary["stages"].items()
    ]
    for timeline in summary["slowest"]:
        lines.append(
            (
                f"slow: message {timeline['index']}",
                "  ".join(f"{stage} {timeline[stage]}" for stage in STAGES),
            )
        )
    return lines


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _epoch(moment: Any) -> float:
    return float(moment.timestamp())
