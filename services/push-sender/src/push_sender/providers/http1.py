"""A small HTTP/1.1 client for JSON APIs: POST only, kept-alive connections, no redirects.

FCM and Google's token endpoint need nothing more, and push-sender makes one request per push:
under load a third of its CPU went to aiohttp's general-purpose client (sessions, cookie jars,
tracing signals, payload objects, a stream reader per answer). Here a request is one write and
the answer is parsed by httptools (llhttp, the parser uvicorn uses) straight into a bytearray.

What it does:

* a pool per origin (scheme, host, port): at most `max_connections` requests at once in all, an
  idle connection reused for the next request to its origin and closed after `IDLE_TIMEOUT` or
  when the server closes it or answers `Connection: close`;
* `timeout` bounds the connect (TLS handshake included) and, from the moment the request is
  written, the whole answer; a wait for a free connection is not part of it (the caller's own
  deadline and in-flight limit bound that);
* no more than `body_limit` bytes of an answer's body are kept: a longer body is cut there,
  reported as `truncated`, and its connection closed instead of drained;
* TLS with the system's trust store and host name checks; no proxy, netrc or cookie is read,
  and a header name or value with CR, LF or NUL is refused (no request smuggling through a
  header that came from a server, such as an access token).

A request whose connection fails is never sent again here: a POST the server may have acted on
is the caller's decision (push-sender's ledger retries it with the same collapse id).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import defaultdict, deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlencode, urlsplit

import httptools

IDLE_TIMEOUT: Final = 15.0  # seconds an idle connection is kept (below servers' usual ~60 s)
_FORBIDDEN_IN_HEADERS: Final = ("\r", "\n", "\0")


class HttpError(Exception):
    """No whole answer came; the subclass says why (its name is what callers report)."""


class ConnectFailed(HttpError):
    """The connection could not be made: refused, unreachable, no such host, TLS failed."""


class ServerDisconnected(HttpError):
    """The server closed the connection before its answer was complete."""


class BadResponse(HttpError):
    """The server's bytes are not an HTTP/1.1 answer."""


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: Mapping[str, str]  # names in lower case; the last value of a repeated header
    body: bytes
    truncated: bool  # the body was longer than the client's limit and was cut there


@dataclass(frozen=True, slots=True)
class _Origin:
    tls: bool
    host: str
    port: int


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection, answering one request at a time (no pipelining)."""

    def __init__(self, body_limit: int) -> None:
        self._body_limit = body_limit
        self._transport: asyncio.Transport | None = None
        self._parser: httptools.HttpResponseParser | None = None
        self._answer: asyncio.Future[Response] | None = None
        self._headers: dict[str, str] = {}
        self._header_name = b""
        self._body = bytearray()
        self._headers_done = False
        self.closed = False
        self.idle_since = time.monotonic()

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # a stream transport, by create_connection

    def data_received(self, data: bytes) -> None:
        if self._parser is None:  # bytes nobody asked for: the connection is unusable
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self._fail(BadResponse("malformed HTTP answer"))
        except httptools.HttpParserUpgrade:
            self._fail(BadResponse("unexpected protocol upgrade"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._answer is not None and not self._answer.done():
            if self._headers_done and self._delimited_by_close():
                self._complete(truncated=False)  # a body without a length ends with the connection
            else:
                self._fail(ServerDisconnected("the server closed the connection"))

    # --- httptools callbacks ------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self._headers_done = True

    def on_body(self, body: bytes) -> None:
        room = self._body_limit - len(self._body)
        if len(body) > room:
            self._body += body[:room]
            self._complete(truncated=True)
            self.close()  # the rest is never read: the connection cannot serve another request
        else:
            self._body += body

    def on_message_complete(self) -> None:
        status = self._parser.get_status_code() if self._parser is not None else 0
        if status == 101:  # this client never asks to upgrade: a switch is not an answer
            self._fail(BadResponse("unexpected 101 Switching Protocols"))
        elif 100 <= status < 200:
            # An interim answer (100 Continue, 103 Early Hints...): llhttp reports it as a whole
            # message, but the final one follows on this connection, and RFC 9110 (15.2) has a
            # client skip any it did not expect. Drop what it brought, so a hang-up now is not
            # taken for its end and the final answer's headers start afresh (a new dict: none
            # of it is shared with a returned Response); the parser goes on by itself.
            self._headers = {}
            self._body = bytearray()
            self._headers_done = False
        else:
            self._complete(truncated=False)

    # --- the client's side --------------------------------------------------------------------

    async def request(self, data: bytes, timeout: float) -> Response:
        if self._transport is None or self.closed:
            raise ServerDisconnected("the connection is closed")
        loop = asyncio.get_running_loop()
        self._answer = answer = loop.create_future()
        self._parser = httptools.HttpResponseParser(self)
        self._headers = {}
        self._body = bytearray()
        self._headers_done = False
        self._transport.write(data)
        try:
            async with asyncio.timeout(timeout):
                response: Response = await answer
                return response
        except BaseException:
            # Timed out or cancelled with the answer unread: this connection is spoiled.
            self.close()
            raise
        finally:
            self._answer = None
            self._parser = None
            self.idle_since = time.monotonic()

    def reusable(self) -> bool:
        return not self.closed and time.monotonic() - self.idle_since < IDLE_TIMEOUT

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.close()

    def _complete(self, *, truncated: bool) -> None:
        answer, parser = self._answer, self._parser
        if answer is None or answer.done() or parser is None:
            return
        if not truncated and not parser.should_keep_alive():
            self.close()
        answer.set_result(
            Response(parser.get_status_code(), self._headers, bytes(self._body), truncated)
        )

    def _fail(self, error: HttpError) -> None:
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(error)
        self.close()

    def _delimited_by_close(self) -> bool:
        return (
            "content-length" not in self._headers
            and "chunked" not in self._headers.get("transfer-encoding", "").lower()
        )


class Http1Client:
    """POSTs over a pool of kept-alive HTTP/1.1 connections (see the module's docstring)."""

    def __init__(
        self, *, timeout: float, max_connections: int, body_limit: int, user_agent: str
    ) -> None:
        self._timeout = timeout
        self._body_limit = body_limit
        self._user_agent = user_agent
        self._max_connections = max_connections
        self._slots: asyncio.Semaphore | None = None  # made on first use, in the running loop
        self._idle: defaultdict[_Origin, deque[_Connection]] = defaultdict(deque)
        self._busy: set[_Connection] = set()
        self._tls: ssl.SSLContext | None = None
        self._closed = False

    async def post(
        self, url: str, *, data: bytes | Mapping[str, str], headers: Mapping[str, str]
    ) -> Response:
        """POST `data` (bytes as they are, a mapping as a form) and read the answer; raises
        `TimeoutError` or an `HttpError`."""
        if self._closed:
            raise RuntimeError("the HTTP client is closed")
        origin, request = self._build(url, data, headers)
        if self._slots is None:
            self._slots = asyncio.Semaphore(self._max_connections)
        async with self._slots:
            connection = await self._connection(origin)
            self._busy.add(connection)
            try:
                response = await connection.request(request, self._timeout)
            finally:
                self._busy.discard(connection)
            if connection.reusable() and not self._closed:
                self._idle[origin].append(connection)
            else:
                connection.close()
            return response

    async def aclose(self) -> None:
        self._closed = True
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()
        for connection in self._busy:
            connection.close()

    def _build(
        self, url: str, data: bytes | Mapping[str, str], headers: Mapping[str, str]
    ) -> tuple[_Origin, bytes]:
        parts = urlsplit(url)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise ValueError("only absolute http and https URLs can be requested")
        tls = parts.scheme == "https"
        origin = _Origin(tls, parts.hostname, parts.port or (443 if tls else 80))
        target = parts.path or "/"
        if parts.query:
            target += f"?{parts.query}"
        fields = {"host": parts.netloc.rpartition("@")[2], "user-agent": self._user_agent}
        if isinstance(data, bytes):
            body = data
        else:
            body = urlencode(data).encode()
            fields["content-type"] = "application/x-www-form-urlencoded"
        fields.update((name.lower(), value) for name, value in headers.items())
        fields["content-length"] = str(len(body))
        lines = [f"POST {target} HTTP/1.1"]
        for name, value in fields.items():
            if any(c in name or c in value for c in _FORBIDDEN_IN_HEADERS):
                raise ValueError(f"the {name!r} header holds a line break or NUL")
            lines.append(f"{name}: {value}")
        return origin, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

    async def _connection(self, origin: _Origin) -> _Connection:
        idle = self._idle[origin]
        while idle:
            connection = idle.pop()  # the most recently used: the least likely to be timed out
            if connection.reusable():
                return connection
            connection.close()
        loop = asyncio.get_running_loop()
        tls = self._tls_context() if origin.tls else None
        try:
            async with asyncio.timeout(self._timeout):
                _, connection = await loop.create_connection(
                    lambda: _Connection(self._body_limit),
                    origin.host,
                    origin.port,
                    ssl=tls,
                    server_hostname=origin.host if tls else None,
                )
        except (OSError, ssl.SSLError) as exc:  # refused, unreachable, DNS, certificate
            raise ConnectFailed(type(exc).__name__) from exc
        return connection

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls
