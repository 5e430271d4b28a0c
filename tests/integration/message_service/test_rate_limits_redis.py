"""The rate limiter on the machine's Redis: two limiters (as two replicas would hold) spend one
budget; a Redis that goes away (a TCP proxy cut) fails open to in-process counts with one log
line and a metric, and the shared counts are used again once it is back; a Redis that never
answers fails open after the timeout."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest
from prometheus_client import CollectorRegistry

from message_service.ratelimit import (
    Budget,
    RateLimited,
    RateLimiter,
    RateLimitMetrics,
    parse_budget,
)
from tests.integration.message_service.proxy import TcpProxy
from tests.support import infra


def limiter(redis_url: str, prefix: str, *, outage_retry: float = 5.0) -> RateLimiter:
    """3 of each budget per minute. Round trips wait up to 2 s, not the default 0.25 s: on a
    machine the whole suite keeps busy, a first round trip (connect, load the scripts) took
    longer and failed open (the timeout has a test of its own, below)."""
    return RateLimiter(
        budgets=dict.fromkeys(Budget, parse_budget("3 per minute")),
        metrics=RateLimitMetrics(CollectorRegistry()),
        redis_url=redis_url,
        key_prefix=prefix,
        outage_retry=outage_retry,
        redis_timeout=2.0,
    )


@pytest.fixture
async def replicas() -> AsyncIterator[tuple[RateLimiter, RateLimiter]]:
    prefix = infra.redis_key_prefix()
    first, second = limiter(infra.REDIS_URL, prefix), limiter(infra.REDIS_URL, prefix)
    yield first, second
    await first.close()
    await second.close()


async def spent(limiter: RateLimiter, key: str) -> bool:
    """Whether `limiter` let one more through."""
    try:
        await limiter.hit(Budget.POSTING, key)
    except RateLimited:
        return False
    return True


async def test_two_limiters_on_one_redis_share_each_budget(
    replicas: tuple[RateLimiter, RateLimiter],
) -> None:
    first, second = replicas
    answers = [await spent(limiter, "alice") for limiter in (first, second, first, second)]
    others = [await spent(second, "bob"), await spent(first, "bob")]

    assert answers == [True, True, True, False]
    assert others == [True, True]
    with pytest.raises(RateLimited) as raised:
        await first.hit(Budget.POSTING, "alice")
    assert 55 <= raised.value.retry_after <= 60


async def test_another_prefix_is_another_budget(
    replicas: tuple[RateLimiter, RateLimiter],
) -> None:
    first, _ = replicas
    elsewhere = limiter(infra.REDIS_URL, infra.redis_key_prefix())
    try:
        assert [await spent(first, "alice") for _ in range(4)] == [True, True, True, False]
        assert await spent(elsewhere, "alice")
    finally:
        await elsewhere.close()


async def test_a_block_is_learned_by_each_replica_on_its_first_refusal(
    replicas: tuple[RateLimiter, RateLimiter],
) -> None:
    first, second = replicas
    for _ in range(3):
        await first.hit_and_block(Budget.AUTH_FAILURES, "203.0.113.7")
    with pytest.raises(RateLimited):
        await first.hit_and_block(Budget.AUTH_FAILURES, "203.0.113.7")

    with pytest.raises(RateLimited):  # no round trip: remembered here
        first.refuse_if_blocked(Budget.AUTH_FAILURES, "203.0.113.7")
    second.refuse_if_blocked(Budget.AUTH_FAILURES, "203.0.113.7")  # not seen there yet
    with pytest.raises(RateLimited):  # its first failure finds the shared count spent
        await second.hit_and_block(Budget.AUTH_FAILURES, "203.0.113.7")
    with pytest.raises(RateLimited):
        second.refuse_if_blocked(Budget.AUTH_FAILURES, "203.0.113.7")


async def test_redis_going_away_fails_open_then_its_counts_are_used_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    target = urlsplit(infra.REDIS_URL)
    proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or 6379)
    await proxy.start()
    prefix = infra.redis_key_prefix()
    through_proxy = f"redis://127.0.0.1:{proxy.port}{target.path}"
    replica = limiter(through_proxy, prefix, outage_retry=0.2)
    direct = limiter(infra.REDIS_URL, prefix)
    try:
        with caplog.at_level(logging.INFO, logger="message_service"):
            assert await spent(replica, "alice")  # shared: 1 of 3
            await proxy.cut()
            # Counted in this process meanwhile: 3 more pass here.
            during = [await spent(replica, "alice") for _ in range(4)]
            errors = replica.metrics.storage_errors._value.get()  # the Counter's own value
            await proxy.restore()
            polls = iter(range(1000))

            async def restored() -> bool:
                await spent(replica, f"poll-{next(polls)}")  # a key of its own each time
                return "shared_storage_restored" in caplog.text

            await infra.wait_until(restored, timeout=10, interval=0.05)
            # The shared count again: 1 spent before the outage, so 2 more, here or anywhere.
            after = [await spent(replica, "alice") for _ in range(3)]
        assert await spent(direct, "alice") is False
    finally:
        await replica.close()
        await direct.close()
        await proxy.cut()

    assert during == [True, True, True, False]
    assert after == [True, True, False]
    assert errors >= 1
    lines = [r.getMessage() for r in caplog.records if r.name == "message_service.ratelimit"]
    assert lines[0].startswith("message_service.ratelimit.shared_storage_unavailable")
    assert lines[1] == "message_service.ratelimit.shared_storage_restored"
    assert len(lines) == 2, lines
    assert all("alice" not in line for line in lines)


async def test_a_redis_that_never_answers_fails_open_within_the_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A server that accepts connections and says nothing (a hung Redis, a black hole): each
    round trip gives up after `redis_timeout`, then the process counts alone."""
    hung: list[asyncio.StreamWriter] = []

    async def accept_and_wait(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hung.append(writer)

    server = await asyncio.start_server(accept_and_wait, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    replica = RateLimiter(
        budgets=dict.fromkeys(Budget, parse_budget("2 per minute")),
        metrics=RateLimitMetrics(CollectorRegistry()),
        redis_url=f"redis://127.0.0.1:{port}/0",
        key_prefix=infra.redis_key_prefix(),
        redis_timeout=0.2,
    )
    try:
        with caplog.at_level(logging.WARNING, logger="message_service"):
            started = time.monotonic()
            answers = [await spent(replica, "alice") for _ in range(3)]
            elapsed = time.monotonic() - started
    finally:
        await replica.close()
        for writer in hung:
            writer.close()
        server.close()
        await server.wait_closed()

    assert answers == [True, True, False]
    # One timeout, then in-process until the retry: not one timeout per request.
    assert elapsed < 1.0, elapsed
    lines = [r.getMessage() for r in caplog.records if r.name == "message_service.ratelimit"]
    assert len(lines) == 1
    assert "TimeoutError" in lines[0]
