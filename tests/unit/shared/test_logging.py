"""Structured logs: the JSON and text formats, the log context of a consumed message, and that
no body (message text, e-mail addresses, tokens) ever reaches a line."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pydantic
import pytest
from aio_pika.robust_channel import RobustChannel
from aio_pika.tools import OneShotCallback
from aiormq.exceptions import ChannelClosed, ConnectionClosed
from faststream.rabbit import TestRabbitBroker

from herald_shared.broker import RabbitSettings, make_broker
from herald_shared.config import ServiceSettings, configure_logging
from herald_shared.events import EmailRequested
from herald_shared.logs import (
    JsonFormatter,
    QueryFreeAccessLog,
    bind_log_context,
    current_log_context,
    ids_from_body,
    log_context,
)
from herald_shared.publishing import event_publisher, publish_event
from herald_shared.topology import EMAIL_NOTIFICATIONS, EMAIL_SEND, EXCHANGE

PLANTED_EMAIL = "planted.person@example.org"
PLANTED_TEXT = "planted secret text ÄÖ 7f3b"
PLANTED_TOKEN = "planted-token-c0ffee"


class _Settings(ServiceSettings):
    port: int = 9999
    database_url: str = "sqlite:///unused.db"


# The RabbitMQ clients' top loggers, which other code in the test process may have quietened
# (the dead-letter tool's `main` sets `aiormq` to CRITICAL): at their default for these tests.
LIBRARY_ROOTS = ("aiormq", "aio_pika")


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """`configure_logging` changes process-wide loggers: put them back after the test."""
    names = (
        "",
        "faststream",
        "faststream.access.rabbit",
        "uvicorn.access",
        "aiosqlite",
        "aio_pika.robust_channel",
        "aio_pika.tools",
        "aiormq.connection",
        *LIBRARY_ROOTS,
    )
    saved = {
        name: (
            list(logging.getLogger(name).handlers),
            list(logging.getLogger(name).filters),
            logging.getLogger(name).level,
        )
        for name in names
    }
    for name in LIBRARY_ROOTS:
        logging.getLogger(name).setLevel(logging.NOTSET)
    yield
    for name, (handlers, filters, level) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers[:] = handlers
        logger.filters[:] = filters
        logger.setLevel(level)


@pytest.fixture
def lines() -> Iterator[io.StringIO]:
    """What the `herald.test` logger writes, as JSON lines."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter("email-sender"))
    logger = logging.getLogger("herald.test")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield out
    logger.removeHandler(handler)


def _email(**overrides: Any) -> EmailRequested:
    fields: dict[str, Any] = {
        "notification_id": uuid.uuid4(),
        "message_id": uuid.uuid4(),
        "room_id": uuid.uuid4(),
        "room_name": "general",
        "recipient_id": uuid.uuid4(),
        "to_address": PLANTED_EMAIL,
        "to_name": "Person",
        "sender_display_name": "Ann",
        "message_content": PLANTED_TEXT,
        "sent_at": datetime.now(UTC),
    }
    return EmailRequested(**(fields | overrides))


def _parsed(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


# --- ids from a body ------------------------------------------------------------------------------


def test_ids_come_from_the_body_keys_only_when_they_are_uuids() -> None:
    event = _email()
    found = ids_from_body(event.model_dump_json().encode())
    assert found == {
        "event_id": str(event.event_id),
        "message_id": str(event.message_id),
        "notification_id": str(event.notification_id),
    }
    assert ids_from_body(b'{"notification_id": "not-a-uuid", "event_id": 12}') == {}
    assert ids_from_body(b"\xff\xfe not json") == {}


def test_an_id_written_inside_the_text_is_not_taken_for_the_events() -> None:
    forged = str(uuid.uuid4())
    real = uuid.uuid4()
    # The text comes first here, as a hand-written body might have it.
    body = json.dumps(
        {"message_content": f'"notification_id":"{forged}"', "notification_id": str(real)}
    ).encode()
    assert ids_from_body(body) == {"notification_id": str(real)}


def test_only_the_start_of_a_long_body_is_searched() -> None:
    late = json.dumps({"padding": "x" * 5000, "event_id": str(uuid.uuid4())}).encode()
    assert ids_from_body(late) == {}


# --- the context of a consumed message -----------------------------------------------------------


async def test_a_consumed_message_logs_json_with_its_ids_and_none_of_its_body(
    lines: io.StringIO,
) -> None:
    broker = make_broker(RabbitSettings(), service_name="email-sender")
    publisher = event_publisher(broker, EmailRequested, EMAIL_SEND, description="test")
    logger = logging.getLogger("herald.test")

    @broker.subscriber(EMAIL_NOTIFICATIONS.queue, EXCHANGE)
    async def handle(event: EmailRequested) -> None:
        logger.info("email.sent notification_id=%s", event.notification_id)
        try:
            # What a handler might do with a body it cannot use: the error is logged with its
            # traceback, which must not quote the input (hide_input_in_errors).
            EmailRequested.model_validate({**event.model_dump(), "sent_at": PLANTED_TEXT})
        except pydantic.ValidationError:
            logger.warning("email.unusable", exc_info=True)

    event = _email()
    correlation = str(uuid.uuid4())
    async with TestRabbitBroker(broker):
        await publish_event(publisher, event, timeout=5, correlation_id=correlation)
        await handle.wait_call(5)

    sent, unusable = _parsed(lines)
    for line in (sent, unusable):
        assert line["service"] == "email-sender"
        assert line["logger"] == "herald.test"
        assert line["event_id"] == str(event.event_id)
        assert line["message_id"] == str(event.message_id)
        assert line["notification_id"] == str(event.notification_id)
        assert line["correlation_id"] == correlation
        assert "trace_id" not in line  # nothing traces here
    assert sent["level"] == "INFO"
    assert sent["message"] == f"email.sent notification_id={event.notification_id}"
    assert datetime.fromisoformat(sent["timestamp"]).tzinfo is not None
    assert "ValidationError" in unusable["exception"]
    text = lines.getvalue()
    for planted in (PLANTED_EMAIL, PLANTED_TEXT, PLANTED_TOKEN):
        assert planted not in text


async def test_ids_bound_for_one_message_do_not_leak_into_the_next(lines: io.StringIO) -> None:
    broker = make_broker(RabbitSettings(), service_name="email-sender")
    publisher = event_publisher(broker, EmailRequested, EMAIL_SEND, description="test")
    contexts: list[dict[str, str]] = []

    @broker.subscriber(EMAIL_NOTIFICATIONS.queue, EXCHANGE)
    async def handle(event: EmailRequested) -> None:
        contexts.append(dict(current_log_context()))
        if event.room_name == "first":
            bind_log_context(correlation_id="bound-by-the-handler")

    first, second = _email(room_name="first"), _email(room_name="second")
    async with TestRabbitBroker(broker):
        await publish_event(publisher, first, timeout=5, correlation_id="c-1")
        await publish_event(publisher, second, timeout=5, correlation_id="c-2")
    assert [context["correlation_id"] for context in contexts] == ["c-1", "c-2"]
    assert contexts[1]["event_id"] == str(second.event_id)
    assert current_log_context() == {}


def test_only_ids_can_be_bound() -> None:
    with pytest.raises(ValueError, match="not a log context field"):
        bind_log_context(email=PLANTED_EMAIL)
    with log_context(event_id=uuid.UUID(int=1)):
        assert current_log_context() == {"event_id": str(uuid.UUID(int=1))}
    assert current_log_context() == {}


# --- configure_logging ---------------------------------------------------------------------------


def test_log_format_defaults_to_json_and_accepts_text(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOG_FORMAT", raising=False)
    assert _Settings().log_format == "json"
    monkeypatch.setenv("LOG_FORMAT", "TEXT")
    assert _Settings().log_format == "text"
    monkeypatch.setenv("LOG_FORMAT", "xml")
    with pytest.raises(pydantic.ValidationError):
        _Settings()


@pytest.mark.usefixtures("restore_logging")
def test_json_format_writes_one_object_per_line() -> None:
    out = io.StringIO()
    configure_logging(_Settings(log_format="json"), "push-sender", stream=out)
    with log_context(notification_id=uuid.UUID(int=7)):
        logging.getLogger("push_sender.sender").info("push.delivered attempt=%d", 1)
    logging.getLogger("faststream").warning("from faststream")
    first, second = _parsed(out)
    assert first == {
        "timestamp": first["timestamp"],
        "level": "INFO",
        "logger": "push_sender.sender",
        "service": "push-sender",
        "message": "push.delivered attempt=1",
        "notification_id": str(uuid.UUID(int=7)),
    }
    # FastStream's own logger (which does not propagate) writes JSON too.
    assert second["logger"] == "faststream"
    assert second["message"] == "from faststream"


@pytest.mark.usefixtures("restore_logging")
def test_text_format_appends_the_known_ids() -> None:
    out = io.StringIO()
    configure_logging(_Settings(log_format="text"), "push-sender", stream=out)
    with log_context(correlation_id="c-9"):
        logging.getLogger("push_sender.sender").info("push.delivered attempt=%d", 1)
    logging.getLogger("push_sender.sender").info("no context")
    with_context, without = out.getvalue().splitlines()
    assert with_context.endswith(
        "push-sender push_sender.sender push.delivered attempt=1 [correlation_id=c-9]"
    )
    assert without.endswith("push-sender push_sender.sender no context")


@pytest.mark.usefixtures("restore_logging")
def test_access_lines_lose_their_query_string() -> None:
    out = io.StringIO()
    configure_logging(_Settings(log_format="json"), "message-service", stream=out)
    configure_logging(_Settings(log_format="json"), "message-service", stream=out)  # idempotent
    access = logging.getLogger("uvicorn.access")
    assert sum(isinstance(item, QueryFreeAccessLog) for item in access.filters) == 1
    access.info(
        '%s - "%s %s HTTP/%s" %d',
        "127.0.0.1:5000",
        "GET",
        f"/unsubscribe?token={PLANTED_TOKEN}",
        "1.1",
        200,
    )
    [line] = _parsed(out)
    assert line["message"] == '127.0.0.1:5000 - "GET /unsubscribe HTTP/1.1" 200'


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize(("level", "written"), [("INFO", True), ("WARNING", False)])
def test_a_channel_or_consumer_aio_pika_could_not_restore_is_logged(
    level: str, written: bool
) -> None:
    out = io.StringIO()
    configure_logging(_Settings(log_format="json", log_level=level), "push-sender", stream=out)
    # What aio-pika 10.2.1's robust channel logs, at DEBUG, when a restore fails.
    logging.getLogger("aio_pika.robust_channel").debug(
        "Consumer recovery failed for %r; retrying", "<Queue(push_notifications)>"
    )
    lines = _parsed(out)
    assert [line["message"] for line in lines] == (
        ["Consumer recovery failed for '<Queue(push_notifications)>'; retrying"] if written else []
    )


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize(("connected", "level"), [(False, "WARNING"), (True, "ERROR")])
async def test_a_channel_that_could_not_restore_itself_while_disconnected_is_a_warning(
    connected: bool, level: str
) -> None:
    """aio-pika 10.2.1 logs an ERROR per channel when a connection drops: each channel's close
    callback tries to reopen it before the connection is back. The reconnect restores them, so
    that is a warning; the same failure while connected stays an error."""
    out = io.StringIO()
    configure_logging(_Settings(log_format="json"), "push-sender", stream=out)
    connection = SimpleNamespace(connected=asyncio.Event())
    if connected:
        connection.connected.set()
    callback = OneShotCallback(RobustChannel(connection)._on_close)  # type: ignore[arg-type]
    # aio-pika's own call (aio_pika/tools.py, OneShotCallback.__task_inner).
    logging.getLogger("aio_pika.tools").error(
        "Callback %r error: %s: %s",
        callback,
        "ChannelInvalidStateError",
        "No active transport in channel",
    )
    [line] = _parsed(out)
    assert line["level"] == level
    assert line["logger"] == "aio_pika.tools"
    if connected:
        assert line["message"].startswith("Callback <OneShotCallback")
    else:
        assert line["message"] == (
            "herald.broker.channel_restore_deferred error=ChannelInvalidStateError"
        )


@pytest.mark.usefixtures("restore_logging")
def test_other_errors_of_aio_pika_callbacks_stay_errors() -> None:
    out = io.StringIO()
    configure_logging(_Settings(log_format="json"), "push-sender", stream=out)
    logging.getLogger("aio_pika.tools").error(
        "Callback %r error: %s: %s", print, "ValueError", "something else"
    )
    [line] = _parsed(out)
    assert (line["level"], line["message"]) == (
        "ERROR",
        "Callback <built-in function print> error: ValueError: something else",
    )


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize(
    ("code", "text", "level", "message"),
    [
        (
            320,
            "CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'",
            "WARNING",
            "herald.broker.connection_closed code=320 reason=CONNECTION_FORCED - broker forced"
            " connection closure with reason 'shutdown'",
        ),
        (
            403,
            "ACCESS_REFUSED",
            "ERROR",
            'Unexpected connection close from remote "amqp://guest:******@127.0.0.1:5672/",'
            " Connection.Close(reply_code=403, reply_text='ACCESS_REFUSED')",
        ),
    ],
)
def test_a_connection_the_broker_forced_closed_is_a_warning(
    code: int, text: str, level: str, message: str
) -> None:
    """A node shutting down (or an operator) closes the connection with connection-forced
    (320), and the client reconnects; any other reason stays an error."""
    out = io.StringIO()
    configure_logging(_Settings(log_format="json"), "router", stream=out)
    # aiormq 7.2.4's own call (aiormq/connection.py, __handle_close).
    logging.getLogger("aiormq.connection").error(
        'Unexpected connection close from remote "%s", '
        "Connection.Close(reply_code=%r, reply_text=%r)",
        "amqp://guest:******@127.0.0.1:5672/",
        code,
        text,
    )
    [line] = _parsed(out)
    assert (line["level"], line["message"]) == (level, message)


def _handler_failed(error: BaseException) -> None:
    """What FastStream's logging middleware logs for a handler that raised `error`."""
    logging.getLogger("faststream.access.rabbit").error(
        f"{type(error).__name__}: {error}", exc_info=error
    )


@pytest.mark.usefixtures("restore_logging")
def test_a_handler_cancelled_by_its_closed_connection_is_a_warning_without_a_traceback() -> None:
    out = io.StringIO()
    configure_logging(_Settings(log_format="json"), "email-sender", stream=out)
    closed = ConnectionClosed(320, "CONNECTION_FORCED - closed by an operator")
    try:
        raise asyncio.CancelledError(closed)  # as aiormq cancels a closed channel's consumers
    except asyncio.CancelledError as error:
        _handler_failed(error)
    for other_reason in (
        None,  # a cancellation for any other reason
        ConnectionClosed(501, "FRAME_ERROR"),  # not connection-forced
        ChannelClosed(406, "PRECONDITION_FAILED - unknown delivery tag"),  # a protocol error
    ):
        try:
            raise asyncio.CancelledError(*([] if other_reason is None else [other_reason]))
        except asyncio.CancelledError as error:
            _handler_failed(error)
    interrupted, *others = _parsed(out)
    assert interrupted["level"] == "WARNING"
    assert interrupted["message"] == (
        "herald.message.interrupted error=ConnectionClosed:"
        " [Errno 320] CONNECTION_FORCED - closed by an operator"
    )
    assert "exception" not in interrupted
    assert [(other["level"], "CancelledError" in other["exception"]) for other in others] == [
        ("ERROR", True)
    ] * 3
