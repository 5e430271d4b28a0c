"""The HTTP/1.1 client under FCM's provider, against bare TCP servers that answer as scripted:
what it writes, how it reads each way of ending a body, when it reuses or drops a connection,
and what it refuses (the provider's own tests cover timeouts, hang-ups and the body limit)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from push_sender.providers.http1 import (
    BadResponse,
    ConnectFailed,
    Http1Client,
    ServerDisconnected,
)
from tests.support.infra import wait_until
from tests.support.processes import free_port

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Server:
    """A TCP server on 127.0.0.1 that runs `handler` per connection and counts connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.url = ""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                await self.handler(reader, writer)
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[Server]:
    server = Server(handler)
    listener = await asyncio.start_server(server._serve, "127.0.0.1", 0)
    server.url = f"http://127.0.0.1:{listener.sockets[0].getsockname()[1]}"
    try:
        yield server
    finally:
        listener.close()


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head, await reader.readexactly(length)


def answer(status: str, body: bytes, *extra: str) -> bytes:
    head = [f"HTTP/1.1 {status}", f"content-length: {len(body)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def keep_answering(reply: bytes) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(reply)
            await writer.drain()

    return handler


@pytest.fixture
async def client() -> AsyncIterator[Http1Client]:
    http = Http1Client(timeout=2.0, max_connections=4, body_limit=1024, user_agent="test-agent")
    yield http
    await http.aclose()


async def test_a_post_is_one_request_with_a_length_and_the_given_headers(
    client: Http1Client,
) -> None:
    requests: list[tuple[bytes, bytes]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests.append(await read_request(reader))
        writer.write(answer("200 OK", b'{"ok": true}', "Retry-After: 3"))
        await writer.drain()
        await reader.read()

    async with serving(handler) as server:
        response = await client.post(
            f"{server.url}/v1/send?x=1", data=b'{"a":1}', headers={"Authorization": "Bearer t"}
        )

    assert (response.status, response.body, response.truncated) == (200, b'{"ok": true}', False)
    assert response.headers["retry-after"] == "3"
    head, body = requests[0]
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /v1/send?x=1 HTTP/1.1"
    assert f"host: {server.url.removeprefix('http://')}" in lines
    assert {"user-agent: test-agent", "authorization: Bearer t", "content-length: 7"} <= set(lines)
    assert body == b'{"a":1}'


async def test_a_mapping_is_sent_as_a_form(client: Http1Client) -> None:
    requests: list[tuple[bytes, bytes]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests.append(await read_request(reader))
        writer.write(answer("200 OK", b"{}"))
        await reader.read()

    async with serving(handler) as server:
        await client.post(server.url, data={"grant_type": "a b", "x": "&"}, headers={})

    head, body = requests[0]
    assert b"content-type: application/x-www-form-urlencoded" in head
    assert body == b"grant_type=a+b&x=%26"


async def test_one_connection_serves_request_after_request(client: Http1Client) -> None:
    async with serving(keep_answering(answer("200 OK", b"{}"))) as server:
        for _ in range(3):
            assert (await client.post(server.url, data=b"{}", headers={})).status == 200

    assert server.connections == 1


async def test_concurrent_requests_use_separate_connections_up_to_the_limit(
    client: Http1Client,
) -> None:
    release = asyncio.Event()
    in_flight = 0
    most_in_flight = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal in_flight, most_in_flight
        while True:
            await read_request(reader)
            in_flight += 1
            most_in_flight = max(most_in_flight, in_flight)
            await release.wait()
            in_flight -= 1
            writer.write(answer("200 OK", b"{}"))
            await writer.drain()

    async with serving(handler) as server:
        sends = [
            asyncio.create_task(client.post(server.url, data=b"{}", headers={})) for _ in range(6)
        ]

        async def four_waiting() -> bool:
            return in_flight == 4

        await wait_until(four_waiting, timeout=5)
        release.set()
        responses = await asyncio.gather(*sends)

    assert [response.status for response in responses] == [200] * 6
    assert most_in_flight == 4  # the client's limit; the other two waited for a connection
    assert server.connections == 4


async def test_chunked_and_close_delimited_bodies_are_read_whole(client: Http1Client) -> None:
    chunked = b"HTTP/1.1 503 Service Unavailable\r\ntransfer-encoding: chunked\r\n\r\n"
    chunked += b'5\r\n{"a":\r\n2\r\n1}\r\n0\r\n\r\n'
    until_close = b'HTTP/1.1 500 Internal Server Error\r\nconnection: close\r\n\r\n{"b":2}'

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(chunked)
        await read_request(reader)  # the same connection: a chunked body has an end
        writer.write(until_close)
        await writer.drain()

    async with serving(handler) as server:
        first = await client.post(server.url, data=b"{}", headers={})
        second = await client.post(server.url, data=b"{}", headers={})

    assert (first.status, first.body) == (503, b'{"a":1}')
    assert (second.status, second.body) == (500, b'{"b":2}')
    assert server.connections == 1


async def test_a_100_continue_sent_apart_is_skipped_for_the_final_answer(
    client: Http1Client,
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)  # the final answer in a later read of its own
            writer.write(answer("200 OK", b'{"name": "m"}'))
            await writer.drain()

    async with serving(handler) as server:
        first = await client.post(server.url, data=b"{}", headers={})
        second = await client.post(server.url, data=b"{}", headers={})

    assert (first.status, first.body) == (200, b'{"name": "m"}')
    assert (second.status, second.body) == (200, b'{"name": "m"}')
    assert server.connections == 1


async def test_a_103_in_the_same_packet_leaves_the_final_answer_its_own_headers(
    client: Http1Client,
) -> None:
    hints = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
    final = answer("200 OK", b'{"name": "m"}', "Retry-After: 3")

    async with serving(keep_answering(hints + final)) as server:
        first = await client.post(server.url, data=b"{}", headers={})
        second = await client.post(server.url, data=b"{}", headers={})

    for response in (first, second):
        assert (response.status, response.body) == (200, b'{"name": "m"}')
        assert dict(response.headers) == {"content-length": "13", "retry-after": "3"}
    assert server.connections == 1  # reused after the interim answer


async def test_a_hang_up_after_an_interim_answer_is_a_disconnect(client: Http1Client) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()

    async with serving(handler) as server:
        with pytest.raises(ServerDisconnected):
            await client.post(server.url, data=b"{}", headers={})


async def test_a_switch_of_protocols_is_a_bad_response(client: Http1Client) -> None:
    switch = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n"

    async with serving(keep_answering(switch)) as server:
        with pytest.raises(BadResponse):
            await client.post(server.url, data=b"{}", headers={})


async def test_an_answer_saying_connection_close_is_not_reused(client: Http1Client) -> None:
    async with serving(keep_answering(answer("200 OK", b"{}", "Connection: close"))) as server:
        await client.post(server.url, data=b"{}", headers={})
        await client.post(server.url, data=b"{}", headers={})

    assert server.connections == 2


async def test_a_connection_the_server_closed_while_idle_is_replaced(client: Http1Client) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer("200 OK", b"{}"))
        await writer.drain()  # then closes: an idle keep-alive connection the server ends

    async with serving(handler) as server:
        await client.post(server.url, data=b"{}", headers={})

        async def pooled_connection_closed() -> bool:
            return not any(c.reusable() for idle in client._idle.values() for c in idle)

        await wait_until(pooled_connection_closed, timeout=5)
        second = await client.post(server.url, data=b"{}", headers={})

    assert second.status == 200
    assert server.connections == 2


async def test_bytes_that_are_not_http_are_a_bad_response(client: Http1Client) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
        await reader.read()

    async with serving(handler) as server:
        with pytest.raises(BadResponse):
            await client.post(server.url, data=b"{}", headers={})


async def test_a_close_in_the_middle_of_a_body_is_a_disconnect(client: Http1Client) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n{}")
        await writer.drain()

    async with serving(handler) as server:
        with pytest.raises(ServerDisconnected):
            await client.post(server.url, data=b"{}", headers={})


async def test_a_refused_connection_fails_to_connect(client: Http1Client) -> None:
    with pytest.raises(ConnectFailed):
        await client.post(f"http://127.0.0.1:{free_port()}/", data=b"{}", headers={})


@pytest.mark.parametrize("value", ["token\r\nx-injected: 1", "token\nx", "tok\0en"])
async def test_a_header_with_a_line_break_is_refused_before_anything_is_sent(
    client: Http1Client, value: str
) -> None:
    async with serving(keep_answering(answer("200 OK", b"{}"))) as server:
        with pytest.raises(ValueError, match="line break"):
            await client.post(server.url, data=b"{}", headers={"authorization": value})

    assert server.connections == 0


async def test_only_http_urls_are_requested(client: Http1Client) -> None:
    with pytest.raises(ValueError, match="http"):
        await client.post("ftp://127.0.0.1/x", data=b"", headers={})
