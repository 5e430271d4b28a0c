"""Rate limits: named budgets (`Budget`), each spent per key (an IP address, a user, an account,
a session), counted in a moving window: by the `limits` library in Redis when `REDIS_URL` is set
(every replica shares one count), or in this process otherwise (`InProcessMovingWindow`).

A request costs one round trip to Redis at most: the one budget that applies to it. Failed
authentications are counted per IP, and an IP over that budget is refused before its token is
even looked at; each replica remembers the IPs it saw go over until their window frees a slot,
so the check costs no round trip for anyone else (`RateLimiter.refuse_if_blocked`).

Redis unreachable: fail open to this process's own counts (each replica then enforces the budget
by itself, so N replicas allow up to N times it), one log line when the outage starts and one
when it ends, and `herald_message_rate_limit_storage_errors`; Redis is tried again every
`OUTAGE_RETRY_S` seconds. A limiter is protection against abuse, not authorization: refusing
every request because the counter is away would turn a Redis outage into an API outage.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Protocol

from limits import RateLimitItem, parse
from limits.aio.storage import RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.util import WindowStats
from prometheus_client import CollectorRegistry, Counter
from pydantic import BeforeValidator
from pydantic_settings import NoDecode

from herald_shared.retry import describe_error

if TYPE_CHECKING:
    from redis.asyncio import ConnectionPool

logger = logging.getLogger("message_service.ratelimit")

# After a failed round trip to Redis, this process counts by itself for this long.
OUTAGE_RETRY_S = 5.0


class Budget(StrEnum):
    """What is counted, and per what (the key)."""

    REGISTRATION = "registration"  # per IP: POST /users
    AUTH_FAILURES = "auth_failures"  # per IP: a missing or unknown bearer token, a bad password
    SIGN_INS = "sign_ins"  # per IP: POST /sessions
    SIGN_IN_FAILURES = "sign_in_failures"  # per account: a wrong password for it
    ANONYMOUS = "anonymous"  # per IP: the other calls without a token (unsubscribe links)
    POSTING = "posting"  # per user: POST /rooms/{id}/messages, PATCH and DELETE of one
    ROOMS = "rooms"  # per user: POST /rooms
    INVITATIONS = "invitations"  # per user, one per invitee: POST /rooms, /rooms/{id}/members
    DEVICES = "devices"  # per user: POST /users/me/devices
    SESSION = "session"  # per session: every other call with a token


class RateLimited(Exception):
    """Over `budget`: `limit` per `window` seconds, a slot free again in `retry_after` s."""

    def __init__(self, budget: Budget, *, limit: int, window: int, retry_after: int) -> None:
        super().__init__(f"over the {budget} budget")
        self.budget = budget
        self.limit = limit
        self.window = window
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        """`Retry-After` (RFC 9110) and the IETF draft's `RateLimit-Policy` and `RateLimit`
        fields (draft-ietf-httpapi-ratelimit-headers: quota `q`, window `w`, remaining `r`,
        seconds until reset `t`, each for the named policy)."""
        return {
            "Retry-After": str(self.retry_after),
            "RateLimit-Policy": f'"{self.budget}";q={self.limit};w={self.window}',
            "RateLimit": f'"{self.budget}";r=0;t={self.retry_after}',
        }


class RateLimitMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.refused = Counter(
            "herald_message_rate_limited",
            "Requests answered 429, by budget.",
            ["budget"],
            registry=registry,
        )
        self.storage_errors = Counter(
            "herald_message_rate_limit_storage_errors",
            "Round trips to the shared rate-limit storage (Redis) that failed; the request was "
            "counted in this process instead (fail open).",
            registry=registry,
        )


def parse_budget(value: str) -> RateLimitItem:
    """`"20 per 10 minutes"`, `"120/minute"` (the `limits` notation); ValueError otherwise."""
    try:
        return parse(value)
    except ValueError:
        raise ValueError(f"not a rate limit (like '20 per 10 minutes'): {value!r}") from None


class Limiter(Protocol):
    """What `RateLimiter` asks of a moving window (`limits`' `MovingWindowRateLimiter`)."""

    async def hit(self, item: RateLimitItem, *identifiers: str, cost: int = 1) -> bool: ...

    async def test(self, item: RateLimitItem, *identifiers: str, cost: int = 1) -> bool: ...

    async def get_window_stats(self, item: RateLimitItem, *identifiers: str) -> WindowStats: ...


class InProcessMovingWindow:
    """The moving window of `limits`, counted in this process: per key, the times of the hits
    still in its window, oldest first; a hit is refused when it would put more than the limit's
    amount in the last window.

    Not `limits`' own in-memory storage (5.8): after every hit it sweeps every key, each
    through a hop to a thread, which cost a fifth of message-service's CPU at 1,000
    notifications/s and a third of the p99 from a message's 201 to its push
    (docs/performance.md). Here a key's expired hits go when the key is next counted, and keys
    with no hit left in their window go in one sweep a minute, so memory follows the keys in
    use.
    """

    SWEEP_EVERY_S = 60.0

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._hits: dict[str, tuple[float, deque[float]]] = {}  # key: (window s, hit times)
        self._swept_at = clock()

    async def hit(self, item: RateLimitItem, *identifiers: str, cost: int = 1) -> bool:
        now = self._clock()
        hits = self._in_window(item, identifiers, now)
        if len(hits) + cost > item.amount:
            return False
        hits.extend([now] * cost)
        return True

    async def test(self, item: RateLimitItem, *identifiers: str, cost: int = 1) -> bool:
        return len(self._in_window(item, identifiers, self._clock())) + cost <= item.amount

    async def get_window_stats(self, item: RateLimitItem, *identifiers: str) -> WindowStats:
        """When the oldest hit in the window leaves it (a slot frees), and the slots left."""
        now = self._clock()
        hits = self._in_window(item, identifiers, now)
        oldest = hits[0] if hits else now
        return WindowStats(oldest + item.get_expiry(), item.amount - len(hits))

    def _in_window(
        self, item: RateLimitItem, identifiers: tuple[str, ...], now: float
    ) -> deque[float]:
        if now - self._swept_at >= self.SWEEP_EVERY_S:
            self._sweep(now)
        window = item.get_expiry()
        key = item.key_for(*identifiers)
        if (entry := self._hits.get(key)) is None:
            entry = self._hits[key] = (window, deque())
        hits = entry[1]
        while hits and hits[0] <= now - window:
            hits.popleft()
        return hits

    def _sweep(self, now: float) -> None:
        self._swept_at = now
        for key in [
            key
            for key, (window, hits) in self._hits.items()
            if not hits or hits[-1] <= now - window
        ]:
            del self._hits[key]


@dataclass
class _Block:
    until: float  # time.time()
    refusal: RateLimited


class RateLimiter:
    """Spends budgets (`hit`); `enabled=False` spends nothing and refuses nothing."""

    def __init__(
        self,
        *,
        budgets: Mapping[Budget, RateLimitItem],
        metrics: RateLimitMetrics,
        redis_url: str | None = None,
        key_prefix: str = "herald",
        redis_timeout: float = 0.25,
        outage_retry: float = OUTAGE_RETRY_S,
        enabled: bool = True,
    ) -> None:
        self.budgets = dict(budgets)
        self.enabled = enabled
        self.metrics = metrics
        self._local = InProcessMovingWindow()
        self._shared: MovingWindowRateLimiter | None = None
        self._pool: ConnectionPool | None = None
        self._timeout = redis_timeout
        self._outage_retry = outage_retry
        if redis_url and enabled:
            # Imported only with REDIS_URL set: redis-py costs ~17 MB of memory otherwise.
            from redis.asyncio import ConnectionPool

            self._pool = ConnectionPool.from_url(
                redis_url, socket_timeout=redis_timeout, socket_connect_timeout=redis_timeout
            )
            storage = RedisStorage(
                redis_url,
                implementation="redispy",
                key_prefix=key_prefix,
                connection_pool=self._pool,  # type: ignore[arg-type]  # passed on to redis-py
            )
            self._shared = MovingWindowRateLimiter(storage)
        self._shared_down_until = 0.0  # time.monotonic()
        self._blocked: dict[tuple[Budget, str], _Block] = {}
        # One lock per key, kept (weakly) as long as a request holds or waits for it.
        self._turns: weakref.WeakValueDictionary[tuple[Budget, str], asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )

    @property
    def blocking(self) -> bool:
        """Whether any key went over a budget here and may still be refused without I/O."""
        return bool(self._blocked)

    @property
    def shared(self) -> bool:
        """Whether the counts live in Redis (shared by the replicas)."""
        return self._shared is not None

    async def hit(self, budget: Budget, key: str, *, cost: int = 1) -> None:
        """Spend `cost` of `key`'s `budget`; RateLimited (nothing spent) when it has less left."""
        await self._count(budget, key, cost=cost, spend=True)

    async def check(self, budget: Budget, key: str) -> None:
        """RateLimited when `key` has nothing left of `budget`; spends nothing (what a failure
        spends later is checked before the work that may fail)."""
        await self._count(budget, key, cost=1, spend=False)

    def in_turn(self, budget: Budget, key: str) -> AbstractAsyncContextManager[None]:
        """Requests of one key take turns here, in this process: for a budget that is checked
        before slow work and spent after it fails (a password's check), so that a burst of
        guesses cannot all pass the check before the first of them has spent. Across N replicas
        up to N run at once, so a budget can be overshot by N - 1 at most."""
        lock = self._turns.get((budget, key))
        if lock is None:
            lock = self._turns[(budget, key)] = asyncio.Lock()
        return lock

    async def _count(self, budget: Budget, key: str, *, cost: int, spend: bool) -> None:
        if not self.enabled:
            return
        item = self.budgets[budget]

        async def ask(limiter: Limiter) -> bool:
            if spend:
                return await limiter.hit(item, budget, key, cost=cost)
            return await limiter.test(item, budget, key, cost=cost)

        limiter = self._limiter()
        if limiter is self._local:
            # No time limit here: `RATE_LIMIT_REDIS_TIMEOUT` bounds a round trip to Redis, and a
            # count in this process that waits on a busy event loop is no failure (it was one,
            # a 500, when this was cut by the same timeout).
            allowed = await ask(limiter)
        else:
            try:
                async with asyncio.timeout(self._timeout):
                    allowed = await ask(limiter)
            except Exception as exc:
                self._storage_failed(exc)
                limiter = self._local
                allowed = await ask(limiter)
            else:
                if self._shared_down_until:
                    self._shared_down_until = 0.0
                    logger.info("message_service.ratelimit.shared_storage_restored")
        if not allowed:
            refusal = await self._refusal(limiter, budget, item, key, cost)
            self.metrics.refused.labels(budget=budget.value).inc()
            raise refusal

    async def hit_and_block(self, budget: Budget, key: str) -> None:
        """`hit`, and when refused, remember it here: `refuse_if_blocked` refuses `key` without
        a round trip until a slot frees (every replica learns it on its own first refusal)."""
        try:
            await self.hit(budget, key)
        except RateLimited as refusal:
            self._blocked[(budget, key)] = _Block(time.time() + refusal.retry_after, refusal)
            self._forget_expired_blocks()
            raise

    def refuse_if_blocked(self, budget: Budget, key: str) -> None:
        """RateLimited, with the seconds left, if `key` went over `budget` here and its window
        has freed no slot since; no I/O."""
        if not self._blocked:
            return
        block = self._blocked.get((budget, key))
        if block is None:
            return
        left = block.until - time.time()
        if left <= 0:
            del self._blocked[(budget, key)]
            return
        self.metrics.refused.labels(budget=budget.value).inc()
        original = block.refusal
        raise RateLimited(
            budget, limit=original.limit, window=original.window, retry_after=math.ceil(left)
        )

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.disconnect()

    # --- internals --------------------------------------------------------------------------

    def _limiter(self) -> Limiter:
        if self._shared is not None and time.monotonic() >= self._shared_down_until:
            return self._shared
        return self._local

    def _storage_failed(self, exc: BaseException) -> None:
        self.metrics.storage_errors.inc()
        if not self._shared_down_until:
            logger.warning(
                "message_service.ratelimit.shared_storage_unavailable error=%s "
                "(counting in this process; retried every %g s)",
                describe_error(exc) if not isinstance(exc, TimeoutError) else "TimeoutError",
                self._outage_retry,
            )
        self._shared_down_until = time.monotonic() + self._outage_retry

    async def _refusal(
        self,
        limiter: Limiter,
        budget: Budget,
        item: RateLimitItem,
        key: str,
        cost: int,
    ) -> RateLimited:
        window = item.get_expiry()
        try:
            if limiter is self._local:
                stats = await limiter.get_window_stats(item, budget, key)
            else:
                async with asyncio.timeout(self._timeout):
                    stats = await limiter.get_window_stats(item, budget, key)
            retry_after = max(1, math.ceil(stats.reset_time - time.time()))
        except Exception as exc:
            if limiter is self._local:
                raise
            self._storage_failed(exc)
            retry_after = window
        if cost > item.amount:
            retry_after = window  # never within budget: say the window, not a free slot
        return RateLimited(budget, limit=item.amount, window=window, retry_after=retry_after)

    def _forget_expired_blocks(self) -> None:
        if len(self._blocked) < 1024:
            return
        now = time.time()
        for place in [place for place, block in self._blocked.items() if block.until <= now]:
            del self._blocked[place]


# --- the client's address -----------------------------------------------------------------------

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _split_networks(value: object) -> object:
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, list | tuple):
        return tuple(ipaddress.ip_network(str(part), strict=False) for part in value)
    return value


# `TRUSTED_PROXIES`, comma-separated addresses or networks (`10.0.0.0/8,127.0.0.1`).
TrustedProxies = Annotated[tuple[Network, ...], NoDecode, BeforeValidator(_split_networks)]


def client_ip(peer: str | None, forwarded_for: Iterable[str], trusted: tuple[Network, ...]) -> str:
    """Who is calling: the socket's peer, unless it is a trusted proxy; then the right-most
    address of `X-Forwarded-For` that is not a trusted proxy (what a client writes there itself
    is to the left of what the proxies appended, so it is never taken)."""
    if peer is None:
        return "unknown"
    if not trusted or not _trusted(peer, trusted):
        return peer
    hops = [hop.strip() for header in forwarded_for for hop in header.split(",")]
    for hop in reversed([hop for hop in hops if hop]):
        try:
            address = ipaddress.ip_address(hop)
        except ValueError:
            return peer  # a garbled header: the proxy is the best we know
        if not any(address in network for network in trusted):
            return str(address)
    return peer


def _trusted(peer: str, trusted: tuple[Network, ...]) -> bool:
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    return any(address in network for network in trusted)
