"""What one rate-limit check costs message-service: `RateLimiter.hit` on a budget it never
exhausts, in-process and on a Redis, one call after the other (as one request would).

    uv run python -m bench.limiter_cost [--redis-url redis://127.0.0.1:6379/0] [--calls 5000]

The keys it writes in Redis start with a random prefix and expire within a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid

from prometheus_client import CollectorRegistry

from message_service.ratelimit import Budget, RateLimiter, RateLimitMetrics, parse_budget


async def _per_call_us(limiter: RateLimiter, calls: int) -> list[float]:
    """Microseconds per call, over five rounds of `calls` calls each."""
    rounds = []
    for _ in range(100):  # warm up: connections, scripts loaded
        await limiter.hit(Budget.POSTING, "warm-up")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(calls):
            await limiter.hit(Budget.POSTING, "user")
        rounds.append((time.perf_counter() - started) / calls * 1e6)
    return rounds


async def _main(redis_url: str | None, calls: int) -> None:
    budgets = dict.fromkeys(Budget, parse_budget("100000000 per minute"))
    kinds: dict[str, str | None] = {"in-process": None}
    if redis_url:
        kinds["redis"] = redis_url
    for name, url in kinds.items():
        limiter = RateLimiter(
            budgets=budgets,
            metrics=RateLimitMetrics(CollectorRegistry()),
            redis_url=url,
            key_prefix=f"herald-bench-{uuid.uuid4().hex}",
        )
        try:
            rounds = await _per_call_us(limiter, calls)
        finally:
            await limiter.close()
        print(
            f"{name}: median {statistics.median(rounds):.1f} µs per check "
            f"(rounds of {calls}: {', '.join(f'{value:.1f}' for value in rounds)})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", default=None)
    parser.add_argument("--calls", type=int, default=5000)
    args = parser.parse_args()
    asyncio.run(_main(args.redis_url, args.calls))


if __name__ == "__main__":
    main()
