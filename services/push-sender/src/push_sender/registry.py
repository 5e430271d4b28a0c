"""Which provider serves a push: the device's platform selects it, each provider behind its own
gate (`herald_shared.sending.Gate`: a fair concurrency limit and a circuit breaker)."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from herald_shared.events import Platform, PushRequested
from herald_shared.resilience import BreakerPolicy, BreakerState, CircuitBreaker, FairLimiter
from herald_shared.sending import Answer, Gate, Verdict
from push_sender.providers import SETTINGS_HINTS, PushProvider, make_providers, max_in_flight
from push_sender.providers.base import ProviderAnswer
from push_sender.providers.base import Verdict as PushVerdict
from push_sender.settings import BreakerSettings, Settings
from push_sender.tables import Failure

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


def answer_of(answer: ProviderAnswer) -> Answer:
    """A push provider's classified answer, as the sender workflow takes it."""
    match answer.verdict:
        case PushVerdict.ACCEPTED:
            return Answer(Verdict.ACCEPTED, answer.reason)
        case PushVerdict.TOKEN_INVALID:
            return Answer(Verdict.GONE, answer.reason, failure=Failure.TOKEN_INVALID)
        case PushVerdict.REJECTED:
            return Answer(Verdict.REJECTED, answer.reason, failure=Failure.REJECTED)
        case PushVerdict.MISCONFIGURED:
            return Answer(Verdict.MISCONFIGURED, answer.reason, retry_after=answer.retry_after)
        case PushVerdict.TRANSIENT:
            return Answer(Verdict.TRANSIENT, answer.reason, retry_after=answer.retry_after)


class Answering:
    """A push provider as the sender workflow calls it (`herald_shared.sending.Provider`)."""

    def __init__(self, provider: PushProvider) -> None:
        self.provider = provider

    @property
    def name(self) -> str:
        return self.provider.name

    @property
    def deadline(self) -> float:
        return self.provider.deadline

    async def send(self, job: PushRequested) -> Answer:
        return answer_of(await self.provider.send(job))


PushGate = Gate[PushRequested]


class ProviderRegistry:
    """Platform → gated provider. A provider serving several platforms (the log provider)
    has one gate for all of them."""

    def __init__(self, routes: Mapping[Platform, PushGate]) -> None:
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
        gates: dict[int, PushGate] = {}
        routes: dict[Platform, PushGate] = {}
        for platform, provider in providers.items():
            gate = gates.get(id(provider))
            if gate is None:
                gate = gates[id(provider)] = Gate(
                    Answering(provider),
                    FairLimiter(limit_for(provider.name)),
                    CircuitBreaker(
                        policy, clock=clock, on_change=_listener(provider.name, on_change)
                    ),
                )
            routes[platform] = gate
        return cls(routes)

    def for_platform(self, platform: Platform) -> PushGate | None:
        return self._routes.get(platform)

    def provider_for(self, platform: Platform) -> PushProvider:
        gate = self._routes.get(platform)
        if gate is None:
            raise LookupError(f"no provider for platform {platform}")
        return _push_provider(gate)

    @property
    def gates(self) -> tuple[PushGate, ...]:
        """Each provider once."""
        return tuple({id(gate): gate for gate in self._routes.values()}.values())

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
        for gate in self.gates:
            breaker = _breaker(gate)
            entry: dict[str, Any] = {
                "state": breaker.state.label,
                "in_flight": gate.limiter.in_use,
                "waiting": gate.limiter.waiting,
            }
            if breaker.state is BreakerState.OPEN:
                entry["retry_in"] = round(breaker.retry_in(), 1)
            breakers[gate.name] = entry
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
        for gate in self.gates:
            try:
                await _push_provider(gate).aclose()
            except Exception as exc:  # close the others anyway
                errors.append(exc)
        if errors:
            raise errors[0]


def _push_provider(gate: PushGate) -> PushProvider:
    answering = gate.provider
    if not isinstance(answering, Answering):
        raise TypeError("a push gate holds an Answering provider")
    return answering.provider


def _breaker(gate: PushGate) -> CircuitBreaker:
    if gate.breaker is None:
        raise TypeError("every push provider has a breaker")
    return gate.breaker


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
    gated as `PUSH_BREAKER_*` and `PUSH_MAX_IN_FLIGHT_*` say."""
    return ProviderRegistry.build(
        make_providers(settings) if providers is None else providers,
        policy=breaker_policy(settings.breaker),
        limit_for=functools.partial(max_in_flight, settings),
        clock=clock,
        on_change=on_change,
    )
