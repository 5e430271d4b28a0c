from __future__ import annotations

from typing import Any, cast

import aiormq.exceptions
import pytest
import sqlalchemy.exc
from yarl import URL

from herald_shared.broker import (
    RESTORE_PAUSE_S,
    FailoverConnection,
    RabbitSettings,
    connection_url,
    connection_urls,
    failover_connection,
    make_broker,
)
from herald_shared.retry import (
    DeferredError,
    PermanentError,
    RetryableError,
    RetryPolicy,
    batch_error,
    describe_error,
    is_deferred,
    is_permanent,
)


@pytest.mark.parametrize(
    ("retry_number", "retry_after", "expected"),
    [
        (1, None, 1.0),
        (2, None, 5.0),
        (3, None, 25.0),
        (7, None, 25.0),
        (1, 3.0, 5.0),
        (1, 0.5, 1.0),
        (2, 600.0, 25.0),
    ],
)
def test_delay_tiers(retry_number: int, retry_after: float | None, expected: float) -> None:
    policy = RetryPolicy(delays=(1.0, 5.0, 25.0), max_retries=3)
    assert policy.delay_for(retry_number, retry_after) == expected


def test_unknown_errors_are_described_by_class_and_place_only() -> None:
    try:
        raise RuntimeError("INSERT … VALUES ('alice@example.com')")
    except RuntimeError as exc:
        description = describe_error(exc)
    assert "alice@example.com" not in description
    assert "builtins.RuntimeError at test_retry_policy.py:" in description


def test_classification() -> None:
    assert is_permanent(PermanentError("bad"))
    assert not is_permanent(RetryableError("later"))
    assert not is_permanent(ConnectionError())


def test_retry_delays_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RABBITMQ_RETRY_DELAYS", "0.5, 2,8")
    monkeypatch.setenv("RABBITMQ_MAX_RETRIES", "4")
    settings = RabbitSettings()
    assert settings.retry_delays == (0.5, 2.0, 8.0)
    assert settings.retry_policy.max_retries == 4


def test_retry_delays_must_be_positive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RABBITMQ_RETRY_DELAYS", "1,0")
    with pytest.raises(ValueError, match="positive"):
        RabbitSettings()


def test_connection_is_named_after_the_service_and_heartbeat_applied() -> None:
    settings = RabbitSettings(url="amqp://u:p@rabbit:5672/chat", heartbeat=15)
    url = connection_url(settings, "push-sender")
    assert url == "amqp://u:p@rabbit:5672/chat?name=push-sender&heartbeat=15"
    overridden = connection_url(RabbitSettings(url="amqp://h/?heartbeat=30"), "x")
    assert "heartbeat=30" in overridden


def test_a_factor_scales_every_tier(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RABBITMQ_RETRY_DELAYS", "1,5,25")
    monkeypatch.setenv("RABBITMQ_RETRY_DELAY_FACTOR", "0.01")
    settings = RabbitSettings()
    assert settings.retry_delays == (0.01, 0.05, 0.25)
    assert settings.retry_policy.delay_for(2) == 0.05


class _AdminShutdown(Exception):
    """Like asyncpg's AdminShutdownError: the server says why with a SQLSTATE."""

    sqlstate = "57P01"


def _raised_from(error: BaseException, cause: BaseException) -> BaseException:
    try:
        raise error from cause
    except BaseException as raised:
        return raised


@pytest.mark.parametrize(
    ("error", "deferred"),
    [
        (ConnectionRefusedError(111, "refused"), True),
        (_raised_from(RuntimeError("wrapped"), ConnectionResetError()), True),
        (TimeoutError(), True),
        (_AdminShutdown(), True),
        (
            sqlalchemy.exc.DBAPIError(
                "SELECT 1", None, _AdminShutdown(), connection_invalidated=True
            ),
            True,
        ),
        (sqlalchemy.exc.OperationalError("SELECT 1", None, _AdminShutdown()), True),
        (DeferredError("busy"), True),
        (aiormq.exceptions.DeliveryError(None, cast(Any, None)), True),  # a nack
        # Returned as unroutable (built bare: its constructor reads the returned message).
        (aiormq.exceptions.PublishError.__new__(aiormq.exceptions.PublishError), False),
        # A verdict on this message stays an attempt, whatever caused it.
        (_raised_from(RetryableError("smtp 451"), ConnectionResetError()), False),
        (FileNotFoundError(2, "No such file"), False),
        (sqlalchemy.exc.IntegrityError("INSERT", None, ValueError()), False),
        (ValueError("bug"), False),
    ],
    ids=[
        "refused",
        "reset-as-cause",
        "timeout",
        "sqlstate-57P01",
        "invalidated",
        "operational-57P01",
        "deferred",
        "nacked",
        "returned",
        "retryable-verdict",
        "missing-file",
        "integrity",
        "bug",
    ],
)
def test_what_waits_without_spending_an_attempt(error: BaseException, deferred: bool) -> None:
    assert is_deferred(error) is deferred


@pytest.mark.parametrize(
    ("errors", "expected"),
    [
        ([None, None], None),
        ([], None),
        ([None, PermanentError("fcm 400")], PermanentError("fcm 400")),
        (
            [PermanentError("fcm 400"), DeferredError("busy", retry_after=3.0), None],
            DeferredError("busy", retry_after=3.0),
        ),
        (
            [
                DeferredError("busy", retry_after=3.0),
                RetryableError("fcm 503"),
                RetryableError("fcm 429", retry_after=20.0),
                PermanentError("fcm 400"),
            ],
            RetryableError("fcm 503 (and 1 more)", retry_after=20.0),
        ),
        (
            [DeferredError("breaker open"), DeferredError("busy", retry_after=3.0)],
            DeferredError("breaker open (and 1 more)", retry_after=3.0),
        ),
    ],
)
def test_a_batch_ends_as_the_item_that_needs_most(
    errors: list[RetryableError | DeferredError | PermanentError | None],
    expected: RetryableError | DeferredError | PermanentError | None,
) -> None:
    result = batch_error(errors)

    if expected is None:
        assert result is None
        return
    assert type(result) is type(expected)
    assert result is not None
    assert result.reason == expected.reason
    assert getattr(result, "retry_after", None) == getattr(expected, "retry_after", None)


def test_several_broker_addresses_from_rabbitmq_urls_or_rabbitmq_url(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RABBITMQ_URL", "amqp://u:p@a:5672/chat, amqp://u:p@b:5672/chat")
    assert RabbitSettings().addresses == ("amqp://u:p@a:5672/chat", "amqp://u:p@b:5672/chat")
    monkeypatch.setenv("RABBITMQ_URLS", "amqp://u:p@c/chat,amqp://u:p@d/chat,")
    settings = RabbitSettings(heartbeat=15)
    assert settings.addresses == ("amqp://u:p@c/chat", "amqp://u:p@d/chat")
    assert connection_urls(settings, "router") == [
        "amqp://u:p@c/chat?name=router&heartbeat=15",
        "amqp://u:p@d/chat?name=router&heartbeat=15",
    ]
    assert connection_url(settings, "router") == "amqp://u:p@c/chat?name=router&heartbeat=15"


@pytest.mark.parametrize("empty", ["", "  ", " , "])
def test_an_empty_rabbitmq_urls_counts_as_unset(
    monkeypatch: pytest.MonkeyPatch, empty: str
) -> None:
    """Compose passes `RABBITMQ_URLS: ${HERALD_CLUSTER:+...}` as an empty variable outside the
    cluster profile: RABBITMQ_URL must then apply."""
    monkeypatch.setenv("RABBITMQ_URL", "amqp://u:p@a:5672/chat")
    monkeypatch.setenv("RABBITMQ_URLS", empty)
    assert RabbitSettings().addresses == ("amqp://u:p@a:5672/chat",)


def test_broker_addresses_share_one_scheme() -> None:
    with pytest.raises(ValueError, match="all be amqp:// or all amqps://"):
        RabbitSettings(urls="amqps://a/,amqp://b/")
    with pytest.raises(ValueError, match="all be amqp:// or all amqps://"):
        RabbitSettings(url="http://a/")


def test_a_broker_with_several_addresses_connects_through_a_failover_connection() -> None:
    single = make_broker(RabbitSettings(url="amqp://a/"), service_name="x")
    assert "connection_class" not in single._connection_kwargs
    broker = make_broker(RabbitSettings(urls="amqp://u:p@a/,amqp://u:p@b:5673/"), service_name="x")
    connection_class = broker._connection_kwargs["connection_class"]
    assert issubclass(connection_class, FailoverConnection)
    assert [str(url) for url in connection_class.ADDRESSES] == [
        "amqp://u:p@a/?name=x&heartbeat=20",
        "amqp://u:p@b:5673/?name=x&heartbeat=20",
    ]
    assert broker._connection_kwargs["fail_fast"] is False


async def test_a_failover_connection_tries_each_address_at_once_and_pauses_after_a_round() -> None:
    connection_class = failover_connection(["amqp://a/", "amqp://b/", "amqp://c/"])
    connection = connection_class(URL("amqp://a/?reconnect_interval=7"))
    pauses = []
    for _ in range(4):  # four attempts that never connect
        attempted = connection.url.host
        pauses.append((attempted, connection.reconnect_interval))
    # A lost connection's next attempt goes at once; so does each attempt of a round.
    assert pauses == [("a", 0.0), ("b", 0.0), ("c", 7), ("a", 0.0)]

    connection.connected.set()  # connected: only a cancelled consumer is left to restore
    assert connection.reconnect_interval == RESTORE_PAUSE_S

    single = failover_connection(["amqp://a/"])(URL("amqp://a/?reconnect_interval=0.5"))
    assert single.url.host == "a"
    assert single.reconnect_interval == 0.5  # one address: every attempt is a round
    single.connected.set()
    assert single.reconnect_interval == 0.5  # never longer than the interval
