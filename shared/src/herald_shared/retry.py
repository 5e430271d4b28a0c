"""Herald's one retry and dead-letter mechanism, as a broker middleware.

Handlers only raise. The middleware decides what happens to the delivery:

* it succeeded → ack (FastStream's default);
* `PermanentError`, or a body that does not parse into the handler's event → dead-letter now;
* anything else (`RetryableError`, a database that is down, a provider timeout…) → the message
  waits in the origin queue's wait queue for the current tier, then comes back to that queue
  alone through its retry routing key; after `max_retries` retries it is dead-lettered.

Dead-lettering publishes the original body to `notifications.dlx` with the reason, the last error
and the attempt history in headers, then acks; if even that publish fails, the delivery is rejected
and RabbitMQ's own dead-lettering (the queue's `x-dead-letter-exchange`) takes it. The attempt
count lives in a header, never in the payload. Nothing is ever requeued in a hot loop.

Errors are described without their input: a pydantic error lists locations and error types only,
and an unknown exception is named by its class and where it was raised, because its text (an SQL
statement's parameters, say) may contain an e-mail address or message text.
"""

from __future__ import annotations

import json
import logging
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import pydantic
from faststream import BaseMiddleware
from faststream.exceptions import AckMessage, HandlerException, RejectMessage
from faststream.message import StreamMessage

from herald_shared.topology import DEAD_LETTER_EXCHANGE, RETRY_EXCHANGE, queue_for_routing_key

logger = logging.getLogger("herald.retry")

ATTEMPT_HEADER = "x-herald-attempt"  # deliveries that failed before this one
ERROR_HEADER = "x-herald-error"  # the last error, described safely
HISTORY_HEADER = "x-herald-history"  # one safe line per failed attempt
ORIGIN_HEADER = "x-herald-origin-queue"
REASON_HEADER = "x-herald-dead-letter-reason"  # permanent | unparsable | retries-exhausted

MAX_HISTORY = 10
HEADER_TEXT_LIMIT = 500


class RetryableError(Exception):
    """A transient failure: try the same message again later.

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


@dataclass(frozen=True)
class RetryPolicy:
    delays: tuple[float, ...]
    max_retries: int

    def delay_for(self, retry_number: int, retry_after: float | None = None) -> float:
        """The wait before retry `retry_number` (1-based): its tier, or the first tier that is at
        least the provider's `Retry-After`."""
        tier = self.delays[min(retry_number, len(self.delays)) - 1]
        if retry_after is not None and retry_after > tier:
            return next((delay for delay in self.delays if delay >= retry_after), self.delays[-1])
        return tier


def describe_error(exc: BaseException) -> str:
    """A one-line description of an error that is safe to log and to store."""
    if isinstance(exc, RetryableError | PermanentError):
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


def attempts_so_far(headers: dict[str, Any]) -> int:
    try:
        return max(0, int(headers.get(ATTEMPT_HEADER, 0)))
    except (TypeError, ValueError):
        return 0


class OutcomeMiddleware(BaseMiddleware):
    """Turns a handler's failure into a delayed retry or a dead letter (see module docstring)."""

    policy: ClassVar[RetryPolicy]

    async def consume_scope(
        self, call_next: Callable[[Any], Awaitable[Any]], msg: StreamMessage[Any]
    ) -> Any:
        try:
            return await call_next(msg)
        except HandlerException:
            raise
        except Exception as exc:
            await self._settle_failure(msg, exc)
            raise  # unreachable: _settle_failure always raises an outcome

    async def _settle_failure(self, msg: StreamMessage[Any], exc: Exception) -> None:
        routing_key = getattr(msg.raw_message, "routing_key", "") or ""
        origin = queue_for_routing_key(routing_key)
        headers = dict(msg.headers)
        attempt = attempts_so_far(headers) + 1
        error = describe_error(exc)
        history = [*_as_list(headers.get(HISTORY_HEADER)), f"{attempt}: {error}"][-MAX_HISTORY:]
        if origin is None:
            logger.error(
                "herald.message.unroutable_failure routing_key=%s error=%s", routing_key, error
            )
            raise RejectMessage() from exc

        headers.update(
            {
                ATTEMPT_HEADER: attempt,
                ERROR_HEADER: error,
                HISTORY_HEADER: history,
                ORIGIN_HEADER: origin.name,
            }
        )
        if is_permanent(exc) or attempt > self.policy.max_retries:
            if is_unparsable(exc):
                reason = "unparsable"
            elif isinstance(exc, PermanentError):
                reason = "permanent"
            else:
                reason = "retries-exhausted"
            headers[REASON_HEADER] = reason
            logger.error(
                "herald.message.dead_lettered queue=%s message_id=%s attempt=%d reason=%s error=%s",
                origin.name,
                msg.message_id,
                attempt,
                reason,
                error,
            )
            await self._republish(msg, headers, DEAD_LETTER_EXCHANGE.name, origin.name)
            raise AckMessage() from exc

        retry_after = exc.retry_after if isinstance(exc, RetryableError) else None
        delay = self.policy.delay_for(attempt, retry_after)
        wait_queue = origin.wait_queue(delay).name
        logger.warning(
            "herald.message.retry_scheduled queue=%s message_id=%s attempt=%d delay=%.3fs error=%s",
            origin.name,
            msg.message_id,
            attempt,
            delay,
            error,
        )
        await self._republish(msg, headers, RETRY_EXCHANGE.name, wait_queue)
        raise AckMessage() from exc

    async def _republish(
        self, msg: StreamMessage[Any], headers: dict[str, Any], exchange: str, routing_key: str
    ) -> None:
        broker = self.context.get("broker")
        try:
            await broker.publish(
                msg.body,
                exchange=exchange,
                routing_key=routing_key,
                headers=headers,
                persist=True,
                correlation_id=msg.correlation_id,
                message_id=msg.message_id,
                content_type=msg.content_type,
                timeout=10.0,
            )
        except Exception as publish_error:
            # The original delivery is still unacked: rejecting it lets RabbitMQ dead-letter it
            # through the queue's own x-dead-letter-exchange, so it is not lost either way.
            logger.error(
                "herald.message.republish_failed message_id=%s error=%s",
                msg.message_id,
                describe_error(publish_error),
            )
            raise RejectMessage() from publish_error


def _as_list(value: Any) -> list[str]:
    if isinstance(value, list):
        return [item.decode() if isinstance(item, bytes) else str(item) for item in value]
    return []


def make_outcome_middleware(policy: RetryPolicy) -> type[OutcomeMiddleware]:
    """The middleware class for one retry policy (FastStream instantiates it per message)."""
    return type("OutcomeMiddleware", (OutcomeMiddleware,), {"policy": policy})
