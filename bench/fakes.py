"""Lean local provider servers for the benchmark: FCM HTTP v1 and SMTP on 127.0.0.1, in a process
of their own, recording when they accepted each delivery.

`tests/fakes/` holds the full fakes (uvicorn + Starlette, aiosmtpd, scripted failures). Under
benchmark load a uvicorn/Starlette request costs several times what the push-sender spends on it,
and running the fakes as threads of the load generator would let the GIL couple their latency to
the load generator's, so the benchmark uses these: a bare `asyncio.Protocol` HTTP/1.1 server and
SMTP server in a separate process, whose CPU the benchmark measures like any other process.

They still speak the real protocols, enough for the real clients to be unable to tell:

* `POST /token`: the JWT-bearer grant, the assertion's RS256 signature checked against the key of
  the credentials file this process wrote; answers an access token.
* `POST /v1/projects/{project}/messages:send`: wants that bearer token and the project, checks the
  body with `tests.fakes.fcm.message_violations` (what real FCM refuses), answers
  `{"name": ...}` or an FCM v1 error.
* SMTP: EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT (no AUTH, no STARTTLS).

`--fcm-latency SECONDS` and `--fcm-concurrency N` make FCM behave like a provider under load: each
`messages:send` takes that long, at most N are processed at once, and further ones wait at the
server, in arrival order, for a free place (requests on one connection are answered in order, as
HTTP/1.1 wants). A request received whole is sent even if its client gives up waiting and closes
the connection (as a provider would: the client cannot take it back), so a client-side timeout
followed by a retry shows as a repeat. Without them every request is answered at once, with no
task per request.

Each accepted delivery is one line in a record file (`push.tsv`, `email.tsv`), flushed every
100 ms, so the benchmark can follow progress while the run goes on (a push is recorded when its
answer is written, after any latency):

    push.tsv    accepted_at <TAB> notification_id <TAB> message_id <TAB> device_token
    email.tsv   accepted_at <TAB> Message-ID <TAB> recipient[,recipient…]

`python -m bench.fakes --dir DIR` prints one JSON line (ports, credentials file) once it listens,
and stops cleanly on SIGTERM, leaving `stats.json` (requests, connections, the most requests in
progress and waiting at once) in DIR.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import json
import secrets
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, cast
from urllib.parse import parse_qs

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.fakes.fcm import JWT_BEARER_GRANT, SCOPE, message_violations

PROJECT_ID = "herald-bench"
HOST = "127.0.0.1"
FLUSH_INTERVAL = 0.1
MAX_REQUEST_BYTES = 1 << 20
MAX_DATA_BYTES = 10 << 20
SEND_PATH = f"/v1/projects/{PROJECT_ID}/messages:send"
REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found"}
NOT_FOUND = {"error": {"code": 404, "message": "Not found", "status": "NOT_FOUND"}}


@dataclass(frozen=True)
class Endpoints:
    """What the benchmark needs to point the senders at these servers."""

    fcm_base_url: str
    smtp_host: str
    smtp_port: int
    credentials_file: str


class RecordFile:
    """Append-only record lines, written in batches (one write per flush, not per delivery)."""

    def __init__(self, path: Path) -> None:
        self._file: IO[str] = path.open("a", encoding="utf-8")
        self._pending: list[str] = []

    def add(self, *fields: str) -> None:
        self._pending.append("\t".join(fields) + "\n")

    def flush(self) -> None:
        if self._pending:
            self._file.write("".join(self._pending))
            self._pending.clear()
            self._file.flush()

    def close(self) -> None:
        self.flush()
        self._file.close()


# --- FCM ----------------------------------------------------------------------------------------


@dataclass
class FcmStats:
    """What the FCM server saw, for the report (`stats.json`)."""

    latency_seconds: float = 0.0
    concurrency: int = 0  # 0: unbounded
    connections: int = 0
    send_requests: int = 0
    token_requests: int = 0
    max_in_progress: int = 0
    max_waiting: int = 0


class FcmState:
    def __init__(self, records: RecordFile, latency: float = 0.0, concurrency: int = 0) -> None:
        self.records = records
        self.latency = latency
        self.slots = asyncio.Semaphore(concurrency) if concurrency > 0 else None
        self.stats = FcmStats(latency_seconds=latency, concurrency=concurrency)
        self.in_progress = 0
        self.waiting = 0
        # Set once the port is known (the credentials file names the token endpoint).
        self.public_key: rsa.RSAPublicKey | None = None
        self.client_email = ""
        self.token_uri = ""
        self.issued: set[str] = set()
        self.ids = itertools.count(1)

    @property
    def slow(self) -> bool:
        """Whether sends take time (and so a task each) rather than being answered at once."""
        return self.latency > 0 or self.slots is not None

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Any:
        """(status, JSON document) for one request."""
        if method != "POST":
            return 404, NOT_FOUND
        if path == "/token":
            self.stats.token_requests += 1
            return self._token(body)
        if path == SEND_PATH:
            self.stats.send_requests += 1
            return self._send(headers, body)
        return 404, NOT_FOUND

    async def handle_slowly(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> Any:
        """`handle`, a send after waiting for a free place and then `latency` seconds."""
        if path != SEND_PATH:
            return self.handle(method, path, headers, body)
        self.waiting += 1
        self.stats.max_waiting = max(self.stats.max_waiting, self.waiting)
        async with self.slots or contextlib.nullcontext():
            self.waiting -= 1
            self.in_progress += 1
            self.stats.max_in_progress = max(self.stats.max_in_progress, self.in_progress)
            try:
                if self.latency > 0:
                    await asyncio.sleep(self.latency)
                return self.handle(method, path, headers, body)
            finally:
                self.in_progress -= 1

    def _token(self, body: bytes) -> tuple[int, dict[str, Any]]:
        form = parse_qs(body.decode(errors="replace"))
        if form.get("grant_type") != [JWT_BEARER_GRANT]:
            return 400, {"error": "unsupported_grant_type"}
        if self.public_key is None:
            return 400, {"error": "invalid_grant"}
        try:
            claims = jwt.decode(
                form.get("assertion", [""])[0],
                self.public_key,
                algorithms=["RS256"],
                audience=self.token_uri,
                issuer=self.client_email,
                options={"require": ["iss", "aud", "iat", "exp"]},
            )
        except jwt.PyJWTError:
            return 400, {"error": "invalid_grant"}
        if SCOPE not in str(claims.get("scope", "")).split():
            return 400, {"error": "invalid_scope"}
        token = f"ya29.bench-{secrets.token_urlsafe(24)}"
        self.issued.add(token)
        return 200, {"access_token": token, "expires_in": 3600, "token_type": "Bearer"}

    def _send(self, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, Any] | bytes]:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or token not in self.issued:
            return 401, _fcm_error(401, "UNAUTHENTICATED", "Request had invalid credentials.")
        try:
            document = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return 400, _fcm_error(400, "INVALID_ARGUMENT", "Invalid JSON payload received.")
        if message_violations(document):
            return 400, _fcm_error(400, "INVALID_ARGUMENT", "Request contains an invalid argument.")
        message = document["message"]
        data = message.get("data") or {}
        notification_id = data.get("notification_id") or message.get("android", {}).get(
            "collapse_key", ""
        )
        self.records.add(
            f"{time.time():.6f}",
            notification_id,
            data.get("message_id", ""),
            message.get("token", ""),
        )
        # The answer's JSON, written out: the one answer of nearly every request.
        return 200, b'{"name": "projects/%s/messages/%d"}' % (PROJECT_ID.encode(), next(self.ids))


def _fcm_error(code: int, status: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "status": status}}


class HttpProtocol(asyncio.Protocol):
    """HTTP/1.1 with keep-alive and Content-Length bodies: what aiohttp and httpx send."""

    def __init__(self, state: FcmState) -> None:
        self.state = state
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        # Slow mode: requests of this connection waiting for their turn, and who answers them.
        self.queue: collections.deque[tuple[str, str, dict[str, str], bytes]] = collections.deque()
        self.worker: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a TCP server's transport
        self.state.stats.connections += 1

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.transport is not None:
            head_end = self.buffer.find(b"\r\n\r\n")
            if head_end < 0:
                if len(self.buffer) > MAX_REQUEST_BYTES:
                    self.transport.close()
                return
            lines = self.buffer[:head_end].decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers: dict[str, str] = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
            if length > MAX_REQUEST_BYTES:
                self.transport.close()
                return
            end = head_end + 4 + length
            if len(self.buffer) < end:
                return
            body = bytes(self.buffer[head_end + 4 : end])
            del self.buffer[:end]
            path = target.split("?", 1)[0]
            if self.state.slow:
                self.queue.append((method, path, headers, body))
                if self.worker is None:
                    self.worker = asyncio.get_running_loop().create_task(self._answer_in_turn())
            else:
                status, document = self.state.handle(method, path, headers, body)
                self._respond(status, document, headers)

    async def _answer_in_turn(self) -> None:
        while self.queue and self.transport is not None:
            method, path, headers, body = self.queue.popleft()
            status, document = await self.state.handle_slowly(method, path, headers, body)
            self._respond(status, document, headers)
        self.worker = None

    def _respond(self, status: int, document: Any, headers: dict[str, str]) -> None:
        """`document`: a JSON-able value, or its JSON already encoded (bytes)."""
        if self.transport is None:
            return
        payload = document if isinstance(document, bytes) else json.dumps(document).encode()
        close = headers.get("connection", "").lower() == "close"
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json; charset=UTF-8\r\n"
            b"content-length: %d\r\nconnection: %s\r\n\r\n%s"
            % (
                status,
                REASONS.get(status, "Error").encode(),
                len(payload),
                b"close" if close else b"keep-alive",
                payload,
            )
        )
        if close:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.queue.clear()


# --- SMTP ---------------------------------------------------------------------------------------


def message_id_of(data: bytes) -> str:
    """The Message-ID header of a message (headers end at the first empty line)."""
    head = data.split(b"\r\n\r\n", 1)[0]
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"message-id":
            return value.strip().decode(errors="replace")
    return ""


class SmtpProtocol(asyncio.Protocol):
    def __init__(self, records: RecordFile) -> None:
        self.records = records
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.in_data = False
        self.recipients: list[str] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a TCP server's transport
        self.transport.write(b"220 bench-smtp.test ESMTP ready\r\n")

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.transport is not None:
            if self.in_data:
                end = self.buffer.find(b"\r\n.\r\n")
                if end < 0:
                    if len(self.buffer) > MAX_DATA_BYTES:
                        self._reply("552 message too big")
                        self.transport.close()
                    return
                content = bytes(self.buffer[:end])
                del self.buffer[: end + 5]
                self.in_data = False
                self.records.add(
                    f"{time.time():.6f}", message_id_of(content), ",".join(self.recipients)
                )
                self.recipients = []
                self._reply("250 OK queued")
                continue
            end = self.buffer.find(b"\r\n")
            if end < 0:
                return
            line = bytes(self.buffer[:end]).decode("utf-8", errors="replace")
            del self.buffer[: end + 2]
            self._command(line)

    def _command(self, line: str) -> None:
        verb = line[:4].upper()
        if verb == "EHLO":
            self._reply("250-bench-smtp.test\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 SIZE 10485760")
        elif verb == "HELO":
            self._reply("250 bench-smtp.test")
        elif verb == "MAIL":
            self.recipients = []
            self._reply("250 OK")
        elif verb == "RCPT":
            address = line.partition(":")[2].strip().split(" ", 1)[0].strip("<>")
            self.recipients.append(address.lower())
            self._reply("250 OK")
        elif verb == "DATA":
            if not self.recipients:
                self._reply("503 need RCPT first")
            else:
                self.in_data = True
                self._reply("354 end data with <CR><LF>.<CR><LF>")
        elif verb == "RSET":
            self.recipients = []
            self._reply("250 OK")
        elif verb == "NOOP":
            self._reply("250 OK")
        elif verb == "QUIT":
            self._reply("221 bye")
            if self.transport is not None:
                self.transport.close()
        else:
            self._reply("502 command not implemented")

    def _reply(self, text: str) -> None:
        if self.transport is not None:
            self.transport.write(text.encode() + b"\r\n")

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


# --- process ------------------------------------------------------------------------------------


def write_credentials(path: Path, token_uri: str) -> tuple[rsa.RSAPublicKey, str]:
    """A service-account file with a fresh key; returns (public key, client email)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    email = f"push-sender@{PROJECT_ID}.iam.gserviceaccount.com"
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    document = {
        "type": "service_account",
        "project_id": PROJECT_ID,
        "private_key_id": secrets.token_hex(20),
        "private_key": pem,
        "client_email": email,
        "client_id": str(secrets.randbelow(10**20)),
        "token_uri": token_uri,
    }
    path.touch(mode=0o600)
    path.write_text(json.dumps(document))
    return key.public_key(), email


async def serve(directory: Path, *, fcm_latency: float = 0.0, fcm_concurrency: int = 0) -> None:
    push_records = RecordFile(directory / "push.tsv")
    email_records = RecordFile(directory / "email.tsv")
    credentials = directory / "fcm-service-account.json"
    fcm = FcmState(push_records, latency=fcm_latency, concurrency=fcm_concurrency)

    loop = asyncio.get_running_loop()
    http_server = await loop.create_server(lambda: HttpProtocol(fcm), HOST, 0)
    smtp_server = await loop.create_server(lambda: SmtpProtocol(email_records), HOST, 0)
    http_port = http_server.sockets[0].getsockname()[1]
    smtp_port = smtp_server.sockets[0].getsockname()[1]
    fcm.token_uri = f"http://{HOST}:{http_port}/token"
    fcm.public_key, fcm.client_email = write_credentials(credentials, fcm.token_uri)

    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    endpoints = Endpoints(f"http://{HOST}:{http_port}", HOST, smtp_port, str(credentials))
    sys.stdout.write(json.dumps(endpoints.__dict__) + "\n")
    sys.stdout.flush()
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), FLUSH_INTERVAL)
        push_records.flush()
        email_records.flush()
    http_server.close()
    smtp_server.close()
    push_records.close()
    email_records.close()
    (directory / "stats.json").write_text(json.dumps({"fcm": asdict(fcm.stats)}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--dir", type=Path, required=True, help="where the record files go")
    parser.add_argument(
        "--fcm-latency", type=float, default=0.0, help="seconds each FCM send takes (default 0)"
    )
    parser.add_argument(
        "--fcm-concurrency",
        type=int,
        default=0,
        help="FCM sends processed at once at most, further ones wait (default 0: unbounded)",
    )
    args = parser.parse_args()
    directory: Path = args.dir
    directory.mkdir(parents=True, exist_ok=True)
    asyncio.run(
        serve(directory, fcm_latency=args.fcm_latency, fcm_concurrency=args.fcm_concurrency)
    )


if __name__ == "__main__":
    main()
