"""What every log line says besides its message: the ids of the work being done.

A context variable holds the ids of the message being consumed (or of the row being published):
`event_id`, `message_id` (the chat message), `notification_id` and `correlation_id`. A broker
middleware sets it for every consumed message; code that learns an id later adds it with
`bind_log_context`. The formatters read it, with the current trace and span ids, when a record is
written, so no log call has to pass ids around.

Only ids ever enter the context: the body of a message is searched for a few id fields whose
values look like UUIDs, and is never logged, so neither message text, e-mail addresses nor tokens
can reach a log line through it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from aio_pika.robust_channel import RobustChannel
from aiormq.exceptions import AMQPConnectionError, ConnectionClosed
from faststream import BaseMiddleware
from faststream.message import StreamMessage
from opentelemetry import trace

# The context fields, in the order they are written.
CONTEXT_FIELDS = ("event_id", "message_id", "notification_id", "correlation_id")

_context: ContextVar[Mapping[str, str]] = ContextVar(
    "herald_log_context", default=MappingProxyType({})
)

# Event bodies are compact JSON written by pydantic, envelope and ids first; the free text (message
# content, titles, addresses) comes after them. Only this much of a body is searched, which keeps
# the cost per message small and fixed however long the message text is.
_BODY_PREFIX = 2048
# A key and a UUID value. Inside a JSON string a quote is escaped (`\"`), so text that merely
# contains `"notification_id":"…"` cannot match: the key must be a real key of the JSON.
_ID_FIELD = re.compile(
    rb'"(event_id|message_id|notification_id)"\s*:\s*"'
    rb'([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})"'
)
_SAFE_HEADER = re.compile(r"[A-Za-z0-9._:\-]{1,100}")


def current_log_context() -> Mapping[str, str]:
    return _context.get()


def bind_log_context(**fields: str | uuid.UUID | None) -> None:
    """Add ids to the context of the work in progress (a consumed message, a request) until it
    ends. Unknown field names are refused: only ids may be bound."""
    _context.set({**_context.get(), **_checked(fields)})


@contextmanager
def log_context(**fields: str | uuid.UUID | None) -> Iterator[None]:
    """The given ids for the duration of the block (on top of those already bound)."""
    token = _context.set({**_context.get(), **_checked(fields)})
    try:
        yield
    finally:
        _context.reset(token)


def _checked(fields: Mapping[str, str | uuid.UUID | None]) -> dict[str, str]:
    unknown = set(fields) - set(CONTEXT_FIELDS)
    if unknown:
        raise ValueError(f"not a log context field: {sorted(unknown)}")
    return {name: str(value) for name, value in fields.items() if value is not None}


def ids_from_body(body: bytes) -> dict[str, str]:
    """The first `event_id`, `message_id` and `notification_id` of a JSON event body, if they
    hold UUIDs; nothing else of the body."""
    found: dict[str, str] = {}
    for match in _ID_FIELD.finditer(body, 0, _BODY_PREFIX):
        found.setdefault(match.group(1).decode(), match.group(2).decode().lower())
    return found


def _safe_header(value: Any) -> str | None:
    """A header value fit for a log line (our ids are UUIDs): anything else is left out."""
    if isinstance(value, str) and _SAFE_HEADER.fullmatch(value):
        return value
    return None


def message_log_context(msg: StreamMessage[Any]) -> dict[str, str]:
    """The ids of a consumed message: from its body, else the AMQP message id (which Herald's
    publishers set to the event id) for `event_id`; the correlation id from its header."""
    fields = ids_from_body(msg.body) if isinstance(msg.body, bytes) else {}
    event_id = _safe_header(msg.message_id)
    if event_id is not None:
        fields.setdefault("event_id", event_id)
    correlation_id = _safe_header(msg.correlation_id)
    if correlation_id is not None:
        fields["correlation_id"] = correlation_id
    return fields


class LogContextMiddleware(BaseMiddleware):
    """Sets the log context for each consumed message, for the handler and for every middleware
    inside this one (so the retry mechanism's lines carry the ids too)."""

    async def consume_scope(
        self, call_next: Callable[[Any], Awaitable[Any]], msg: StreamMessage[Any]
    ) -> Any:
        # A fresh context per message: nothing bound for one message leaks into the next.
        token = _context.set(message_log_context(msg))
        try:
            return await call_next(msg)
        finally:
            _context.reset(token)


def _trace_ids() -> dict[str, str]:
    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return {}
    return {
        "trace_id": format(span_context.trace_id, "032x"),
        "span_id": format(span_context.span_id, "016x"),
    }


def _record_context(record: logging.LogRecord) -> dict[str, str]:
    """The context fields of a record: the bound ones, overridden by the same names passed as
    `extra=` to the log call (and nothing else of `extra`)."""
    fields = dict(_context.get())
    for name in CONTEXT_FIELDS:
        value = record.__dict__.get(name)
        if value is not None:
            fields[name] = str(value)
    return {name: fields[name] for name in CONTEXT_FIELDS if name in fields} | _trace_ids()


class JsonFormatter(logging.Formatter):
    """One JSON object per line: `timestamp` (UTC, ISO 8601), `level`, `logger`, `service`,
    `message`, then the context fields (`event_id`, `message_id`, `notification_id`,
    `correlation_id`, `trace_id`, `span_id`) that are known, and `exception` (the traceback) when
    the record carries one."""

    def __init__(self, service_name: str) -> None:
        super().__init__()
        self.service_name = service_name

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "service": self.service_name,
            "message": record.getMessage(),
            **_record_context(record),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        # Non-ASCII text stays as written, so that what a line says can be searched for as is.
        return json.dumps(line, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """The human format: time, level, service, logger, message, then the known context fields as
    `key=value`."""

    def __init__(self, service_name: str) -> None:
        super().__init__(f"%(asctime)s %(levelname)s {service_name} %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        context = _record_context(record)
        if not context:
            return text
        suffix = " ".join(f"{name}={value}" for name, value in context.items())
        first, newline, rest = text.partition("\n")  # keep a traceback below the line
        return f"{first} [{suffix}]{newline}{rest}"


class QueryFreeAccessLog(logging.Filter):
    """Drops the query string from uvicorn's access lines: a link's credential travels there
    (the e-mails' unsubscribe token, for one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        # uvicorn.access: (client address, method, path with query, HTTP version, status)
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str):
            record.args = (args[0], args[1], args[2].split("?", 1)[0], args[3], args[4])
        return True


CHANNEL_RESTORE_DEFERRED = "herald.broker.channel_restore_deferred error=%s"
CONNECTION_CLOSED_BY_BROKER = "herald.broker.connection_closed code=%s reason=%s"
DELIVERY_INTERRUPTED = "herald.message.interrupted error=%s"
# The loggers whose records `ConnectionLossAsWarning` looks at.
CONNECTION_LOSS_LOGGERS = ("aio_pika.tools", "aiormq.connection", "faststream.access.rabbit")
# AMQP's connection-forced: the broker closed the connection (a node shutting down, or an
# operator closing it), and the client reconnects.
_CONNECTION_FORCED = 320
# A record's new message and arguments.
_Rewrite = tuple[str, tuple[Any, ...]]


class ConnectionLossAsWarning(logging.Filter):
    """Lowers to WARNING the ERRORs that aio-pika, aiormq and FastStream log when a RabbitMQ
    connection is lost and is being restored, each rewritten as one of Herald's lines:

    - `herald.broker.channel_restore_deferred`: each robust channel's close callback reopens the
      channel at once; with no transport yet that fails (`ChannelInvalidStateError`, or
      `RuntimeError: ... closed`) and aio-pika 10.2.1 logs `Callback ... error` per channel. The
      reconnect restores every channel. While the connection is up, a failed restore stays an
      ERROR.
    - `herald.broker.connection_closed code=320`: the broker closed the connection
      (connection-forced: a node shutting down, or an operator); aiormq logs `Unexpected
      connection close` at ERROR. Any other code (access refused, say) stays an ERROR.
    - `herald.message.interrupted`: a handler cancelled because its connection was lost or
      closed with connection-forced, which FastStream logs at ERROR with a traceback. Its
      delivery was not acked, so RabbitMQ delivers it again, and the ledgers make that a no-op
      where the work was done. A channel closed for a protocol error stays an ERROR.

    Every broker failover and rolling restart would otherwise page whoever alerts on ERROR.
    Whether a process did recover is what readiness says (`herald_shared.ops.consumers_ready`
    counts the consumers that came back)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.ERROR:
            return True
        rewritten = (
            _restore_failed_while_disconnected(record)
            or _closed_by_the_broker(record)
            or _interrupted_by_connection_loss(record)
        )
        if rewritten is not None:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg, record.args = rewritten
            record.exc_info, record.exc_text = None, None
        return True


def _restore_failed_while_disconnected(record: logging.LogRecord) -> _Rewrite | None:
    """aio-pika's `"Callback %r error: %s: %s"` for a robust channel's close callback, logged
    while the channel's connection is not connected."""
    args = record.args
    if not isinstance(args, tuple) or len(args) != 3:
        return None
    method: Any = getattr(args[0], "callback", args[0])  # a OneShotCallback, or the method
    if getattr(method, "__func__", None) is not RobustChannel._on_close:
        return None
    connected = getattr(getattr(method.__self__, "_connection", None), "connected", None)
    if not isinstance(connected, asyncio.Event) or connected.is_set():
        return None
    return CHANNEL_RESTORE_DEFERRED, (args[1],)


def _closed_by_the_broker(record: logging.LogRecord) -> _Rewrite | None:
    """aiormq's `"Unexpected connection close from remote %s, Connection.Close(reply_code=%r,
    reply_text=%r)"` with connection-forced as the code."""
    args = record.args
    if (
        not isinstance(record.msg, str)
        or not record.msg.startswith("Unexpected connection close from remote")
        or not isinstance(args, tuple)
        or len(args) != 3
        or args[1] != _CONNECTION_FORCED
    ):
        return None
    return CONNECTION_CLOSED_BY_BROKER, (args[1], args[2])


def _interrupted_by_connection_loss(record: logging.LogRecord) -> _Rewrite | None:
    """FastStream's record of a handler that ended in a `CancelledError` whose reason is its
    lost connection (aiormq cancels a closed channel's consumers with the reason it closed): a
    connection error, or the broker's connection-forced close. A channel the broker closed for
    a protocol error, or a connection closed with another code, stays an ERROR."""
    error = record.exc_info[1] if record.exc_info else None
    if not isinstance(error, asyncio.CancelledError) or not error.args:
        return None
    reason = error.args[0]
    if not isinstance(reason, AMQPConnectionError):
        return None
    if isinstance(reason, ConnectionClosed) and reason.errno != _CONNECTION_FORCED:
        return None
    return DELIVERY_INTERRUPTED, (f"{type(reason).__name__}: {reason}",)


__all__ = (
    "CHANNEL_RESTORE_DEFERRED",
    "CONNECTION_CLOSED_BY_BROKER",
    "CONNECTION_LOSS_LOGGERS",
    "CONTEXT_FIELDS",
    "DELIVERY_INTERRUPTED",
    "ConnectionLossAsWarning",
    "JsonFormatter",
    "LogContextMiddleware",
    "QueryFreeAccessLog",
    "TextFormatter",
    "bind_log_context",
    "current_log_context",
    "ids_from_body",
    "log_context",
    "message_log_context",
)
