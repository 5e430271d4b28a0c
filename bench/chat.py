"""The chat scenario: the default workload's rooms, but with a chat app's defaults and habits.

Every user keeps the defaults (push and e-mail at `mentions`: DMs, invitations and mentions
only); 5 % of the room messages mention one other member (`@username`), 2 % of all messages are
direct messages (between pairs of users of their own), and one user in five holds a real-time
stream open (`GET /users/me/events`) with their room in view, so that the router finds them
online. Most decisions are then "skip": the figures are decisions/s (ledger rows) and sends/s
(pushes and e-mails accepted by the local providers), and the check is that every delivery the
router decided was accepted exactly once, and none it did not decide.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncpg

from bench.checker import EmailRecord, PushRecord
from bench.load import Api, LoadPlan, LoadResult, Population, _headers, _post_message, seat_of

MENTION_SHARE = 0.05
DIRECT_SHARE = 0.02
IN_VIEW_EVERY = 5  # one user in five


@dataclass
class Streams:
    """The real-time streams the load generator holds open, and what came on them."""

    # A session of their own: each stream holds its connection for the whole run.
    session: aiohttp.ClientSession
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    events: int = 0
    failures: int = 0
    user_indexes: list[int] = field(default_factory=list)

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.session.close()


async def open_streams(base_url: str, population: Population, groups: int) -> Streams:
    """One stream for every `IN_VIEW_EVERY`th member of the first `groups` rooms, with their
    room in view."""
    streams = Streams(
        aiohttp.ClientSession(
            base_url,
            connector=aiohttp.TCPConnector(limit=0),
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None, sock_read=None),
        )
    )
    session = streams.session
    opened: list[asyncio.Future[None]] = []
    for room in population.rooms[:groups]:
        for member in room.members:
            if member % IN_VIEW_EVERY:
                continue
            ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            opened.append(ready)
            streams.user_indexes.append(member)
            streams.tasks.append(
                asyncio.create_task(
                    _follow(session, population.users[member].token, room.id, streams, ready)
                )
            )
    await asyncio.wait_for(asyncio.gather(*opened), timeout=60)
    return streams


async def _follow(
    session: aiohttp.ClientSession,
    token: str,
    room_id: uuid.UUID,
    streams: Streams,
    ready: asyncio.Future[None],
) -> None:
    try:
        async with session.get(
            "/users/me/events",
            params={"active_room_id": str(room_id)},
            headers=_headers(token),
            timeout=aiohttp.ClientTimeout(total=None, sock_read=None),
        ) as response:
            if response.status != 200:
                raise RuntimeError(f"stream: HTTP {response.status}")
            ready.set_result(None)
            async for line in response.content:
                if line.startswith(b"id: "):
                    streams.events += 1
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        streams.failures += 1
        if not ready.done():
            ready.set_exception(exc)


async def streams_projected(router_db: str, users: int) -> None:
    """Until the router's presence projection has every stream (a message routed before would
    not know its recipient online)."""
    connection = await asyncpg.connect(router_db)
    try:
        while True:
            online = await connection.fetchval(
                "SELECT count(DISTINCT c.user_id) FROM presence_connections c"
                " JOIN rooms_in_view r USING (user_id)"
                " WHERE c.expires_at > now() AND r.room_id IS NOT NULL"
            )
            if online >= users:
                return
            await asyncio.sleep(0.1)  # polling the database: nothing to wait on
    finally:
        await connection.close()


async def generate_chat(
    session: Api,
    population: Population,
    groups: int,
    plan: LoadPlan,
    result: LoadResult,
    *,
    seed: int = 7,
) -> LoadResult:
    """Like the default workload's `generate` (open loop, `plan.connections` at once), over the
    first `groups` rooms (group rooms), with a direct message now and then in one of the direct
    rooms that follow them, and a mention now and then."""
    rng = random.Random(seed)  # noqa: S311  (a workload, not a secret)
    directs = population.rooms[groups:]
    room_size = len(population.rooms[0].members)
    # Drawn up front: the same messages whatever the timing.
    kinds = [
        "direct"
        if draw < DIRECT_SHARE
        else "mention"
        if draw < DIRECT_SHARE + MENTION_SHARE
        else "plain"
        for draw in (rng.random() for _ in range(plan.count))
    ]
    picks = [rng.randrange(1_000_000) for _ in range(plan.count)]
    headers = [_headers(user.token) for user in population.users]
    indexes = iter(range(plan.count))
    start = time.monotonic()
    result.started_at = time.time()

    async def worker() -> None:
        for index in indexes:
            if plan.messages_per_second > 0:
                delay = start + index / plan.messages_per_second - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            if time.monotonic() - start > plan.duration:
                return
            if kinds[index] == "direct" and directs:
                number = groups + picks[index] % len(directs)
                sender = population.rooms[number].members[index % 2]
                text = f"Direct message {index}"
            else:
                number, seat = seat_of(index, groups, room_size)
                members = population.rooms[number].members
                sender = members[seat]
                text = f"Benchmark message {index}"
                if kinds[index] == "mention":
                    other = members[(seat + 1 + picks[index] % (room_size - 1)) % room_size]
                    text = f"@{population.users[other].username} {text}"
            await _post_message(
                session,
                f"/rooms/{population.rooms[number].id}/messages",
                b'{"content":"%s"}' % text.encode(),
                headers[sender],
                result,
                index,
                number,
                sender,
            )

    await asyncio.gather(*(worker() for _ in range(plan.connections)))
    result.finished_at = time.time()
    return result


async def ledger_figures(router_db: str) -> dict[str, Any]:
    """The router's decisions for the workload (invitations aside): how many, over how long,
    why; and the deliveries it asked for, by status."""
    connection = await asyncpg.connect(router_db)
    try:
        span = await connection.fetchrow(
            "SELECT count(*) AS decided, min(decided_at) AS first, max(decided_at) AS last"
            " FROM notifications WHERE trigger <> 'invitation'"
        )
        reasons = await connection.fetch(
            "SELECT 'push:' || push_decision AS key, count(*) AS n FROM notifications"
            " WHERE trigger <> 'invitation' GROUP BY 1"
            " UNION ALL SELECT 'email:' || email_decision, count(*) FROM notifications"
            " WHERE trigger <> 'invitation' GROUP BY 1"
        )
        triggers = await connection.fetch(
            "SELECT trigger, count(*) AS n FROM notifications GROUP BY 1"
        )
        deliveries = await connection.fetch(
            "SELECT d.notification_id::text AS id, d.channel, d.status"
            " FROM notification_deliveries d JOIN notifications n USING (message_id, recipient_id)"
            " WHERE n.trigger <> 'invitation'"
        )
    finally:
        await connection.close()
    seconds = (span["last"] - span["first"]).total_seconds() if span["decided"] else 0.0
    return {
        "decided": int(span["decided"]),
        "decision_seconds": seconds,
        "reasons": {row["key"]: int(row["n"]) for row in reasons},
        "triggers": {row["trigger"]: int(row["n"]) for row in triggers},
        "deliveries": {row["id"]: (row["channel"], row["status"]) for row in deliveries},
    }


def check(
    ledger: dict[str, Any], pushes: list[PushRecord], emails: list[EmailRecord]
) -> dict[str, int]:
    """Every delivery the router decided accepted once; none it did not decide."""
    decided: dict[str, tuple[str, str]] = ledger["deliveries"]
    accepted = Counter(record.notification_id for record in pushes) + Counter(
        record.notification_id for record in emails
    )
    return {
        "deliveries_decided": len(decided),
        "accepted": sum(accepted.values()),
        "lost": sum(1 for notification_id in decided if not accepted[notification_id]),
        "duplicates": sum(n - 1 for n in accepted.values() if n > 1),
        "unexpected": sum(n for key, n in accepted.items() if key not in decided),
        "not_delivered_in_ledger": sum(
            1 for _, status in decided.values() if status != "delivered"
        ),
    }


def summary(
    *,
    load: LoadResult,
    ledger: dict[str, Any],
    checked: dict[str, int],
    pushes: list[PushRecord],
    emails: list[EmailRecord],
    streams: Streams,
) -> dict[str, Any]:
    posted = len(load.posted)
    post_seconds = max(load.finished_at - load.started_at, 1e-9)
    last_send = max(
        [record.accepted_at for record in pushes] + [record.accepted_at for record in emails],
        default=load.finished_at,
    )
    send_seconds = max(last_send - load.started_at, 1e-9)
    sends = len(pushes) + len(emails)
    return {
        "messages": posted,
        "messages_per_second": round(posted / post_seconds, 1),
        "decisions": ledger["decided"],
        "decisions_per_second": round(ledger["decided"] / max(ledger["decision_seconds"], 1e-9), 1),
        "sends": sends,
        "pushes": len(pushes),
        "emails": len(emails),
        "sends_per_second": round(sends / send_seconds, 1),
        "triggers": ledger["triggers"],
        "decisions_by_reason": dict(sorted(ledger["reasons"].items())),
        "streams": len(streams.tasks),
        "stream_events": streams.events,
        "stream_failures": streams.failures,
        "errors": load.errors,
        **checked,
    }
