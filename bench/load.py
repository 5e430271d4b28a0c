"""The benchmark's workload: users, rooms and preferences set up through the public API, then chat
messages posted over HTTP at a fixed offered rate or as fast as the API takes them.

The client is one aiohttp session over at most `connections` kept-alive connections (no cookie
jar, bodies encoded once per message, headers built once per user): about a tenth of the CPU
httpx spent per POST, which on a 2-core machine is taken from the services under test. With
several message-service replicas, each request goes to the next one in turn (`Api`)."""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp

SETUP_CONCURRENCY = 8
JSON = "application/json"


@dataclass(frozen=True)
class Workload:
    rooms: int
    room_size: int  # members per room: room_size - 1 recipients per message
    email_share: float  # the share of users with e-mail notifications enabled

    @property
    def users(self) -> int:
        return self.rooms * self.room_size

    @property
    def recipients_per_message(self) -> int:
        return self.room_size - 1

    def gets_email(self, user_index: int) -> bool:
        """Spread evenly: with 0.1, one member in ten (the same seat in every room of ten)."""
        every = round(1 / self.email_share) if self.email_share > 0 else 0
        return every > 0 and user_index % every == 0


@dataclass(frozen=True)
class BenchUser:
    index: int
    id: uuid.UUID
    username: str
    token: str  # the API token
    device_id: uuid.UUID
    device_token: str
    email: str
    email_enabled: bool


@dataclass(frozen=True)
class Room:
    id: uuid.UUID
    members: tuple[int, ...]  # user indexes


@dataclass(frozen=True)
class Population:
    users: tuple[BenchUser, ...]
    rooms: tuple[Room, ...]

    @property
    def email_users(self) -> int:
        return sum(user.email_enabled for user in self.users)


@dataclass(frozen=True)
class Posted:
    """One chat message the API answered 201 to."""

    index: int
    message_id: uuid.UUID
    room: int
    sender: int  # user index
    accepted_at: float  # time.time() when the 201 arrived
    request_seconds: float  # the POST's round trip
    behind_seconds: float = 0.0  # how late the POST started after its due time (paced runs)


@dataclass
class LoadResult:
    posted: list[Posted] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)  # "status 500", "ReadTimeout"…
    started_at: float = 0.0
    finished_at: float = 0.0

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


Answer = AbstractAsyncContextManager[aiohttp.ClientResponse]


class Api:
    """The message-service's API over one aiohttp session: each request goes to the next of the
    replicas' base URLs in turn (round robin), the path given as to a session with a base URL."""

    def __init__(self, session: aiohttp.ClientSession, base_urls: Sequence[str]) -> None:
        if not base_urls:
            raise ValueError("no message-service to send requests to")
        self.session = session
        self.base_urls = tuple(url.rstrip("/") for url in base_urls)
        self._turns = itertools.cycle(self.base_urls)

    def url(self, path: str) -> str:
        return next(self._turns) + path

    def request(self, method: str, path: str, **kwargs: Any) -> Answer:
        return self.session.request(method, self.url(path), **kwargs)

    def post(self, path: str, **kwargs: Any) -> Answer:
        return self.session.post(self.url(path), **kwargs)

    def put(self, path: str, **kwargs: Any) -> Answer:
        return self.session.put(self.url(path), **kwargs)


KEEPALIVE_S = 3.0  # under uvicorn's `timeout_keep_alive` (5 s)


@asynccontextmanager
async def api_session(base_urls: Sequence[str], connections: int) -> AsyncIterator[Api]:
    """One session, `connections` kept-alive connections at most (over every replica), no
    cookies, no proxy lookup; its requests spread over `base_urls`."""
    # Idle connections go before uvicorn closes them (after 5 s): reusing one just as the
    # server closes it loses that request (`ServerDisconnectedError`), as after the pause
    # between setting up and posting.
    connector = aiohttp.TCPConnector(
        limit=connections, limit_per_host=connections, keepalive_timeout=KEEPALIVE_S
    )
    async with aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=30),
        skip_auto_headers=("User-Agent",),
    ) as session:
        yield Api(session, base_urls)


def _headers(token: str | None = None) -> dict[str, str]:
    headers = {"Content-Type": JSON}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return headers


async def _call(
    session: Api,
    method: str,
    path: str,
    body: dict[str, Any],
    what: str,
    token: str | None = None,
) -> Any:
    async with session.request(
        method, path, data=json.dumps(body).encode(), headers=_headers(token)
    ) as answer:
        payload = await answer.read()
        if answer.status not in (200, 201):
            raise RuntimeError(f"{what}: HTTP {answer.status} {payload[:200]!r}")
    return json.loads(payload)


async def _bounded(calls: list[Callable[[], Awaitable[Any]]]) -> list[Any]:
    semaphore = asyncio.Semaphore(SETUP_CONCURRENCY)

    async def one(call: Callable[[], Awaitable[Any]]) -> Any:
        async with semaphore:
            return await call()

    return await asyncio.gather(*(one(call) for call in calls))


async def set_levels(session: Api, token: str, *, email: bool) -> None:
    """Every message pushed, and e-mailed at once if `email`: level `all` (a new user's default
    is DMs and mentions only) and no e-mail delay (a new user's is two minutes). A version from
    before delays takes the levels alone, one from before levels the older on/off form (its
    default was everything on), so `--compare` with them runs the same workload."""
    levels = {"push": "all", "email": "all" if email else "none"}
    for body in ({**levels, "email_delay": 0}, levels):
        async with session.put(
            "/users/me/preferences", data=json.dumps(body).encode(), headers=_headers(token)
        ) as answer:
            if answer.status == 200:
                return
            if answer.status != 422:
                raise RuntimeError(
                    f"preferences: HTTP {answer.status} {(await answer.read())[:200]!r}"
                )
    if not email:
        older = {"push_enabled": True, "email_enabled": False, "muted_room_ids": []}
        await _call(session, "PUT", "/users/me/preferences", older, "preferences", token)


async def register_account(session: Api, account: dict[str, Any], *, password: str) -> Any:
    """`POST /users` with a password; a version from before accounts (such as 067bd6e) forbids
    the field (HTTP 422) and registers without one, so `--compare` with it runs the same
    workload. Its answer either way: the user, with the API token."""
    body = json.dumps({**account, "password": password}).encode()
    async with session.post("/users", data=body, headers=_headers()) as answer:
        payload = await answer.read()
        if answer.status in (200, 201):
            return json.loads(payload)
        if answer.status != 422 or b"password" not in payload:
            raise RuntimeError(f"register: HTTP {answer.status} {payload[:200]!r}")
    return await _call(session, "POST", "/users", account, "register")


async def populate(
    session: Api,
    workload: Workload,
    run_id: str,
    *,
    direct_pairs: int = 0,
    default_levels: bool = False,
) -> Population:
    """Register every user (one push device each; e-mail off for all but `email_share`, unless
    `default_levels`: then every user keeps a new user's levels), then one room per
    `room_size` consecutive users; then `direct_pairs` pairs of users more, each with its direct
    room (after the group rooms, in `rooms`)."""

    async def register(index: int) -> BenchUser:
        email = f"user{index}@bench-{run_id}.example"
        user = await register_account(
            session,
            {
                "username": f"b{run_id}_{index}",
                "display_name": f"Bench User {index}",
                "email": email,
            },
            password=f"bench-{run_id}-password",
        )
        device_token = f"bench-{run_id}-{index}-{uuid.uuid4().hex}"
        device = await _call(
            session,
            "POST",
            "/users/me/devices",
            {"platform": "fcm", "token": device_token},
            "device",
            user["token"],
        )
        email_enabled = default_levels or workload.gets_email(index)
        if not default_levels:
            await set_levels(session, user["token"], email=email_enabled)
        return BenchUser(
            index=index,
            id=uuid.UUID(user["id"]),
            username=user["username"],
            token=user["token"],
            device_id=uuid.UUID(device["id"]),
            device_token=device_token,
            email=email,
            email_enabled=email_enabled,
        )

    users: list[BenchUser] = await _bounded(
        [functools.partial(register, index) for index in range(workload.users)]
    )

    async def create_room(number: int) -> Room:
        members = tuple(range(number * workload.room_size, (number + 1) * workload.room_size))
        owner = users[members[0]]
        room = await _call(
            session,
            "POST",
            "/rooms",
            {"name": f"bench room {number}", "member_ids": [str(users[m].id) for m in members[1:]]},
            "room",
            owner.token,
        )
        room_id = uuid.UUID(room["id"])
        await _bounded([functools.partial(join, room_id, users[m]) for m in members[1:]])
        return Room(id=room_id, members=members)

    async def join(room_id: uuid.UUID, user: BenchUser) -> None:
        """Invited by the owner, a member once they join (a version from before invitations
        made them members at once, and has no such endpoint: 404)."""
        async with session.post(f"/rooms/{room_id}/join", headers=_headers(user.token)) as answer:
            if answer.status not in (200, 404):
                raise RuntimeError(f"join: HTTP {answer.status} {(await answer.read())[:200]!r}")

    rooms: list[Room] = await _bounded(
        [functools.partial(create_room, number) for number in range(workload.rooms)]
    )
    first = len(users)
    users += await _bounded(
        [functools.partial(register, index) for index in range(first, first + 2 * direct_pairs)]
    )
    for pair in range(direct_pairs):
        one, other = first + 2 * pair, first + 2 * pair + 1
        direct = await _call(
            session,
            "POST",
            "/rooms",
            {"kind": "direct", "member_ids": [str(users[other].id)]},
            "direct room",
            users[one].token,
        )
        rooms.append(Room(id=uuid.UUID(direct["id"]), members=(one, other)))
    return Population(users=tuple(users), rooms=tuple(rooms))


@dataclass(frozen=True)
class LoadPlan:
    count: int  # messages at most
    duration: float  # seconds of posting at most
    messages_per_second: float  # 0: as fast as it goes
    connections: int


def seat_of(index: int, rooms: int, room_size: int) -> tuple[int, int]:
    """(room, member seat) of message `index`: rooms take turns, and within a room its members
    take turns (starting at a different seat in each room, so that a short run does not have
    every room's same seat sending), so every member is sender and recipient alike."""
    room = index % rooms
    return room, (index // rooms + room) % room_size


async def _post_message(
    session: Api,
    path: str,
    body: bytes,
    headers: dict[str, str],
    result: LoadResult,
    index: int,
    room: int,
    sender: int,
    *,
    behind: float = 0.0,
) -> None:
    """POST one message; its 201 goes in `result.posted`, anything else in its errors."""
    sent_at = time.time()
    try:
        async with session.post(path, data=body, headers=headers) as response:
            payload = await response.read()
            status = response.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        result.error(type(exc).__name__)
        return
    accepted_at = time.time()
    if status != 201:
        result.error(f"status {status}")
        return
    result.posted.append(
        Posted(
            index=index,
            message_id=uuid.UUID(json.loads(payload)["id"]),
            room=room,
            sender=sender,
            accepted_at=accepted_at,
            request_seconds=accepted_at - sent_at,
            behind_seconds=behind,
        )
    )


async def generate_lanes(
    session: Api,
    population: Population,
    *,
    room_messages: int,
    direct_messages: int,
    direct_interval: float,
    result: LoadResult,
    before_directs: Callable[[], Awaitable[None]],
) -> LoadResult:
    """The lanes scenario: `room_messages` to the first room, as fast as they go (a backlog of
    room chatter for every member), then, once `before_directs` returns (the chatter is
    decided, its pushes queued), `direct_messages` in the last room (a direct room), one every
    `direct_interval` seconds, while that backlog drains."""
    result.started_at = time.time()
    room, direct = population.rooms[0], population.rooms[-1]

    headers = [_headers(user.token) for user in population.users]

    async def post(index: int, number: int, sender: int, text: bytes) -> None:
        path = f"/rooms/{population.rooms[number].id}/messages"
        body = b'{"content":"%s %d"}' % (text, index)
        await _post_message(session, path, body, headers[sender], result, index, number, sender)

    await asyncio.gather(
        *(
            post(index, 0, room.members[index % len(room.members)], b"Room chatter")
            for index in range(room_messages)
        )
    )
    await before_directs()
    last = len(population.rooms) - 1
    for index in range(room_messages, room_messages + direct_messages):
        await post(index, last, direct.members[0], b"Direct message")
        await asyncio.sleep(direct_interval)
    result.finished_at = time.time()
    return result


async def generate(
    session: Api,
    population: Population,
    plan: LoadPlan,
    result: LoadResult | None = None,
) -> LoadResult:
    """Post up to `plan.count` messages, message i due at start + i / rate (open loop: a late
    message is posted at once, never skipped, and how late it started is recorded), over
    `plan.connections` concurrent requests. `result` fills while it runs (the follower reads it)."""
    result = result if result is not None else LoadResult()
    indexes = iter(range(plan.count))
    start = time.monotonic()
    result.started_at = time.time()
    deadline = start + plan.duration
    room_size = len(population.rooms[0].members)
    headers = [_headers(user.token) for user in population.users]
    paths = [f"/rooms/{room.id}/messages" for room in population.rooms]

    async def worker() -> None:
        for index in indexes:
            behind = 0.0
            if plan.messages_per_second > 0:
                due = start + index / plan.messages_per_second
                if due > deadline:
                    return
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                else:
                    behind = -delay
            elif time.monotonic() > deadline:
                return
            room_number, seat = seat_of(index, len(population.rooms), room_size)
            sender = population.rooms[room_number].members[seat]
            body = b'{"content":"Benchmark message %d"}' % index
            await _post_message(
                session,
                paths[room_number],
                body,
                headers[sender],
                result,
                index,
                room_number,
                sender,
                behind=behind,
            )

    await asyncio.gather(*(worker() for _ in range(plan.connections)))
    result.finished_at = time.time()
    return result
