"""The FCM HTTP v1 adapter against the fake FCM server, which speaks the real protocol: the
JWT-bearer token exchange (signature and claims verified), the access-token cache, the message
body, and every row of the provider error → action table; and against bare TCP servers that
misbehave (hang, hang up, send an endless body)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from multidict import CIMultiDict

from herald_shared.events import Trigger
from push_sender.providers import FcmConfigurationError, FcmProvider, ProviderAnswer, Verdict
from push_sender.providers.fcm import (
    BODY_LIMIT,
    SCOPE,
    classify,
    load_service_account,
    parse_retry_after,
)
from push_sender.settings import FcmSettings
from tests.fakes.fcm import FakeFcm
from tests.support.infra import wait_until
from tests.support.processes import free_port
from tests.unit.push_sender.support import DEVICE_TOKEN, push_job


def read_json(path: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(path.read_text())
    return document


def replace_private_key(path: Path) -> None:
    """Same key id, another key: what a rotated or revoked key looks like to the token endpoint."""
    document = read_json(path)
    document["private_key"] = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode()
    )
    path.write_text(json.dumps(document))


class RawServer:
    """A bare TCP server on 127.0.0.1: on each connection it reads the request head, writes
    `reply` (nothing if None), then hangs up (`hang_up`) or holds the connection until the client
    closes it, which it counts in `closed_by_client`."""

    def __init__(self, reply: bytes | None = None, *, hang_up: bool = False) -> None:
        self.reply = reply
        self.hang_up = hang_up
        self.closed_by_client = 0
        self.url = ""
        self._handlers: set[asyncio.Task[Any]] = set()

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._server.close()
        for handler in self._handlers:
            handler.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        try:
            await reader.readuntil(b"\r\n\r\n")
            if self.reply is not None:
                writer.write(self.reply)
            if not self.hang_up:
                # The request body, then EOF, or a reset when the client closed with some of
                # the reply unread.
                with contextlib.suppress(ConnectionError):
                    await reader.read()
                self.closed_by_client += 1
        finally:
            writer.close()


def http_reply(status: str, body: bytes, *, content_length: int | None = None) -> bytes:
    length = len(body) if content_length is None else content_length
    head = f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {length}"
    return f"{head}\r\n\r\n".encode() + body


@pytest.fixture
async def make_provider(
    fcm: FakeFcm, credentials: Path
) -> AsyncIterator[Callable[..., FcmProvider]]:
    providers: list[FcmProvider] = []

    def make(**overrides: object) -> FcmProvider:
        values: dict[str, object] = {
            "credentials_file": credentials,
            "base_url": fcm.base_url,
            "timeout": 2.0,
        }
        values.update(overrides)
        provider = FcmProvider.from_settings(FcmSettings(**values))  # type: ignore[arg-type]
        providers.append(provider)
        return provider

    yield make
    for provider in providers:
        await provider.aclose()


@pytest.fixture
def provider(make_provider: Callable[..., FcmProvider]) -> FcmProvider:
    return make_provider()


async def test_the_token_exchange_is_a_signed_jwt_bearer_grant(
    provider: FcmProvider, fcm: FakeFcm, credentials: Path
) -> None:
    answer = await provider.send(push_job())

    # The fake verified the assertion's signature and claims before issuing the token it then
    # demanded on messages:send.
    assert answer == ProviderAnswer.accepted()
    assert (fcm.token_requests, fcm.send_requests, len(fcm.accepted)) == (1, 1, 1)

    account = read_json(credentials)
    assertion = provider.tokens.assertion()
    header = jwt.get_unverified_header(assertion)
    assert (header["alg"], header["kid"]) == ("RS256", account["private_key_id"])
    claims = jwt.decode(assertion, options={"verify_signature": False})
    assert claims["iss"] == account["client_email"]
    assert claims["aud"] == account["token_uri"] == fcm.token_uri
    assert claims["scope"] == SCOPE
    assert 0 < claims["exp"] - claims["iat"] <= 3600


async def test_one_access_token_serves_many_sends(provider: FcmProvider, fcm: FakeFcm) -> None:
    answers = await asyncio.gather(*(provider.send(push_job()) for _ in range(10)))
    answers.append(await provider.send(push_job()))

    assert {answer.verdict for answer in answers} == {Verdict.ACCEPTED}
    assert fcm.token_requests == 1
    assert len(fcm.accepted) == 11


async def test_the_token_is_replaced_shortly_before_it_expires(
    credentials: Path, tmp_path: Path
) -> None:
    with FakeFcm(token_lifetime=1) as short_lived:
        path = short_lived.write_credentials(tmp_path / "short.json")
        provider = FcmProvider.from_settings(
            FcmSettings(credentials_file=path, base_url=short_lived.base_url, timeout=2.0)
        )
        try:
            await provider.send(push_job())
            assert short_lived.token_requests == 1

            async def renewed() -> bool:
                answer = await provider.send(push_job())
                assert answer.verdict is Verdict.ACCEPTED  # never a 401 on the way
                return short_lived.token_requests == 2

            await wait_until(renewed, timeout=5)
            assert short_lived.send_requests == len(short_lived.accepted)
        finally:
            await provider.aclose()


async def test_a_refused_access_token_is_refreshed_once(
    provider: FcmProvider, fcm: FakeFcm
) -> None:
    await provider.send(push_job())
    fcm.revoke_tokens()

    answer = await provider.send(push_job())

    assert answer.verdict is Verdict.ACCEPTED
    assert fcm.token_requests == 2
    assert fcm.send_requests == 3  # accepted, 401, accepted with the new token
    assert len(fcm.accepted) == 2


async def test_a_401_after_the_refresh_is_a_configuration_problem(
    provider: FcmProvider, fcm: FakeFcm
) -> None:
    fcm.fail(DEVICE_TOKEN, 401, "THIRD_PARTY_AUTH_ERROR")

    answer = await provider.send(push_job())

    assert answer == ProviderAnswer(Verdict.MISCONFIGURED, "fcm 401 THIRD_PARTY_AUTH_ERROR")
    assert (fcm.token_requests, fcm.send_requests) == (2, 2)  # one refresh, one more try


async def test_a_403_is_a_configuration_problem(provider: FcmProvider, fcm: FakeFcm) -> None:
    fcm.fail(DEVICE_TOKEN, 403, "PERMISSION_DENIED")

    answer = await provider.send(push_job())

    assert answer == ProviderAnswer(Verdict.MISCONFIGURED, "fcm 403 PERMISSION_DENIED")
    # A fresh token of the same account has the same permissions: no refresh.
    assert fcm.token_requests == 1


async def test_a_token_of_another_project_refuses_only_its_push(
    provider: FcmProvider, fcm: FakeFcm
) -> None:
    """SENDER_ID_MISMATCH is about one registration token (another Firebase project's): not our
    configuration, which any user could otherwise claim, nor a dead token, which a wrong project
    setting would otherwise make of every device's."""
    fcm.fail(DEVICE_TOKEN, 403, "SENDER_ID_MISMATCH")

    answer = await provider.send(push_job())

    assert answer == ProviderAnswer(Verdict.REJECTED, "fcm 403 SENDER_ID_MISMATCH")
    assert fcm.token_requests == 1
    assert (await provider.send(push_job(token="another-device"))).verdict is Verdict.ACCEPTED


async def test_another_project_is_refused(
    make_provider: Callable[..., FcmProvider], fcm: FakeFcm
) -> None:
    answer = await make_provider(project_id="someone-else").send(push_job())

    assert answer == ProviderAnswer(Verdict.MISCONFIGURED, "fcm 403 PERMISSION_DENIED")
    assert fcm.accepted == []


async def test_the_project_defaults_to_the_credentials_file(
    provider: FcmProvider, fcm: FakeFcm
) -> None:
    assert provider.project_id == fcm.project_id
    assert provider.send_url == f"{fcm.base_url}/v1/projects/herald-test/messages:send"


async def test_the_message_carries_the_notification_ids_and_collapse_ids(
    provider: FcmProvider, fcm: FakeFcm
) -> None:
    job = push_job(trigger=Trigger.MENTION)

    await provider.send(job)

    notification_id = str(job.notification_id)
    room = str(job.room_id)
    assert fcm.accepted == [
        {
            "message": {
                "token": DEVICE_TOKEN,
                "notification": {"title": job.title, "body": job.body},
                "data": {
                    "notification_id": notification_id,
                    "message_id": str(job.message_id),
                    "room_id": str(job.room_id),
                },
                "android": {
                    "priority": "HIGH",
                    "collapse_key": room,
                    "notification": {"tag": room},
                },
                "apns": {
                    "headers": {"apns-collapse-id": notification_id, "apns-priority": "10"},
                    "payload": {"aps": {"thread-id": room, "sound": "default"}},
                },
            }
        }
    ]


@pytest.mark.parametrize(
    ("status", "error_code", "options", "expected"),
    [
        (
            404,
            "UNREGISTERED",
            {},
            ProviderAnswer(Verdict.TOKEN_INVALID, "fcm 404 UNREGISTERED"),
        ),
        (
            400,
            "INVALID_ARGUMENT",
            {"field": "message.token"},
            ProviderAnswer(Verdict.TOKEN_INVALID, "fcm 400 INVALID_ARGUMENT token"),
        ),
        (
            400,
            "INVALID_ARGUMENT",
            {},
            ProviderAnswer(Verdict.REJECTED, "fcm 400 INVALID_ARGUMENT"),
        ),
        (
            400,
            "INVALID_ARGUMENT",
            {"field": "message.android.ttl"},
            ProviderAnswer(Verdict.REJECTED, "fcm 400 INVALID_ARGUMENT"),
        ),
        (
            429,
            "QUOTA_EXCEEDED",
            {"retry_after": 7},
            ProviderAnswer(Verdict.TRANSIENT, "fcm 429 QUOTA_EXCEEDED", 7.0),
        ),
        (
            503,
            "UNAVAILABLE",
            {},
            ProviderAnswer(Verdict.TRANSIENT, "fcm 503 UNAVAILABLE"),
        ),
        (
            503,
            "UNAVAILABLE",
            {"retry_after": 30},
            ProviderAnswer(Verdict.TRANSIENT, "fcm 503 UNAVAILABLE", 30.0),
        ),
        (
            500,
            "INTERNAL",
            {},
            ProviderAnswer(Verdict.TRANSIENT, "fcm 500 INTERNAL"),
        ),
        # A 404 that is not UNREGISTERED is a wrong project or base URL: never invalidate.
        (
            404,
            "",
            {},
            ProviderAnswer(Verdict.MISCONFIGURED, "fcm 404 NOT_FOUND"),
        ),
    ],
)
async def test_provider_errors(
    provider: FcmProvider,
    fcm: FakeFcm,
    status: int,
    error_code: str,
    options: dict[str, object],
    expected: ProviderAnswer,
) -> None:
    fcm.fail(DEVICE_TOKEN, status, error_code, times=1, **options)  # type: ignore[arg-type]

    assert await provider.send(push_job()) == expected
    assert fcm.accepted == []
    # The script was used once: the next send goes through.
    assert (await provider.send(push_job())).verdict is Verdict.ACCEPTED


async def test_a_malformed_message_is_refused_for_good(provider: FcmProvider, fcm: FakeFcm) -> None:
    # The fake validates the body like FCM: a data value that is not a string is refused.
    token = await provider.tokens.get()
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            provider.send_url,
            json={"message": {"token": DEVICE_TOKEN, "data": {"n": 1}}},
            headers={"authorization": f"Bearer {token}"},
        ) as response,
    ):
        answer = classify(response.status, await response.json(), response.headers)

    assert answer == ProviderAnswer(Verdict.REJECTED, "fcm 400 INVALID_ARGUMENT")
    assert fcm.accepted == []


async def test_a_timeout_is_transient(
    make_provider: Callable[..., FcmProvider], fcm: FakeFcm
) -> None:
    provider = make_provider(timeout=0.3)
    await provider.send(push_job())  # the token, fetched in time
    fcm.stall(DEVICE_TOKEN, 3.0, times=1)

    assert await provider.send(push_job()) == ProviderAnswer.transient("fcm timeout")


async def test_a_refused_connection_is_transient(
    make_provider: Callable[..., FcmProvider],
) -> None:
    provider = make_provider(base_url=f"http://127.0.0.1:{free_port()}")
    await provider.tokens.get()  # the token endpoint works; FCM itself is unreachable

    answer = await provider.send(push_job())

    assert answer == ProviderAnswer.transient("fcm connection failed (ConnectFailed)")


async def test_an_unreachable_token_endpoint_is_transient(fcm: FakeFcm, tmp_path: Path) -> None:
    path = fcm.write_credentials(
        tmp_path / "elsewhere.json", token_uri=f"http://127.0.0.1:{free_port()}/token"
    )
    provider = FcmProvider.from_settings(
        FcmSettings(credentials_file=path, base_url=fcm.base_url, timeout=2.0)
    )
    try:
        answer = await provider.send(push_job())
    finally:
        await provider.aclose()

    assert answer == ProviderAnswer.transient("oauth connection failed (ConnectFailed)")
    assert fcm.send_requests == 0


async def test_a_hanging_server_is_a_timeout(make_provider: Callable[..., FcmProvider]) -> None:
    async with RawServer() as server:
        provider = make_provider(base_url=server.url, timeout=0.3)
        await provider.tokens.get()  # the token endpoint answers; FCM accepts and says nothing

        answer = await provider.send(push_job())

        assert answer == ProviderAnswer.transient("fcm timeout")


async def test_a_hanging_token_endpoint_is_a_timeout(fcm: FakeFcm, tmp_path: Path) -> None:
    async with RawServer() as server:
        path = fcm.write_credentials(tmp_path / "hanging.json", token_uri=f"{server.url}/token")
        provider = FcmProvider.from_settings(
            FcmSettings(credentials_file=path, base_url=fcm.base_url, timeout=0.3)
        )
        try:
            answer = await provider.send(push_job())
        finally:
            await provider.aclose()

    assert answer == ProviderAnswer.transient("oauth timeout")
    assert fcm.send_requests == 0


async def test_a_connection_closed_before_the_answer_is_transient(
    make_provider: Callable[..., FcmProvider],
) -> None:
    async with RawServer(hang_up=True) as server:
        provider = make_provider(base_url=server.url)
        await provider.tokens.get()

        answer = await provider.send(push_job())

    assert answer == ProviderAnswer.transient("fcm connection failed (ServerDisconnected)")


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (BODY_LIMIT, ProviderAnswer(Verdict.TOKEN_INVALID, "fcm 404 UNREGISTERED")),
        # One byte more: not read as JSON, so no UNREGISTERED, so no device is invalidated.
        (BODY_LIMIT + 1, ProviderAnswer(Verdict.MISCONFIGURED, "fcm 404")),
    ],
)
async def test_an_error_body_is_read_up_to_the_limit(
    make_provider: Callable[..., FcmProvider], size: int, expected: ProviderAnswer
) -> None:
    error = json.dumps(
        {
            "error": {
                "status": "NOT_FOUND",
                "details": [
                    {
                        "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                        "errorCode": "UNREGISTERED",
                    }
                ],
            }
        }
    ).encode()
    body = error.ljust(size)  # trailing spaces: still JSON
    async with RawServer(http_reply("404 Not Found", body)) as server:
        provider = make_provider(base_url=server.url)
        await provider.tokens.get()

        assert await provider.send(push_job()) == expected


async def test_an_endless_error_body_is_not_read_beyond_the_limit(
    make_provider: Callable[..., FcmProvider],
) -> None:
    # It announces 100 MB and sends twice the limit, then nothing: reading it all would wait
    # for the read timeout and buffer whatever came.
    reply = http_reply("500 Internal Server Error", b" " * (2 * BODY_LIMIT), content_length=10**8)
    async with RawServer(reply) as server:
        provider = make_provider(base_url=server.url, timeout=5.0)
        await provider.tokens.get()

        answer = await provider.send(push_job())

        assert answer == ProviderAnswer.transient("fcm 500")

        # The rest is not drained: the connection is closed rather than reused.
        async def closed() -> bool:
            return server.closed_by_client == 1

        await wait_until(closed, timeout=5)


async def test_aclose_closes_the_connections(make_provider: Callable[..., FcmProvider]) -> None:
    async with RawServer(http_reply("200 OK", b'{"name": "projects/p/messages/1"}')) as server:
        provider = make_provider(base_url=server.url)
        assert await provider.send(push_job()) == ProviderAnswer.accepted()
        assert server.closed_by_client == 0  # kept alive for the next send

        await provider.aclose()

        async def closed() -> bool:
            return server.closed_by_client == 1

        await wait_until(closed, timeout=5)


async def test_a_provider_closed_before_its_first_send_makes_no_session(
    provider: FcmProvider, fcm: FakeFcm
) -> None:
    await provider.aclose()

    # Its session would be made now and never closed: a send after shutdown is a bug.
    with pytest.raises(RuntimeError, match="closed"):
        await provider.send(push_job())
    assert fcm.token_requests == 0


def test_a_provider_built_before_the_event_loop_runs_can_send(
    fcm: FakeFcm, credentials: Path
) -> None:
    # As at start-up: the service builds its providers before its event loop runs.
    provider = FcmProvider.from_settings(
        FcmSettings(credentials_file=credentials, base_url=fcm.base_url, timeout=2.0)
    )

    async def send_once() -> ProviderAnswer:
        try:
            return await provider.send(push_job())
        finally:
            await provider.aclose()

    assert asyncio.run(send_once()) == ProviderAnswer.accepted()


async def test_a_key_the_token_endpoint_refuses_is_a_configuration_problem(
    fcm: FakeFcm, credentials: Path
) -> None:
    replace_private_key(credentials)
    provider = FcmProvider.from_settings(
        FcmSettings(credentials_file=credentials, base_url=fcm.base_url, timeout=2.0)
    )
    try:
        answer = await provider.send(push_job())
    finally:
        await provider.aclose()

    assert answer == ProviderAnswer(Verdict.MISCONFIGURED, "oauth 400 invalid_grant")
    assert fcm.send_requests == 0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot be read"),
        ("not json", "not a service-account JSON file"),
        ('{"project_id": "p", "client_email": "x@y", "private_key": "SECRET"}', "not a PEM key"),
        (
            '{"type": "authorized_user", "project_id": "p", "client_email": "x@y", '
            '"private_key": "SECRET"}',
            "not a service-account key",
        ),
        (
            '{"project_id": "p", "client_email": "x@y", "private_key": "SECRET", '
            '"token_uri": "http://example.com/token"}',
            "must use https",
        ),
    ],
)
def test_unusable_credentials_stop_the_start_without_showing_the_key(
    tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "credentials.json"
    if content is not None:
        path.write_text(content)

    with pytest.raises(FcmConfigurationError, match=message) as raised:
        load_service_account(path)

    assert "SECRET" not in str(raised.value)
    assert raised.value.__cause__ is None


@pytest.mark.parametrize(
    ("status", "payload", "headers", "expected"),
    [
        (200, {"name": "projects/p/messages/1"}, {}, ProviderAnswer.accepted()),
        (502, None, {}, ProviderAnswer.transient("fcm 502")),  # an HTML page from a proxy
        (504, None, {"Retry-After": "3"}, ProviderAnswer.transient("fcm 504", 3.0)),
        (413, None, {}, ProviderAnswer(Verdict.REJECTED, "fcm 413")),
        (
            400,
            {
                "error": {
                    "code": 400,
                    "message": "The registration token is not a valid FCM registration token",
                    "status": "INVALID_ARGUMENT",
                }
            },
            {},
            ProviderAnswer(Verdict.TOKEN_INVALID, "fcm 400 INVALID_ARGUMENT token"),
        ),
        (
            400,
            {"error": {"code": 400, "message": "free text; with spaces", "status": "bad value!"}},
            {},
            ProviderAnswer(Verdict.REJECTED, "fcm 400"),  # free text never reaches a reason
        ),
        (302, None, {}, ProviderAnswer.transient("fcm unexpected status 302")),
    ],
)
def test_classify(
    status: int, payload: object, headers: dict[str, str], expected: ProviderAnswer
) -> None:
    assert classify(status, payload, CIMultiDict(headers)) == expected


def test_retry_after_forms() -> None:
    assert parse_retry_after("12") == 12.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    assert (parse_retry_after("Fri, 01 Jan 2100 00:00:00 GMT") or 0) > 3500
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


async def test_no_token_and_no_push_text_reaches_the_logs(
    provider: FcmProvider, fcm: FakeFcm, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    job = push_job()
    await provider.send(job)
    fcm.revoke_tokens()
    await provider.send(job)
    fcm.fail(DEVICE_TOKEN, 404, "UNREGISTERED", times=1)
    await provider.send(job)

    text = "\n".join(record.getMessage() for record in caplog.records)
    assert "fcm.access_token_fetched why=first expires_in=3600" in text
    assert "fcm.access_token_fetched why=refused expires_in=3600" in text
    for secret in (DEVICE_TOKEN, "ya29.", "eyJ", job.title, job.body, "PRIVATE KEY"):
        assert secret not in text
