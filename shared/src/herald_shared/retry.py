"""Herald's one retry and dead-letter mechanism, as a broker middleware.

Handlers only raise. The middleware decides what happens to the delivery:

* it succeeded → ack (FastStream's default);
* `PermanentError`, or a body that does not parse into the handler's event → dead-letter now;
* `DeferredError`, or a dependency that cannot be reached (a database or broker connection that
  is refused, reset or timed out) → the message is fine and only the moment is wrong: it waits as
  a retry does but spends no attempt, so an outage of any length up to `max_deferrals` waits
  costs no message its retries;
* anything else (`RetryableError`, a provider timeout, a bug…) → the message waits in the origin
  queue's wait queue for the current tier, then comes back to that queue alone through its retry
  routing key; after `max_retries` retries it is dead-lettered.

A service may register a hook per queue (`DeadLetterHooks`) that runs when a message of that
queue is dead-lettered for lack of retries, so that, for example, a sender reports the
notification as failed instead of leaving it pending.

Dead-lettering publishes the original body to the origin queue's `<queue>.dlq` (through
`notifications.delay`, like a retry, so each service may reach only its own queues) with the
reason, the last error and the attempt history in headers, then acks; if even that publish fails,
the delivery is rejected and RabbitMQ's own dead-lettering (the queue's `x-dead-letter-exchange`,
`notifications.dlx`) takes it. The attempt count lives in a header, never in the payload. Nothing
is ever requeued in a hot loop.

Errors are described without their input: a pydantic error lists locations and error types only,
and an unknown exception is named by its class and where it was raised, because its text (an SQL
statement's parameters, say) may contain an e-mail address or message text.
"""

from __future__ import annotations

import errno
import json
import logging
import socket
import traceback
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import aiormq.exceptions
import pydantic
import sqlalchemy.exc
from aio_pika.abc import AbstractRobustChannel
from faststream import BaseMiddleware
from faststream.exceptions import AckMessage, HandlerException, NackMessage, RejectMessage
from faststream.message import StreamMessage

from herald_shared.publishing import (
    consumed_correlation_id,
    publish_confirmed,
    publishing_channel,
)
from herald_shared.topology import RETRY_EXCHANGE, ConsumerQueue, queue_for_routing_key

logger = logging.getLogger("herald.retry")

ATTEMPT_HEADER = "x-herald-attempt"  # deliveries that failed before this one
DEFERRALS_HEADER = "x-herald-deferrals"  # times it waited without spending an attempt
ERROR_HEADER = "x-herald-error"  # the last error, described safely
HISTORY_HEADER = "x-herald-history"  # one safe line per failed attempt
ORIGIN_HEADER = "x-herald-origin-queue"
# permanent | unparsable | retries-exhausted | deferred-too-long
REASON_HEADER = "x-herald-dead-letter-reason"

MAX_HISTORY = 10
# Upper bound for putting a failed message in its wait or dead-letter queue, confirm included.
REPUBLISH_TIMEOUT_S = 10.0
HEADER_TEXT_LIMIT = 500


class RetryableError(Exception):
    """A transient failure: try the same message again later.

    `reason` must hold no personal data: it is logged and stored in headers.
    """

    def __init__(self, reason: str, *, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class DeferredError(Exception):
    """The message is fine but cannot be handled now (another worker holds it, a dependency is
    down): it waits like a retry, at least `retry_after` seconds, without spending an attempt.

    `reason` must hold no personal data: it is logged and stored in headers.
    """

    def __init__(self, reason: str, *, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class PermanentError(Exception):
    """A failure that no retry can fix: dead-letter the message now.

    `reason` must hold no personal data: it is logged and stored in headers.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


ItemError = RetryableError | DeferredError | PermanentError


def batch_error(errors: Iterable[ItemError | None]) -> ItemError | None:
    """How a batch ends whose items ended with `errors` (`None`: that item is done).

    A batch is retried or dead-lettered as a whole, and the items it finished are no-ops when it
    comes back, so the item that still needs something decides: a retry (an attempt is spent)
    before a deferral (waits without spending one) before a dead letter (an item refused for
    good is final in the ledger and reported already; it only goes to the dead-letter queue for
    the operator when nothing else in the batch has to come back). The reason is the first such
    item's, with how many there are; the wait is the longest any of them asked for.
    """
    failed = [error for error in errors if error is not None]
    retries = [error for error in failed if isinstance(error, RetryableError)]
    if retries:
        return RetryableError(_batch_reason(retries), retry_after=_longest_wait(retries))
    deferrals = [error for error in failed if isinstance(error, DeferredError)]
    if deferrals:
        return DeferredError(_batch_reason(deferrals), retry_after=_longest_wait(deferrals))
    refusals = [error for error in failed if isinstance(error, PermanentError)]
    return PermanentError(_batch_reason(refusals)) if refusals else None


def _batch_reason(errors: Sequence[ItemError]) -> str:
    first = errors[0].reason
    return first if len(errors) == 1 else f"{first} (and {len(errors) - 1} more)"


def _longest_wait(errors: Sequence[RetryableError | DeferredError]) -> float | None:
    return max((e.retry_after for e in errors if e.retry_after is not None), default=None)


@dataclass(frozen=True)
class RetryPolicy:
    delays: tuple[float, ...]
    max_retries: int
    # Waits without an attempt spent (`DeferredError`, unreachable dependency) before a message
    # is dead-lettered anyway; the default outlasts hours of outage on the default tiers.
    max_deferrals: int = 1000

    def delay_for(self, retry_number: int, retry_after: float | None = None) -> float:
        """The wait before retry `retry_number` (1-based): its tier, or the first tier that is at
        least the provider's `Retry-After`."""
        tier = self.delays[min(retry_number, len(self.delays)) - 1]
        if retry_after is not None and retry_after > tier:
            return next((delay for delay in self.delays if delay >= retry_after), self.delays[-1])
        return tier


def describe_error(exc: BaseException) -> str:
    """A one-line description of an error that is safe to log and to store."""
    if isinstance(exc, RetryableError | PermanentError | DeferredError):
        text = f"{type(exc).__name__}: {exc.reason}"
    elif isinstance(exc, json.JSONDecodeError | UnicodeDecodeError):
        text = f"unparsable event ({type(exc).__name__} at position {_position(exc)})"
    elif isinstance(exc, pydantic.ValidationError):
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or '<body>'}: {error['type']}"
            for error in exc.errors(include_input=False, include_url=False, include_context=False)
        )
        text = f"unparsable event ({problems})"
    else:
        frames = traceback.extract_tb(exc.__traceback__)[-2:]
        where = ", ".join(f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}" for frame in frames)
        text = f"{type(exc).__module__}.{type(exc).__qualname__} at {where or 'unknown'}"
    return text[:HEADER_TEXT_LIMIT]


# What a body that cannot become an event raises: FastStream's JSON decoding (for a message sent
# as application/json) fails before pydantic ever sees it.
UNPARSABLE_ERRORS = (pydantic.ValidationError, json.JSONDecodeError, UnicodeDecodeError)


def is_unparsable(exc: BaseException) -> bool:
    return isinstance(exc, UNPARSABLE_ERRORS)


def _position(exc: json.JSONDecodeError | UnicodeDecodeError) -> int:
    return exc.pos if isinstance(exc, json.JSONDecodeError) else exc.start


def is_permanent(exc: BaseException) -> bool:
    return isinstance(exc, PermanentError) or is_unparsable(exc)


# Connection-level failures: the dependency is not there right now, whatever the message.
_UNREACHABLE_ERRNOS = frozenset(
    {
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ETIMEDOUT,
        errno.EPIPE,
    }
)
# PostgreSQL SQLSTATEs of a server that is away: class 08 (connection exception), shutting down
# (57P01 admin, 57P02 crash), starting up (57P03), too many connections (53300).
_UNAVAILABLE_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "53300"})


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, then what caused it (SQLAlchemy keeps the driver's error in `orig`)."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        orig = getattr(current, "orig", None)
        pending.extend(
            [
                current.__cause__,
                current.__context__,
                orig if isinstance(orig, BaseException) else None,
            ]
        )


def _is_unreachable(exc: BaseException) -> bool:
    if isinstance(exc, ConnectionError | TimeoutError | socket.gaierror):
        return True
    if isinstance(exc, OSError) and exc.errno in _UNREACHABLE_ERRNOS:
        return True
    if isinstance(exc, sqlalchemy.exc.DisconnectionError | sqlalchemy.exc.TimeoutError):
        return True
    if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(
        exc, aiormq.exceptions.AMQPConnectionError | aiormq.exceptions.ChannelInvalidStateError
    ):
        return True
    # The broker nacked a publish: a queue it routes to could not take it now (a quorum queue
    # electing a new leader after its node died, on a cluster). A returned (unroutable) publish,
    # `PublishError`, is a missing binding instead, and spends attempts as before.
    if isinstance(exc, aiormq.exceptions.DeliveryError) and not isinstance(
        exc, aiormq.exceptions.PublishError
    ):
        return True
    sqlstate = getattr(exc, "sqlstate", None)
    return isinstance(sqlstate, str) and (
        sqlstate.startswith("08") or sqlstate in _UNAVAILABLE_SQLSTATES
    )


def is_dependency_unavailable(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) says a database or the broker cannot be reached now,
    rather than that this message is wrong."""
    return any(_is_unreachable(cause) for cause in _causes(exc))


def is_deferred(exc: BaseException) -> bool:
    """Whether the failure waits without spending an attempt. A handler's own `RetryableError` or
    `PermanentError` is a verdict on this message and keeps its meaning even when a connection
    error caused it."""
    if isinstance(exc, DeferredError):
        return True
    if isinstance(exc, RetryableError | PermanentError) or is_unparsable(exc):
        return False
    return is_dependency_unavailable(exc)


def _count(headers: dict[str, Any], name: str) -> int:
    try:
        return max(0, int(headers.get(name, 0)))
    except (TypeError, ValueError):
        return 0


def attempts_so_far(headers: dict[str, Any]) -> int:
    return _count(headers, ATTEMPT_HEADER)


def deferrals_so_far(headers: dict[str, Any]) -> int:
    return _count(headers, DEFERRALS_HEADER)


# Runs when a message of the hook's queue is dead-lettered for lack of retries (retries or
# deferrals exhausted), with the message and the safe description of its last error.
DeadLetterHook = Callable[[StreamMessage[Any], str], Awaitable[None]]


@dataclass
class DeadLetterHooks:
    """The hooks of one broker, by origin queue name. A service registers its hooks once its
    publishers exist, before the broker starts."""

    by_queue: dict[str, DeadLetterHook] = field(default_factory=dict)

    def register(self, queue: str, hook: DeadLetterHook) -> None:
        self.by_queue[queue] = hook


class OutcomeMetrics(Protocol):
    """What the middleware reports (`herald_shared.metrics.HeraldMetrics`), by origin queue."""

    def retry_scheduled(self, queue: str) -> None: ...

    def deferred(self, queue: str) -> None: ...

    def dead_letter(self, queue: str, reason: str) -> None: ...


class OutcomeMiddleware(BaseMiddleware):
    """Turns a handler's failure into a delayed retry or a dead letter (see module docstring)."""

    policy: ClassVar[RetryPolicy]
    hooks: ClassVar[DeadLetterHooks]
    metrics: ClassVar[OutcomeMetrics | None] = None

    async def consume_scope(
        self, call_next: Callable[[Any], Awaitable[Any]], msg: StreamMessage[Any]
    ) -> Any:
        correlation = consumed_correlation_id.set(msg.correlation_id)
        try:
            return await call_next(msg)
        except HandlerException:
            raise
        except Exception as exc:
            await self._settle_failure(msg, exc)
            raise  # unreachable: _settle_failure always raises an outcome
        finally:
            consumed_correlation_id.reset(correlation)

    async def _settle_failure(self, msg: StreamMessage[Any], exc: Exception) -> None:
        routing_key = getattr(msg.raw_message, "routing_key", "") or ""
        origin = queue_for_routing_key(routing_key)
        headers = dict(msg.headers)
        error = describe_error(exc)
        if origin is None:
            logger.error(
                "herald.message.unroutable_failure routing_key=%s error=%s", routing_key, error
            )
            raise RejectMessage() from exc
        headers.update({ERROR_HEADER: error, ORIGIN_HEADER: origin.name})

        retry_after = exc.retry_after if isinstance(exc, RetryableError | DeferredError) else None
        deferred = is_deferred(exc)
        if deferred:
            deferrals = deferrals_so_far(headers) + 1
            headers[DEFERRALS_HEADER] = deferrals
            if deferrals > self.policy.max_deferrals:
                await self._dead_letter(msg, headers, origin, "deferred-too-long", error, exc)
            delay = self.policy.delay_for(deferrals, retry_after)
            logger.warning(
                "herald.message.deferred queue=%s message_id=%s deferrals=%d delay=%.3fs error=%s",
                origin.name,
                msg.message_id,
                deferrals,
                delay,
                error,
            )
        else:
            attempt = attempts_so_far(headers) + 1
            history = [*_as_list(headers.get(HISTORY_HEADER)), f"{attempt}: {error}"]
            headers.update({ATTEMPT_HEADER: attempt, HISTORY_HEADER: history[-MAX_HISTORY:]})
            if is_unparsable(exc) or isinstance(exc, PermanentError):
                reason = "unparsable" if is_unparsable(exc) else "permanent"
                await self._dead_letter(msg, headers, origin, reason, error, exc)
            if attempt > self.policy.max_retries:
                await self._dead_letter(msg, headers, origin, "retries-exhausted", error, exc)
            delay = self.policy.delay_for(attempt, retry_after)
            logger.warning(
                "herald.message.retry_scheduled queue=%s message_id=%s attempt=%d delay=%.3fs "
                "error=%s",
                origin.name,
                msg.message_id,
                attempt,
                delay,
                error,
            )
        # Not scheduled (the broker blocked or refused the publish): back to its own queue, to be
        # handled again; the queue's delivery limit bounds how often that can happen.
        await self._republish(
            msg,
            headers,
            RETRY_EXCHANGE.name,
            origin.wait_queue(delay).name,
            if_failed=NackMessage(requeue=True),
        )
        if self.metrics is not None:
            if deferred:
                self.metrics.deferred(origin.name)
            else:
                self.metrics.retry_scheduled(origin.name)
        raise AckMessage() from exc

    async def _dead_letter(
        self,
        msg: StreamMessage[Any],
        headers: dict[str, Any],
        origin: ConsumerQueue,
        reason: str,
        error: str,
        exc: Exception,
    ) -> None:
        """Publish `msg` to its queue's dead-letter queue and ack it (raises `AckMessage`)."""
        queue = origin.name
        headers[REASON_HEADER] = reason
        logger.error(
            "herald.message.dead_lettered queue=%s message_id=%s attempt=%d deferrals=%d "
            "reason=%s error=%s",
            queue,
            msg.message_id,
            attempts_so_far(headers),
            deferrals_so_far(headers),
            reason,
            error,
        )
        hook = self.hooks.by_queue.get(queue)
        if hook is not None and reason in {"retries-exhausted", "deferred-too-long"}:
            try:
                await hook(msg, error)
            except Exception as hook_error:
                # The dead letter matters more than the hook's side effect: log and go on.
                logger.error(
                    "herald.message.dead_letter_hook_failed queue=%s message_id=%s error=%s",
                    queue,
                    msg.message_id,
                    describe_error(hook_error),
                )
        # By the DLQ's own name on the topic exchange, where this service's topic permission
        # reaches only its own queues (never notifications.dlx, which is direct).
        dead_letter_queue = origin.dead_letter_queue.name
        # Not published: RabbitMQ dead-letters the rejected delivery through the queue's own
        # x-dead-letter-exchange, so it reaches the dead-letter queue either way.
        await self._republish(
            msg, headers, RETRY_EXCHANGE.name, dead_letter_queue, if_failed=RejectMessage()
        )
        if self.metrics is not None:
            self.metrics.dead_letter(queue, reason)
        raise AckMessage() from exc

    async def _republish(
        self,
        msg: StreamMessage[Any],
        headers: dict[str, Any],
        exchange: str,
        routing_key: str,
        *,
        if_failed: HandlerException,
    ) -> None:
        """Publish `msg` to `routing_key`; if that fails, settle the original delivery (still
        unacked) with `if_failed` instead."""
        broker = self.context.get("broker")

        async def publish() -> None:
            await broker.publish(
                msg.body,
                exchange=exchange,
                routing_key=routing_key,
                headers=headers,
                persist=True,
                correlation_id=msg.correlation_id,
                message_id=msg.message_id,
                content_type=msg.content_type,
                timeout=REPUBLISH_TIMEOUT_S,
            )

        async def channel() -> AbstractRobustChannel:
            return await publishing_channel(broker.config)

        try:
            # Nacked or cut off, it goes out again on a renewed channel: the wait and dead-letter
            # queues are quorum queues too, whose leader may have died with a node.
            await publish_confirmed(publish, channel, timeout=REPUBLISH_TIMEOUT_S)
        except Exception as publish_error:
            logger.error(
                "herald.message.republish_failed message_id=%s error=%s",
                msg.message_id,
                describe_error(publish_error),
            )
            raise if_failed from publish_error


def _as_list(value: Any) -> list[str]:
    if isinstance(value, list):
        return [item.decode() if isinstance(item, bytes) else str(item) for item in value]
    return []


def make_outcome_middleware(
    policy: RetryPolicy,
    hooks: DeadLetterHooks | None = None,
    metrics: OutcomeMetrics | None = None,
) -> type[OutcomeMiddleware]:
    """The middleware class for one retry policy and one broker's dead-letter hooks, counting
    its retries, deferrals and dead letters in `metrics` (FastStream instantiates it per
    message)."""
    return type(
        "OutcomeMiddleware",
        (OutcomeMiddleware,),
        {
            "policy": policy,
            "hooks": hooks if hooks is not None else DeadLetterHooks(),
            "metrics": metrics,
        },
    )
