"""Rate limits with the in-process limiter (no `REDIS_URL`): which budget each call spends, per
IP, per user, per account or per session; the 429 and its headers; `Retry-After` honoured; the
client's address behind trusted proxies; a Redis that cannot be reached (fail open); limits
switched off."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from message_service.app import service_of
from message_service.ratelimit import (
    Budget,
    InProcessMovingWindow,
    RateLimited,
    RateLimiter,
    RateLimitMetrics,
    TrustedProxies,
    client_ip,
    parse_budget,
)
from message_service.settings import Settings
from tests.unit.message_service.helpers import (
    PASSWORD,
    Account,
    make_settings,
    register,
    running_app,
)

ATTACKER = "203.0.113.7"
NEIGHBOUR = "198.51.100.20"
BAD = {"Authorization": "Bearer not-a-token"}


@asynccontextmanager
async def limited_app(sqlite_url: str, **overrides: Any) -> AsyncIterator[FastAPI]:
    async with running_app(make_settings(sqlite_url, **overrides)) as app:
        yield app


def client_from(app: FastAPI, ip: str) -> httpx.AsyncClient:
    """A client whose requests come from `ip` (the socket peer the app sees)."""
    transport = httpx.ASGITransport(app=app, client=(ip, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://test")


def refused(app: FastAPI, budget: str) -> float:
    value = service_of(app).registry.get_sample_value(
        "herald_message_rate_limited_total", {"budget": budget}
    )
    return value or 0.0


def assert_rate_limited(response: httpx.Response, budget: str, *, limit: int, window: int) -> int:
    """The 429's headers and body; its Retry-After."""
    assert response.status_code == 429, response.text
    retry_after = int(response.headers["retry-after"])
    assert 1 <= retry_after <= window
    assert response.headers["ratelimit-policy"] == f'"{budget}";q={limit};w={window}'
    assert response.headers["ratelimit"] == f'"{budget}";r=0;t={retry_after}'
    assert response.json() == {
        "detail": f"rate limit reached ({budget}): retry after {retry_after} s"
    }
    return retry_after


async def test_failed_authentications_are_counted_per_ip_then_refused_before_the_lookup(
    sqlite_url: str,
) -> None:
    async with (
        limited_app(sqlite_url, rate_limit_auth_failures="3 per minute") as app,
        client_from(app, ATTACKER) as attacker,
        client_from(app, NEIGHBOUR) as neighbour,
    ):
        # A user of the attacker's address, registered before the attack.
        victim = await register(attacker, "victim")
        alice = await register(neighbour, "alice")
        answers = [await attacker.get("/users/me", headers=BAD) for _ in range(2)]
        answers.append(await attacker.get("/users/me"))  # no token at all: a failure too
        over = await attacker.get("/users/me", headers=BAD)
        # Over the budget, a good token from that address is refused too: no guess is looked at.
        good_token_there = await attacker.get("/users/me", headers=victim.headers)
        elsewhere = await neighbour.get("/users/me", headers=alice.headers)
        bad_elsewhere = await neighbour.get("/users/me", headers=BAD)

        assert [answer.status_code for answer in answers] == [401, 401, 401]
        assert_rate_limited(over, "auth_failures", limit=3, window=60)
        assert_rate_limited(good_token_there, "auth_failures", limit=3, window=60)
        assert elsewhere.status_code == 200
        assert bad_elsewhere.status_code == 401
        assert refused(app, "auth_failures") == 2


async def test_retry_after_is_honoured(sqlite_url: str) -> None:
    async with (
        limited_app(sqlite_url, rate_limit_auth_failures="2 per 1 second") as app,
        client_from(app, ATTACKER) as attacker,
    ):
        assert [(await attacker.get("/users/me", headers=BAD)).status_code for _ in range(2)] == [
            401,
            401,
        ]
        retry_after = assert_rate_limited(
            await attacker.get("/users/me", headers=BAD), "auth_failures", limit=2, window=1
        )
        await asyncio.sleep(retry_after)  # the rule under test is a time
        assert (await attacker.get("/users/me", headers=BAD)).status_code == 401


async def test_posting_spends_the_users_budget_not_the_tokens(sqlite_url: str) -> None:
    async with (
        limited_app(
            sqlite_url, rate_limit_posting="3 per minute", rate_limit_session="4 per minute"
        ) as app,
        client_from(app, ATTACKER) as client,
    ):
        alice, bob = await register(client, "alice"), await register(client, "bob")
        room = await client.post(
            "/rooms", json={"name": "general", "member_ids": []}, headers=alice.headers
        )
        assert room.status_code == 201
        room_id = room.json()["id"]  # alice's session budget: 1 of 4 spent (room creation: no)
        await client.post(
            f"/rooms/{room_id}/members", json={"user_id": str(bob.id)}, headers=alice.headers
        )
        await client.post(f"/rooms/{room_id}/join", headers=bob.headers)

        async def post(account: Account) -> httpx.Response:
            return await client.post(
                f"/rooms/{room_id}/messages", json={"content": "hi"}, headers=account.headers
            )

        alices = [(await post(alice)).status_code for _ in range(3)]
        over = await post(alice)
        bobs = await post(bob)
        # Reading spends the token's budget, untouched by the posts.
        reads = [
            (await client.get(f"/rooms/{room_id}/messages", headers=alice.headers)).status_code
            for _ in range(4)
        ]
        read_over = await client.get("/users/me", headers=alice.headers)

    assert alices == [201, 201, 201]
    assert_rate_limited(over, "posting", limit=3, window=60)
    assert bobs.status_code == 201
    assert reads == [200, 200, 200, 200]
    assert_rate_limited(read_over, "session", limit=4, window=60)


async def test_edits_and_deletes_spend_the_posting_budget(sqlite_url: str) -> None:
    async with (
        limited_app(sqlite_url, rate_limit_posting="3 per minute") as app,
        client_from(app, ATTACKER) as client,
    ):
        alice = await register(client, "alice")
        room = await client.post(
            "/rooms", json={"name": "general", "member_ids": []}, headers=alice.headers
        )
        messages = f"/rooms/{room.json()['id']}/messages"
        posted = await client.post(messages, json={"content": "hi"}, headers=alice.headers)
        message = f"{messages}/{posted.json()['id']}"
        edited = await client.patch(message, json={"content": "hey"}, headers=alice.headers)
        deleted = await client.delete(message, headers=alice.headers)
        over = await client.post(messages, json={"content": "again"}, headers=alice.headers)

    assert (posted.status_code, edited.status_code, deleted.status_code) == (201, 200, 204)
    assert_rate_limited(over, "posting", limit=3, window=60)


async def test_each_token_has_its_own_session_budget(sqlite_url: str) -> None:
    async with (
        limited_app(sqlite_url, rate_limit_session="2 per minute") as app,
        client_from(app, ATTACKER) as client,
    ):
        alice, bob = await register(client, "alice"), await register(client, "bob")
        alices = [(await client.get("/users/me", headers=alice.headers)).status_code for _ in "abc"]
        bobs = [(await client.get("/users/me", headers=bob.headers)).status_code for _ in "ab"]

    assert alices[:2] == [200, 200]
    assert alices[2] == 429
    assert bobs == [200, 200]


async def test_room_creation_invitations_and_devices_spend_per_user_budgets(
    sqlite_url: str,
) -> None:
    async with (
        limited_app(
            sqlite_url,
            rate_limit_rooms="2 per hour",
            rate_limit_invitations="3 per hour",
            rate_limit_devices="1 per hour",
        ) as app,
        client_from(app, ATTACKER) as client,
    ):
        alice = await register(client, "alice")
        others = [await register(client, name) for name in ("bob", "carol", "dave", "erin")]
        ids = [str(other.id) for other in others]
        # Each listed member costs one invitation: a room of 4 can never fit a budget of 3 (the
        # attempt spends one room creation).
        too_many = await client.post(
            "/rooms", json={"name": "big", "member_ids": ids}, headers=alice.headers
        )
        two = await client.post(
            "/rooms", json={"name": "two", "member_ids": ids[:2]}, headers=alice.headers
        )
        third_room = await client.post(
            "/rooms", json={"name": "three", "member_ids": []}, headers=alice.headers
        )
        room_id = two.json()["id"]
        invite = [
            await client.post(
                f"/rooms/{room_id}/members", json={"user_id": other}, headers=alice.headers
            )
            for other in ids[2:]
        ]
        devices = [
            await client.post(
                "/users/me/devices",
                json={"platform": "fcm", "token": f"device-{number}"},
                headers=alice.headers,
            )
            for number in range(2)
        ]
        bobs_device = await client.post(
            "/users/me/devices",
            json={"platform": "fcm", "token": "device-bob"},
            headers=others[0].headers,
        )

    assert too_many.status_code == 429
    assert too_many.headers["retry-after"] == "3600"  # never: the whole window, not a free slot
    assert two.status_code == 201
    assert_rate_limited(third_room, "rooms", limit=2, window=3600)
    assert [answer.status_code for answer in invite] == [201, 429]
    assert_rate_limited(invite[1], "invitations", limit=3, window=3600)
    assert [answer.status_code for answer in devices] == [201, 429]
    assert_rate_limited(devices[1], "devices", limit=1, window=3600)
    assert bobs_device.status_code == 201


async def test_registration_is_limited_per_ip_whatever_its_answer(sqlite_url: str) -> None:
    async with (
        limited_app(sqlite_url, rate_limit_registration="2 per hour") as app,
        client_from(app, ATTACKER) as attacker,
        client_from(app, NEIGHBOUR) as neighbour,
    ):
        body = {
            "username": "alice",
            "display_name": "A",
            "email": "a@example.test",
            "password": PASSWORD,
        }
        answers = [await attacker.post("/users", json=body) for _ in range(2)]
        probe = await attacker.post("/users", json={**body, "username": "bob"})
        elsewhere = await neighbour.post("/users", json={**body, "username": "bob"})

    assert [answer.status_code for answer in answers] == [201, 409]  # a probe spends the budget
    assert_rate_limited(probe, "registration", limit=2, window=3600)
    assert elsewhere.status_code == 201


async def test_registration_answers_no_sooner_than_its_floor_taken_or_not(
    sqlite_url: str,
) -> None:
    async with (
        limited_app(sqlite_url, registration_min_seconds=0.3) as app,
        client_from(app, ATTACKER) as client,
    ):
        body = {
            "username": "alice",
            "display_name": "A",
            "email": "a@example.test",
            "password": PASSWORD,
        }
        durations = []
        for expected in (201, 409):
            started = time.monotonic()
            response = await client.post("/users", json=body)
            durations.append(time.monotonic() - started)
            assert response.status_code == expected

    assert all(duration >= 0.3 for duration in durations), durations


async def test_unsubscribe_links_spend_the_anonymous_budget(sqlite_url: str) -> None:
    async with (
        limited_app(sqlite_url, rate_limit_anonymous="2 per minute") as app,
        client_from(app, ATTACKER) as client,
    ):
        answers = [await client.get("/unsubscribe", params={"token": "forged"}) for _ in "abc"]

    assert [answer.status_code for answer in answers[:2]] == [400, 400]
    assert_rate_limited(answers[2], "anonymous", limit=2, window=60)


async def test_behind_a_trusted_proxy_the_forwarded_address_is_the_client(
    sqlite_url: str,
) -> None:
    async with (
        limited_app(
            sqlite_url, rate_limit_auth_failures="1 per minute", trusted_proxies="10.0.0.0/8"
        ) as app,
        client_from(app, "10.1.2.3") as proxy,
        client_from(app, "192.0.2.50") as untrusted,
    ):

        async def failed(client: httpx.AsyncClient, forwarded: str) -> int:
            response = await client.get("/users/me", headers={**BAD, "X-Forwarded-For": forwarded})
            return response.status_code

        # Two clients through the proxy: a budget each.
        first = [await failed(proxy, ATTACKER), await failed(proxy, ATTACKER)]
        second = await failed(proxy, f"{ATTACKER}, {NEIGHBOUR}")  # the proxy appended NEIGHBOUR
        # A peer that is no trusted proxy forwards nothing: its own address is counted.
        spoofed = [await failed(untrusted, "192.0.2.1"), await failed(untrusted, "192.0.2.2")]

    assert first == [401, 429]
    assert second == 401
    assert spoofed == [401, 429]


@pytest.mark.parametrize(
    ("peer", "forwarded", "expected"),
    [
        ("192.0.2.1", ["203.0.113.7"], "192.0.2.1"),  # not a trusted proxy: its header is ignored
        ("10.0.0.1", [], "10.0.0.1"),
        ("10.0.0.1", ["203.0.113.7"], "203.0.113.7"),
        ("10.0.0.1", ["1.2.3.4, 203.0.113.7"], "203.0.113.7"),  # what the client wrote: left
        ("10.0.0.1", ["203.0.113.7, 10.0.0.2"], "203.0.113.7"),  # two proxies
        ("10.0.0.1", ["203.0.113.7", "10.0.0.2"], "203.0.113.7"),  # two header lines
        ("10.0.0.1", ["10.0.0.3"], "10.0.0.1"),  # only proxies: the nearest is what we know
        ("10.0.0.1", ["not-an-address"], "10.0.0.1"),
        ("10.0.0.1", ["2001:db8::1"], "2001:db8::1"),
        (None, [], "unknown"),
    ],
)
def test_client_ip(peer: str | None, forwarded: list[str], expected: str) -> None:
    trusted = Settings(database_url="sqlite+aiosqlite://", trusted_proxies="10.0.0.0/8")
    assert client_ip(peer, forwarded, trusted.trusted_proxies) == expected


def test_without_trusted_proxies_the_peer_is_the_client() -> None:
    none: TrustedProxies = ()
    assert client_ip("10.0.0.1", ["203.0.113.7"], none) == "10.0.0.1"


@pytest.mark.parametrize(
    "overrides",
    [
        {"rate_limit_posting": "lots"},
        {"rate_limit_session": "10 per fortnight"},
        {"trusted_proxies": "10.0.0.0/8,not-a-network"},
    ],
)
def test_bad_settings_are_refused_at_start(overrides: dict[str, str]) -> None:
    with pytest.raises(ValidationError):
        Settings(database_url="sqlite+aiosqlite://", **overrides)  # type: ignore[arg-type]


async def test_switched_off_nothing_is_counted(sqlite_url: str) -> None:
    async with (
        limited_app(sqlite_url, rate_limits=False, rate_limit_auth_failures="1 per hour") as app,
        client_from(app, ATTACKER) as client,
    ):
        answers = [(await client.get("/users/me", headers=BAD)).status_code for _ in range(5)]
    assert answers == [401] * 5


async def test_redis_unreachable_fails_open_to_counting_in_process(
    sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with (
        limited_app(
            sqlite_url,
            redis_url="redis://127.0.0.1:1/0",  # nothing listens there
            rate_limit_session="3 per minute",
        ) as app,
        client_from(app, ATTACKER) as client,
    ):
        with caplog.at_level(logging.INFO, logger="message_service"):
            alice = await register(client, "alice")
            answers = [
                (await client.get("/users/me", headers=alice.headers)).status_code for _ in range(4)
            ]
        errors = service_of(app).registry.get_sample_value(
            "herald_message_rate_limit_storage_errors_total"
        )

    # The API answers; each process enforces the budget by itself meanwhile.
    assert answers == [200, 200, 200, 429]
    assert errors is not None
    assert errors >= 1
    lines = [r.getMessage() for r in caplog.records if "ratelimit" in r.name]
    assert len(lines) == 1, lines  # one line per outage, not one per request
    assert lines[0].startswith("message_service.ratelimit.shared_storage_unavailable")
    for secret in (ATTACKER, alice.token, str(alice.session_id), "alice", str(alice.id)):
        assert secret not in lines[0]
    assert re.search(r"retried every \d+ s", lines[0])


async def test_counting_in_this_process_is_not_cut_by_the_redis_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A count in this process that waits on a busy event loop (here: one that takes 50 ms
    against a 10 ms Redis timeout) still counts, and refuses past the budget; it was a 500."""
    limiter = RateLimiter(
        budgets=dict.fromkeys(Budget, parse_budget("2 per minute")),
        metrics=RateLimitMetrics(CollectorRegistry()),
        redis_timeout=0.01,
    )
    local = limiter._local  # the in-process limiter, made slow
    counted = local.hit
    windows = local.get_window_stats

    async def slow_hit(*args: Any, **kwargs: Any) -> bool:
        await asyncio.sleep(0.05)
        return await counted(*args, **kwargs)

    async def slow_stats(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0.05)
        return await windows(*args, **kwargs)

    monkeypatch.setattr(local, "hit", slow_hit)
    monkeypatch.setattr(local, "get_window_stats", slow_stats)

    await limiter.hit(Budget.POSTING, "user")
    await limiter.hit(Budget.POSTING, "user")
    with pytest.raises(RateLimited) as refused:
        await limiter.hit(Budget.POSTING, "user")
    assert refused.value.retry_after >= 1
    assert limiter.metrics.storage_errors._value.get() == 0  # no storage failed


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


async def test_the_in_process_window_moves_one_hit_at_a_time() -> None:
    """3 per minute: a fourth hit is refused until the first one is a minute old; then exactly
    one more fits. `test` spends nothing; the stats say when a slot frees and how many are
    left."""
    clock = Clock()
    window = InProcessMovingWindow(clock)
    item = parse_budget("3 per minute")
    for second in (0, 10, 20):
        clock.now = 1_000_000.0 + second
        assert await window.hit(item, "posting", "alice")
    clock.now = 1_000_030.0
    assert not await window.test(item, "posting", "alice")
    assert not await window.hit(item, "posting", "alice")
    assert await window.hit(item, "posting", "bob")  # another key, its own window
    stats = await window.get_window_stats(item, "posting", "alice")
    assert (stats.reset_time, stats.remaining) == (1_000_060.0, 0)

    clock.now = 1_000_060.0  # the first hit leaves the window
    assert await window.test(item, "posting", "alice")
    assert await window.test(item, "posting", "alice")  # testing spent nothing
    assert await window.hit(item, "posting", "alice")
    assert not await window.hit(item, "posting", "alice")
    stats = await window.get_window_stats(item, "posting", "alice")
    assert (stats.reset_time, stats.remaining) == (1_000_070.0, 0)


async def test_the_in_process_window_weighs_costs_and_refuses_one_over_the_amount() -> None:
    clock = Clock()
    window = InProcessMovingWindow(clock)
    item = parse_budget("5 per minute")
    assert not await window.hit(item, "invitations", "alice", cost=6)  # never fits
    assert await window.hit(item, "invitations", "alice", cost=4)
    assert not await window.test(item, "invitations", "alice", cost=2)
    assert not await window.hit(item, "invitations", "alice", cost=2)  # nothing spent
    assert await window.hit(item, "invitations", "alice", cost=1)
    stats = await window.get_window_stats(item, "invitations", "alice")
    assert stats.remaining == 0
    empty = await window.get_window_stats(item, "invitations", "bob")
    assert (empty.reset_time, empty.remaining) == (clock.now + 60, 5)


async def test_the_in_process_window_forgets_keys_whose_hits_all_expired() -> None:
    """Memory follows the keys in use: one sweep a minute drops the keys with no hit left in
    their window, and keeps the others."""
    clock = Clock()
    window = InProcessMovingWindow(clock)
    minute, hour = parse_budget("10 per minute"), parse_budget("10 per hour")
    for user in range(1000):
        assert await window.hit(minute, "session", str(user))
    assert await window.hit(hour, "rooms", "alice")
    assert len(window._hits) == 1001
    clock.now += InProcessMovingWindow.SWEEP_EVERY_S
    assert await window.hit(minute, "session", "bob")
    assert set(window._hits) == {hour.key_for("rooms", "alice"), minute.key_for("session", "bob")}
    assert (await window.get_window_stats(hour, "rooms", "alice")).remaining == 9


async def test_requests_of_one_key_take_turns_and_no_lock_outlives_them() -> None:
    limiter = RateLimiter(
        budgets=dict.fromkeys(Budget, parse_budget("2 per minute")),
        metrics=RateLimitMetrics(CollectorRegistry()),
    )
    inside: list[str] = []
    most_inside = 0

    async def attempt(key: str) -> None:
        nonlocal most_inside
        async with limiter.in_turn(Budget.SIGN_IN_FAILURES, key):
            inside.append(key)
            most_inside = max(most_inside, inside.count(key))
            await asyncio.sleep(0)  # let the others try to come in
            inside.remove(key)

    await asyncio.gather(*(attempt(key) for key in ["alice"] * 5 + ["bob"] * 5))

    assert most_inside == 1
    assert len(limiter._turns) == 0
