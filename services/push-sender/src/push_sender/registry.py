"""Which provider serves a push: the device's platform selects it, each provider behind its own
bulkhead and circuit breaker (`resilience`)."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from herald_shared.events import Platform
from push_sender.providers import SETTINGS_HINTS, PushProvider, make_providers, max_in_flight
from push_sender.resilience import (
    BreakerPolicy,
    BreakerState,
    Bulkhead,
    CircuitBreaker,
    GuardedProvider,
)
from push_sender.settings import BreakerSettings, Settings

logger = logging.getLogger("push_sender.providers")

# Told of every breaker transition: (provider name, old state, new state, breaker).
BreakerListener = Callable[[str, BreakerState, BreakerState, CircuitBreaker], None]


def log_transition(
    name: str, old: BreakerState, new: BreakerState, breaker: CircuitBreaker
) -> None:
    if new is BreakerState.OPEN:
        logger.warning(
            "push.breaker_opened provider=%s was=%s cool_down=%.1fs",
            name,
            old.label,
            breaker.cool_down,
        )
    elif new is BreakerState.HALF_OPEN:
        logger.info("push.breaker_half_open provider=%s (one probe goes through)", name)
    else:
        logger.info("push.breaker_closed provider=%s", name)


class ProviderRegistry:
    """Platform → guarded provider. A provider serving several platforms (the log provider)
    has one bulkhead and one breaker for all of them."""

    def __init__(self, routes: Mapping[Platform, GuardedProvider]) -> None:
        self._routes = dict(routes)

    @classmethod
    def build(
        cls,
        providers: Mapping[Platform, PushProvider],
        *,
        policy: BreakerPolicy,
        limit_for: Callable[[str], int],
        clock: Callable[[], float] = time.monotonic,
        on_change: BreakerListener | None = None,
    ) -> ProviderRegistry:
        guards: dict[int, GuardedProvider] = {}
        routes: dict[Platform, GuardedProvider] = {}
        for platform, provider in providers.items():
            guard = guards.get(id(provider))
            if guard is None:
                guard = guards[id(provider)] = GuardedProvider(
                    provider,
                    Bulkhead(limit_for(provider.name)),
                    CircuitBreaker(
                        policy, clock=clock, on_change=_listener(provider.name, on_change)
                    ),
                )
            routes[platform] = guard
        return cls(routes)

    def for_platform(self, platform: Platform) -> GuardedProvider | None:
        return self._routes.get(platform)

    def provider_for(self, platform: Platform) -> PushProvider:
        guard = self._routes.get(platform)
        if guard is None:
            raise LookupError(f"no provider for platform {platform}")
        return guard.provider

    @property
    def guards(self) -> tuple[GuardedProvider, ...]:
        """Each provider once."""
        return tuple({id(guard): guard for guard in self._routes.values()}.values())

    @property
    def live_platforms(self) -> tuple[Platform, ...]:
        return tuple(platform for platform in Platform if platform in self._routes)

    @property
    def unsupported_platforms(self) -> tuple[Platform, ...]:
        return tuple(platform for platform in Platform if platform not in self._routes)

    def describe(self) -> dict[str, Any]:
        """For `/health/ready`: each provider's breaker, and the platforms nobody serves. An
        open breaker is a degraded provider, not an unready service: the others still send."""
        breakers: dict[str, Any] = {}
        for guard in self.guards:
            state = guard.breaker.state
            entry: dict[str, Any] = {"state": state.label, "in_flight": guard.bulkhead.in_flight}
            if state is BreakerState.OPEN:
                entry["retry_in"] = round(guard.breaker.retry_in(), 1)
            breakers[guard.name] = entry
        degraded = sorted(
            name for name, entry in breakers.items() if entry["state"] != BreakerState.CLOSED.label
        )
        return {
            "providers": breakers,
            "degraded": degraded,
            "unsupported_platforms": [str(p) for p in self.unsupported_platforms],
        }

    def log_start(self) -> None:
        live = ", ".join(
            f"{platform}={self._routes[platform].name}" for platform in self.live_platforms
        )
        missing = ", ".join(str(platform) for platform in self.unsupported_platforms)
        logger.info("push.providers live=%s unsupported=%s", live or "-", missing or "-")
        if missing:
            logger.warning(
                "push.platforms_unsupported platforms=%s: their pushes are reported failed "
                "as 'unsupported platform' (configure their provider to send them)",
                missing,
            )

    async def aclose(self) -> None:
        errors: list[BaseException] = []
        for guard in self.guards:
            try:
                await guard.provider.aclose()
            except Exception as exc:  # close the others anyway
                errors.append(exc)
        if errors:
            raise errors[0]


def settings_hint(provider: str) -> str:
    return SETTINGS_HINTS.get(provider, "the provider's settings")


def _listener(
    name: str, on_change: BreakerListener | None
) -> Callable[[CircuitBreaker, BreakerState, BreakerState], None]:
    def changed(breaker: CircuitBreaker, old: BreakerState, new: BreakerState) -> None:
        log_transition(name, old, new, breaker)
        if on_change is not None:
            on_change(name, old, new, breaker)

    return changed


def breaker_policy(settings: BreakerSettings) -> BreakerPolicy:
    return BreakerPolicy(
        failures=settings.failures,
        failure_rate=settings.failure_rate,
        window=settings.window,
        min_calls=settings.min_calls,
        cool_down=settings.cool_down,
        max_cool_down=max(settings.max_cool_down, settings.cool_down),
    )


def make_registry(
    settings: Settings,
    providers: Mapping[Platform, PushProvider] | None = None,
    *,
    clock: Callable[[], float] = time.monotonic,
    on_change: BreakerListener | None = None,
) -> ProviderRegistry:
    """The registry of the providers `settings` select (or of `providers`, for tests), each
    guarded as `PUSH_BREAKER_*` and `PUSH_MAX_IN_FLIGHT_*` say."""
    return ProviderRegistry.build(
        make_providers(settings) if providers is None else providers,
        policy=breaker_policy(settings.breaker),
        limit_for=functools.partial(max_in_flight, settings),
        clock=clock,
        on_change=on_change,
    )
