"""`herald-dead-letters`: list, show, replay and purge what sits in the `<queue>.dlq` queues.

A dead letter reaches `<queue>.dlq` in one of two ways, and this tool reads both:

* Herald's `OutcomeMiddleware` republished it with `x-herald-*` headers (reason `permanent`,
  `unparsable` or `retries-exhausted`, last error, attempt history, origin queue); its AMQP
  timestamp is the moment it was dead-lettered;
* RabbitMQ dead-lettered it itself (a reject, or the quorum `x-delivery-limit` backstop), adding
  an `x-death` header whose first entry (the most recent death) gives the reason (`rejected`,
  `delivery_limit`), the queue and the time.

Commands (`--help` on each for the details)::

    herald-dead-letters list [--queue Q]
    herald-dead-letters show --queue Q (--message-id ID | --position N) [--payload]
    herald-dead-letters replay --queue Q (--message-id ID ... | --reason R | --type T | --all)
                               [--dry-run]
    herald-dead-letters purge --queue Q (--message-id ID ... | --all) (--yes | --dry-run)

Exit codes: 0 done, 1 nothing matched, 2 usage, connection or broker error.

How a queue is read
-------------------
Every command takes the whole dead-letter queue with `basic.get` and manual acknowledgement
(until `get-empty`, at most `MAX_MESSAGES`), decides, then settles each message exactly once:
`ack` for what was replayed (only after the broker confirmed the republish) or purged,
`nack(requeue=True)` for everything else, in reading order. `list` and `show` ack nothing.

Why `basic.get` rather than a consumer with a prefetch and `nack(requeue=True)` at the end: a
consumer cannot tell "the queue is empty" from "the next message is late" (it would need a
timeout, or a message count that publishers keep changing), while `get-empty` is a definite
answer; and the batch held in one place makes "settle everything in order" one `finally`. The
cost, one round trip per message, is irrelevant for a dead-letter queue.

Why the batch is spread over channels of `CHUNK` (16) messages, settled and closed one after the
other. Measured on RabbitMQ 3.10.8 with one channel for the whole batch: once more than ~32
settlements are in flight on a channel, the channel's quorum-queue client stashes them (its soft
limit) and sends them later, reordered; closing the channel then drops the stashed acks and
RabbitMQ returns those messages (purging 200 dead letters left up to 167 of them in the queue;
rabbitmq/rabbitmq-server#10327), and requeued messages come back in scrambled order. Closing the
channel instead of rejecting is no better. With at most 16 settlements per channel neither ever
happened (1000-message runs, acks and requeues mixed).

Ordering. RabbitMQ 3.10 puts a requeued quorum-queue message at the back of the queue (4.x
returns it towards its old position). Because the tool holds the whole queue, requeueing the
unsettled messages in reading order recreates the queue's order minus what was acked; before
settling, it also takes the dead letters that arrived meanwhile and requeues them last, so they
stay behind. Dead letters arriving during the settling itself (milliseconds) may end up between
older ones; above `MAX_MESSAGES` the unread rest ends up in front of the requeued batch. If
the tool dies mid-way, RabbitMQ returns the unacked messages itself when the connection closes:
nothing is lost, though their order is then RabbitMQ's.

Delivery counts. Every reading is a delivery: RabbitMQ 3.x and 4.0-4.2 count each return of a
quorum-queue message, whatever returned it (`x-delivery-count` on 3.x, the acquired count that
4.x holds the delivery limit against); 4.3 counts only a failed delivery, which `basic.reject`
signals and `basic.nack` does not, hence `nack`. A queue with a delivery limit would drop its
dead letters after that many readings (they have nowhere to be dead-lettered to), and RabbitMQ
4.x gives every quorum queue one, 20, unless it says otherwise: the deployed definitions' policy
`herald-dead-letter-queues` lifts it for every dead-letter queue (scripts/gen_definitions.py,
`DEAD_LETTER_DELIVERY_LIMIT`; docs/dead-letters.md). On 3.x a queue has no limit by default.

Never losing a message. A dead letter is acked only after its republish was confirmed (publisher
confirms, `mandatory`, so an unroutable publish fails instead of vanishing). A failure stops the
replay and leaves that message and the rest in the queue. The flip side is at-least-once: if the
connection drops between the confirm and the ack, or a publish times out after reaching the
broker, the message is both back in its queue and still in the dead-letter queue. Herald's
consumers are idempotent, so a second replay of it is harmless.

Concurrency limits (documented, not locked). While one instance holds a queue's messages, they
are invisible to everyone else: a second instance run at the same time sees only what the first
does not hold (typically nothing), so its `list` is incomplete and its `replay`/`purge` may report
"nothing matched" for a message that is there. Their requeues then interleave, so the order may
change. No message is lost or duplicated by this; run one instance per queue at a time. Positions
are the order at reading time; prefer message ids for `replay`/`purge`.

Privacy. Bodies hold e-mail addresses and message text. `list` prints only the body's `type`
field (and only if it looks like an event type); `show` prints a body only with `--payload`.
The RabbitMQ password never appears in any output.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO
from urllib.parse import quote

import aio_pika
import aiormq.exceptions
import pydantic
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage
from yarl import URL

from herald_shared.broker import RabbitSettings, connection_url
from herald_shared.retry import (
    ATTEMPT_HEADER,
    DEFERRALS_HEADER,
    ERROR_HEADER,
    HISTORY_HEADER,
    ORIGIN_HEADER,
    REASON_HEADER,
)
from herald_shared.topology import CONSUMER_QUEUES, EXCHANGE, ConsumerQueue, queue_by_name

TOOL_NAME = "herald-dead-letters"
REPLAYED_HEADER = "x-herald-replayed"  # how many times this message was replayed from a DLQ

EXIT_OK = 0
EXIT_NO_MATCH = 1
EXIT_ERROR = 2

# Reasons a dead letter can carry: Herald's four, then RabbitMQ's own.
REASONS = (
    "permanent",
    "unparsable",
    "retries-exhausted",
    "deferred-too-long",
    "rejected",
    "delivery_limit",
    "expired",
    "maxlen",
)

# Headers a replay drops: the previous life's outcome and RabbitMQ's dead-lettering traces, so the
# replayed message starts again at attempt 0 on its queue's retry tiers.
_RESET_HEADERS = frozenset(
    {
        ATTEMPT_HEADER,
        DEFERRALS_HEADER,
        ERROR_HEADER,
        HISTORY_HEADER,
        ORIGIN_HEADER,
        REASON_HEADER,
        "x-death",
        "x-delivery-count",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
    }
)
# What an event type looks like; anything else in a body's `type` is not printed (it could be
# personal data in a malformed event).
_EVENT_TYPE = re.compile(r"[A-Za-z][A-Za-z0-9_.:-]{0,63}")
_GET_TIMEOUT = 10.0
# Messages taken per channel: keeps a channel's settlements under the quorum-queue client's soft
# limit, above which RabbitMQ 3.10 reorders them and drops acks on close (module docstring).
CHUNK = 16
# The most one command takes from a queue (one channel per CHUNK; RabbitMQ allows 2047).
MAX_MESSAGES = 10_000


class DeadLetterError(Exception):
    """A problem the operator must fix (unknown queue, broker refused something…); exit code 2.

    Its text is printed as is: it never holds a password or a message body.
    """


# --------------------------------------------------------------------------------------------
# Reading dead letters
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeathRecord:
    """One entry of RabbitMQ's `x-death` header."""

    reason: str
    queue: str
    count: int
    time: datetime | None
    exchange: str
    routing_keys: tuple[str, ...]


@dataclass(frozen=True)
class DeadLetter:
    """One message in a dead-letter queue, as read (the body is only printed on request)."""

    queue: str  # the consumer queue whose `<queue>.dlq` holds it
    position: int  # 1-based, in the dead-letter queue's order at reading time
    message_id: str | None
    correlation_id: str | None
    content_type: str | None
    content_encoding: str | None
    headers: dict[str, Any]
    body: bytes
    timestamp: datetime | None
    event_type: str | None
    reason: str
    attempts: int | None
    error: str | None
    history: tuple[str, ...]
    origin_queue: str | None
    dead_lettered_at: datetime | None
    deaths: tuple[DeathRecord, ...]
    replayed: int

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.queue}.dlq"


@dataclass(frozen=True)
class Selection:
    """Which dead letters a command acts on; `message_ids`, `reason`, `event_type` and
    `position` combine with AND, `everything` matches all."""

    message_ids: frozenset[str] = frozenset()
    reason: str | None = None
    event_type: str | None = None
    position: int | None = None
    everything: bool = False

    def matches(self, letter: DeadLetter) -> bool:
        if self.everything:
            return True
        criteria = (
            (not self.message_ids or letter.message_id in self.message_ids),
            (self.reason is None or letter.reason == self.reason),
            (self.event_type is None or letter.event_type == self.event_type),
            (self.position is None or letter.position == self.position),
        )
        chosen = bool(self.message_ids) or any(
            value is not None for value in (self.reason, self.event_type, self.position)
        )
        return chosen and all(criteria)


@dataclass
class Held:
    """A dead letter taken from its queue and not yet settled (`acked` once removed)."""

    letter: DeadLetter
    message: AbstractIncomingMessage
    acked: bool = False

    async def ack(self) -> None:
        await self.message.ack()
        self.acked = True


def resolve_queue(name: str) -> ConsumerQueue:
    """The consumer queue for `name`, given as `<queue>` or `<queue>.dlq`."""
    consumer_queue = queue_by_name(name.removesuffix(".dlq"))
    if consumer_queue is None:
        known = ", ".join(queue.name for queue in CONSUMER_QUEUES)
        raise DeadLetterError(f"unknown queue {name!r}; known queues: {known}")
    return consumer_queue


def redact_url(url: str) -> str:
    """The URL without its password, for messages."""
    parsed = URL(url)
    return str(parsed.with_password("***")) if parsed.password else str(parsed)


async def connect(settings: RabbitSettings) -> AbstractConnection:
    """A plain (non-robust) connection named after the tool; a connection error is a
    `DeadLetterError` whose text holds no password."""
    try:
        return await aio_pika.connect(
            connection_url(settings, TOOL_NAME), timeout=settings.connection_timeout
        )
    except (OSError, TimeoutError, aiormq.exceptions.AMQPError) as exc:
        if isinstance(exc, aiormq.exceptions.InvalidFrameError) and "Connection.Close" in str(exc):
            detail = "the broker refused to open the connection (does the virtual host exist?)"
        else:
            detail = _scrub(_describe(exc), settings.url)
        raise DeadLetterError(
            f"cannot connect to RabbitMQ at {redact_url(settings.url)}: {detail}"
        ) from None


@asynccontextmanager
async def holding(
    connection: AbstractConnection, consumer_queue: ConsumerQueue
) -> AsyncIterator[list[Held]]:
    """Every message of the queue's DLQ (at most `MAX_MESSAGES`), in order, taken unacked.

    Ack (`Held.ack`) what must leave the queue; when the block ends every other message is
    requeued in reading order, behind them the dead letters that arrived meanwhile (see the
    module docstring).
    """
    chunks: list[tuple[AbstractChannel, list[Held]]] = []
    held: list[Held] = []
    try:
        await _take(connection, consumer_queue, chunks, held, MAX_MESSAGES)
        yield held
        # Dead letters that arrived while the batch was held go back after it.
        await _take(connection, consumer_queue, chunks, [], MAX_MESSAGES - len(held))
    except BaseException:
        await _settle(chunks, quiet=True)
        raise
    await _settle(chunks, quiet=False)


async def _take(
    connection: AbstractConnection,
    consumer_queue: ConsumerQueue,
    chunks: list[tuple[AbstractChannel, list[Held]]],
    into: list[Held],
    limit: int,
) -> None:
    """`basic.get` up to `limit` messages into `into`, `CHUNK` per new channel."""
    name = consumer_queue.dead_letter_queue.name
    while len(into) < limit:
        channel = await connection.channel(publisher_confirms=False)
        chunk: list[Held] = []
        chunks.append((channel, chunk))
        try:
            queue = await channel.get_queue(name, ensure=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            raise DeadLetterError(
                f"dead-letter queue {name} does not exist in this virtual host "
                "(it is declared when a Herald service starts)"
            ) from None
        while len(chunk) < CHUNK and len(into) < limit:
            message = await queue.get(no_ack=False, fail=False, timeout=_GET_TIMEOUT)
            if message is None:
                return
            item = Held(_parse(consumer_queue, len(into) + 1, message), message)
            chunk.append(item)
            into.append(item)


async def _settle(chunks: list[tuple[AbstractChannel, list[Held]]], *, quiet: bool) -> None:
    """Requeue what was not acked, chunk after chunk in reading order, closing each channel
    before the next one starts. Whatever cannot be requeued (the connection broke) RabbitMQ
    returns itself when the channel or connection closes."""
    failure: BaseException | None = None
    for channel, chunk in chunks:
        try:
            if not channel.is_closed:
                for item in chunk:
                    if not item.acked:
                        # nack, not reject: on RabbitMQ 4.3 a reject counts as a failed
                        # delivery towards the queue's delivery limit (module docstring).
                        await item.message.nack(requeue=True)
                await channel.close()
        except (OSError, TimeoutError, RuntimeError, aiormq.exceptions.AMQPError) as exc:
            failure = failure or exc
    if failure is not None and not quiet:
        raise DeadLetterError(
            "could not requeue every dead letter in order "
            f"({_describe(failure)}); RabbitMQ returns them when the connection closes"
        )


async def read_dead_letters(
    connection: AbstractConnection, consumer_queue: ConsumerQueue
) -> list[DeadLetter]:
    """Every dead letter of the queue, in order; the queue is left as it was."""
    async with holding(connection, consumer_queue) as held:
        return [item.letter for item in held]


async def read_all_dead_letters(
    connection: AbstractConnection, queues: Sequence[ConsumerQueue] = CONSUMER_QUEUES
) -> dict[str, list[DeadLetter] | None]:
    """Per consumer queue name, its dead letters, or None when its DLQ is not declared."""
    result: dict[str, list[DeadLetter] | None] = {}
    for consumer_queue in queues:
        try:
            result[consumer_queue.name] = await read_dead_letters(connection, consumer_queue)
        except DeadLetterError:
            result[consumer_queue.name] = None
    return result


@dataclass
class Outcome:
    """What `replay` or `purge` did: `matched` in queue order, `done` the subset acted on (the
    rest stayed in the DLQ), `problems` one line per message left behind for a reason."""

    matched: list[DeadLetter] = field(default_factory=list)
    done: list[DeadLetter] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


async def replay(
    connection: AbstractConnection,
    consumer_queue: ConsumerQueue,
    selection: Selection,
    *,
    dry_run: bool = False,
    publish_timeout: float = 5.0,
) -> Outcome:
    """Publish the matching dead letters back to their origin queue only, then remove them.

    Each goes to the `notifications` exchange with the queue's retry routing key (bound by that
    queue alone), persistent, mandatory and confirmed, with the same body, message id,
    correlation id and content type, the attempt/outcome headers dropped and `x-herald-replayed`
    incremented. Its dead letter is acked only after the confirm. The first failure stops the
    replay; the failed message and every later one stay in the DLQ.
    """
    outcome = Outcome()
    async with holding(connection, consumer_queue) as held:
        matching = [item for item in held if selection.matches(item.letter)]
        outcome.matched = [item.letter for item in matching]
        if dry_run or not matching:
            return outcome
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        try:
            try:
                exchange = await channel.get_exchange(EXCHANGE.name, ensure=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                raise DeadLetterError(
                    f"exchange {EXCHANGE.name} does not exist in this virtual host"
                ) from None
            for item in matching:
                letter = item.letter
                if letter.origin_queue not in (None, consumer_queue.name):
                    outcome.problems.append(
                        f"{letter.message_id}: its headers name origin queue "
                        f"{letter.origin_queue!r}, not {consumer_queue.name}; left in the DLQ"
                    )
                    continue
                try:
                    await exchange.publish(
                        replay_message(letter),
                        routing_key=consumer_queue.retry_routing_key,
                        mandatory=True,
                        timeout=publish_timeout,
                    )
                except (TimeoutError, aiormq.exceptions.AMQPError, RuntimeError) as exc:
                    outcome.problems.append(
                        f"{letter.message_id}: republish not confirmed ({_describe(exc)}); "
                        "it and the rest stay in the DLQ"
                    )
                    break
                await item.ack()
                outcome.done.append(letter)
        finally:
            if not channel.is_closed:
                await channel.close()
    return outcome


async def purge(
    connection: AbstractConnection,
    consumer_queue: ConsumerQueue,
    selection: Selection,
    *,
    dry_run: bool = False,
) -> Outcome:
    """Delete the matching dead letters (ack them); the others stay, in order."""
    outcome = Outcome()
    async with holding(connection, consumer_queue) as held:
        matching = [item for item in held if selection.matches(item.letter)]
        outcome.matched = [item.letter for item in matching]
        if dry_run:
            return outcome
        for item in matching:
            await item.ack()
            outcome.done.append(item.letter)
    return outcome


def replay_message(letter: DeadLetter) -> aio_pika.Message:
    """The message a replay publishes for a dead letter."""
    headers = {name: value for name, value in letter.headers.items() if name not in _RESET_HEADERS}
    headers[REPLAYED_HEADER] = letter.replayed + 1
    return aio_pika.Message(
        letter.body,
        headers=headers,
        content_type=letter.content_type,
        content_encoding=letter.content_encoding,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=letter.message_id,
        correlation_id=letter.correlation_id,
        timestamp=datetime.now(UTC),
    )


def _parse(
    consumer_queue: ConsumerQueue, position: int, message: AbstractIncomingMessage
) -> DeadLetter:
    headers: dict[str, Any] = dict(message.headers or {})
    deaths = _deaths(headers.get("x-death"))
    herald_reason = _text(headers.get(REASON_HEADER))
    timestamp = _aware(message.timestamp)
    if herald_reason:
        reason = herald_reason
        dead_lettered_at = timestamp  # the middleware's republish is stamped when it is made
    elif deaths:
        reason = deaths[0].reason
        dead_lettered_at = deaths[0].time
    else:
        reason = _text(headers.get("x-first-death-reason")) or "unknown"
        dead_lettered_at = None
    origin = (
        _text(headers.get(ORIGIN_HEADER))
        or (deaths[0].queue if deaths else None)
        or _text(headers.get("x-first-death-queue"))
    )
    history = headers.get(HISTORY_HEADER)
    return DeadLetter(
        queue=consumer_queue.name,
        position=position,
        message_id=message.message_id,
        correlation_id=message.correlation_id,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        headers=headers,
        body=message.body,
        timestamp=timestamp,
        event_type=_event_type(message.body),
        reason=reason,
        attempts=_int(headers.get(ATTEMPT_HEADER)),
        error=_text(headers.get(ERROR_HEADER)),
        history=tuple(_text(line) or "" for line in history) if isinstance(history, list) else (),
        origin_queue=origin,
        dead_lettered_at=dead_lettered_at,
        deaths=deaths,
        replayed=_int(headers.get(REPLAYED_HEADER)) or 0,
    )


def _deaths(value: Any) -> tuple[DeathRecord, ...]:
    if not isinstance(value, list):
        return ()
    records = []
    for entry in value:
        if not isinstance(entry, dict):
            continue
        keys = entry.get("routing-keys")
        records.append(
            DeathRecord(
                reason=_text(entry.get("reason")) or "unknown",
                queue=_text(entry.get("queue")) or "",
                count=_int(entry.get("count")) or 0,
                time=_aware(entry.get("time")),
                exchange=_text(entry.get("exchange")) or "",
                routing_keys=tuple(_text(key) or "" for key in keys)
                if isinstance(keys, list)
                else (),
            )
        )
    return tuple(records)


def _event_type(body: bytes) -> str | None:
    try:
        document = json.loads(body)
    except ValueError:  # includes UnicodeDecodeError
        return None
    kind = document.get("type") if isinstance(document, dict) else None
    return kind if isinstance(kind, str) and _EVENT_TYPE.fullmatch(kind) else None


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _aware(value: Any) -> datetime | None:
    if not isinstance(value, datetime):
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _scrub(text: str, url: str) -> str:
    """`text` (an exception's) with the URL's password masked, should a library have put it in."""
    password = URL(url).password
    if not password:
        return text
    for form in {password, quote(password, safe=""), quote(password)}:
        text = text.replace(form, "***")
    return text


# --------------------------------------------------------------------------------------------
# Printing
# --------------------------------------------------------------------------------------------

_ERROR_WIDTH = 80
_PAYLOAD_PREVIEW = 200
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _clean(value: Any, limit: int | None = None) -> str:
    """A header value as one printable line (no terminal escapes), optionally truncated."""
    text = _CONTROL.sub(lambda match: repr(match.group())[1:-1], _text(value) or "")
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "…"
    return text


def _when(moment: datetime | None) -> str:
    return (
        moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        if moment
        else "-"
    )


def format_line(letter: DeadLetter) -> str:
    """One `list` line: no body field but the event type."""
    attempts = "-" if letter.attempts is None else str(letter.attempts)
    return (
        f"  {letter.position:>4}  id={_clean(letter.message_id) or '-'}"
        f"  type={letter.event_type or '-'}"
        f"  reason={_clean(letter.reason)}"
        f"  attempts={attempts}"
        f"  origin={_clean(letter.origin_queue) or '-'}"
        f"  dead-lettered={_when(letter.dead_lettered_at)}"
        f"  error={_clean(letter.error, _ERROR_WIDTH) or '-'}"
    )


def format_details(letter: DeadLetter, *, total: int, payload: bool) -> str:
    """The `show` text for one dead letter; the body only when `payload` is set."""
    lines = [
        f"{letter.dead_letter_queue}, position {letter.position} of {total}",
        f"  message_id:     {_clean(letter.message_id) or '-'}",
        f"  correlation_id: {_clean(letter.correlation_id) or '-'}",
        f"  content_type:   {_clean(letter.content_type) or '-'}",
        f"  event type:     {letter.event_type or '-'}",
        f"  reason:         {_clean(letter.reason)}",
        f"  origin queue:   {_clean(letter.origin_queue) or '-'}",
        f"  dead-lettered:  {_when(letter.dead_lettered_at)}",
        f"  attempts:       {'-' if letter.attempts is None else letter.attempts}",
        f"  replayed:       {letter.replayed}",
        f"  last error:     {_clean(letter.error) or '-'}",
        "  history:" + ("" if letter.history else " -"),
        *(f"    {_clean(line)}" for line in letter.history),
        "  deaths (x-death, most recent first):" + ("" if letter.deaths else " -"),
        *(
            f"    {_clean(death.reason)} from {_clean(death.queue)} x{death.count}"
            f" at {_when(death.time)} (exchange {_clean(death.exchange) or '-'},"
            f" routing keys {', '.join(_clean(key) for key in death.routing_keys) or '-'})"
            for death in letter.deaths
        ),
        "  headers:" + ("" if letter.headers else " -"),
        *(
            f"    {_clean(name)}: {_clean(_header_value(value))}"
            for name, value in sorted(letter.headers.items())
        ),
    ]
    if payload:
        lines.append(f"  payload ({len(letter.body)} bytes):")
        lines.extend(f"    {line}" for line in _payload(letter.body).splitlines())
    else:
        lines.append(
            f"  payload: {len(letter.body)} bytes, hidden "
            "(--payload prints it; it may hold e-mail addresses and message text)"
        )
    return "\n".join(lines)


def _header_value(value: Any) -> str:
    if isinstance(value, datetime):
        return _when(_aware(value))
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, list):
        return "[" + ", ".join(_header_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {_header_value(item)}" for key, item in value.items()) + "}"
    return str(value)


def _payload(body: bytes) -> str:
    try:
        return json.dumps(json.loads(body), indent=2, ensure_ascii=False)
    except ValueError:
        preview = repr(body[:_PAYLOAD_PREVIEW])
        return preview + (
            f" … ({len(body) - _PAYLOAD_PREVIEW} more bytes)"
            if len(body) > _PAYLOAD_PREVIEW
            else ""
        )


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _say(stream: TextIO, text: str) -> None:
    stream.write(text + "\n")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("positions start at 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    queues = ", ".join(queue.name for queue in CONSUMER_QUEUES)
    parser = argparse.ArgumentParser(
        prog=TOOL_NAME,
        description=(
            "Inspect, replay and purge Herald's dead letters (<queue>.dlq). Connects to "
            "RABBITMQ_URL (default amqp://guest:guest@localhost:5672/). Exit codes: 0 done, "
            "1 nothing matched, 2 usage, connection or broker error."
        ),
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    queue_help = f"consumer queue name (or its .dlq name): {queues}"

    listing = commands.add_parser("list", help="count and summarise the dead letters")
    listing.add_argument("--queue", help=queue_help + "; default all")

    show = commands.add_parser("show", help="headers, reason and history of one dead letter")
    show.add_argument("--queue", required=True, help=queue_help)
    which = show.add_mutually_exclusive_group(required=True)
    which.add_argument("--message-id", help="the message id (every copy is shown)")
    which.add_argument("--position", type=_positive, help="1-based position, as `list` shows")
    show.add_argument("--payload", action="store_true", help="also print the body (personal data!)")

    replay_parser = commands.add_parser(
        "replay", help="publish dead letters back to their origin queue, then remove them"
    )
    replay_parser.add_argument("--queue", required=True, help=queue_help)
    chosen = replay_parser.add_mutually_exclusive_group(required=True)
    chosen.add_argument("--message-id", nargs="+", metavar="ID", help="these message ids")
    chosen.add_argument("--reason", choices=REASONS, help="every dead letter with this reason")
    chosen.add_argument("--type", dest="event_type", metavar="TYPE", help="this event type")
    chosen.add_argument("--all", action="store_true", help="every dead letter of the queue")
    replay_parser.add_argument(
        "--dry-run", action="store_true", help="only print what would be replayed"
    )

    purge_parser = commands.add_parser("purge", help="delete dead letters for good")
    purge_parser.add_argument("--queue", required=True, help=queue_help)
    doomed = purge_parser.add_mutually_exclusive_group(required=True)
    doomed.add_argument("--message-id", nargs="+", metavar="ID", help="these message ids")
    doomed.add_argument("--all", action="store_true", help="every dead letter of the queue")
    confirm = purge_parser.add_mutually_exclusive_group(required=True)
    confirm.add_argument("--yes", action="store_true", help="really delete")
    confirm.add_argument("--dry-run", action="store_true", help="only print what would be deleted")
    return parser


def _selection(args: argparse.Namespace) -> Selection:
    return Selection(
        message_ids=frozenset(
            [args.message_id] if isinstance(args.message_id, str) else args.message_id or ()
        ),
        reason=getattr(args, "reason", None),
        event_type=getattr(args, "event_type", None),
        position=getattr(args, "position", None),
        everything=bool(getattr(args, "all", False)),
    )


async def run(args: argparse.Namespace, settings: RabbitSettings, out: TextIO) -> int:
    """Carry out a parsed command; returns the exit code (raises `DeadLetterError`)."""
    queue = resolve_queue(args.queue) if args.queue else None
    connection = await connect(settings)
    try:
        if args.command == "list":
            return await _list(connection, queue, out)
        if queue is None:  # the parser requires --queue for every other command
            raise DeadLetterError(f"{args.command} needs --queue")
        if args.command == "show":
            return await _show(connection, queue, _selection(args), args.payload, out)
        if args.command == "replay":
            outcome = await replay(
                connection,
                queue,
                _selection(args),
                dry_run=args.dry_run,
                publish_timeout=settings.publish_timeout,
            )
            return _report(outcome, queue, args, "replayed", "would replay", out)
        outcome = await purge(connection, queue, _selection(args), dry_run=args.dry_run)
        return _report(outcome, queue, args, "purged", "would purge", out)
    finally:
        await connection.close()


async def _list(connection: AbstractConnection, queue: ConsumerQueue | None, out: TextIO) -> int:
    queues = (queue,) if queue else CONSUMER_QUEUES
    for name, letters in (await read_all_dead_letters(connection, queues)).items():
        if letters is None:
            if queue is not None:
                raise DeadLetterError(f"dead-letter queue {name}.dlq does not exist")
            _say(out, f"{name}.dlq: not declared")
            continue
        _say(out, f"{name}.dlq: {len(letters)} message{'' if len(letters) == 1 else 's'}")
        for letter in letters:
            _say(out, format_line(letter))
    return EXIT_OK


async def _show(
    connection: AbstractConnection,
    queue: ConsumerQueue,
    selection: Selection,
    payload: bool,
    out: TextIO,
) -> int:
    letters = await read_dead_letters(connection, queue)
    chosen = [letter for letter in letters if selection.matches(letter)]
    if not chosen:
        _say(out, f"{queue.name}.dlq: no such dead letter ({len(letters)} in the queue)")
        return EXIT_NO_MATCH
    details = (format_details(letter, total=len(letters), payload=payload) for letter in chosen)
    _say(out, "\n\n".join(details))
    return EXIT_OK


def _report(
    outcome: Outcome,
    queue: ConsumerQueue,
    args: argparse.Namespace,
    verb: str,
    dry_verb: str,
    out: TextIO,
) -> int:
    dlq = queue.dead_letter_queue.name
    if args.message_id:
        found = {letter.message_id for letter in outcome.matched}
        for missing in sorted(set(args.message_id) - found):
            _say(out, f"{dlq}: no dead letter with message id {_clean(missing)}")
    if not outcome.matched:
        _say(out, f"{dlq}: nothing matched")
        return EXIT_NO_MATCH
    if args.dry_run:
        _say(out, f"{dlq}: {dry_verb} {len(outcome.matched)}:")
        for letter in outcome.matched:
            _say(out, format_line(letter))
        return EXIT_OK
    target = (
        f" to {queue.name} (routing key {queue.retry_routing_key})" if verb == "replayed" else ""
    )
    _say(out, f"{dlq}: {verb} {len(outcome.done)} of {len(outcome.matched)}{target}")
    for letter in outcome.done:
        _say(out, format_line(letter))
    if outcome.problems:
        for problem in outcome.problems:
            _say(sys.stderr, f"{dlq}: {_clean(problem)}")
        return EXIT_ERROR
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """The `herald-dead-letters` console script."""
    args = build_parser().parse_args(argv)
    # This tool reports connection problems itself, once, as one line.
    logging.getLogger("aiormq").setLevel(logging.CRITICAL)
    try:
        settings = RabbitSettings()
    except pydantic.ValidationError as exc:
        problems = "; ".join(
            f"RABBITMQ_{'.'.join(str(part) for part in error['loc']).upper()}: {error['msg']}"
            for error in exc.errors(include_input=False, include_url=False)
        )
        _say(sys.stderr, f"{TOOL_NAME}: invalid settings: {problems}")
        return EXIT_ERROR
    try:
        return asyncio.run(run(args, settings, sys.stdout))
    except DeadLetterError as exc:
        _say(sys.stderr, f"{TOOL_NAME}: {exc}")  # built without secrets (see the class)
        return EXIT_ERROR
    except (OSError, TimeoutError, aiormq.exceptions.AMQPError) as exc:
        _say(
            sys.stderr,
            f"{TOOL_NAME}: RabbitMQ error at {redact_url(settings.url)}: "
            f"{_scrub(_describe(exc), settings.url)}",
        )
        return EXIT_ERROR
    except KeyboardInterrupt:
        _say(sys.stderr, f"{TOOL_NAME}: interrupted; unsettled dead letters go back to their queue")
        return 130
