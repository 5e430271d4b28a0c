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

Each accepted delivery is one line in a record file (`push.tsv`, `email.tsv`), flushed every
100 ms, so the benchmark can follow progress while the run goes on:

    push.tsv    accepted_at <TAB> notification_id <TAB> message_id <TAB> device_token
    email.tsv   accepted_at <TAB> Message-ID <TAB> recipient[,recipient…]

`python -m bench.fakes --dir DIR` prints one JSON line (ports, credentials file) once it listens,
and stops cleanly on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import secrets
import signal
import sys
import time
from dataclasses import dataclass
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


class FcmState:
    def __init__(self, records: RecordFile) -> None:
        self.records = records
        # Set once the port is known (the credentials file names the token endpoint).
        self.public_key: rsa.RSAPublicKey | None = None
        self.client_email = ""
        self.token_uri = ""
        self.issued: set[str] = set()
        self.ids = itertools.count(1)

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Any:
        """(status, JSON document) for one request."""
        if method != "POST":
            return 404, {"error": {"code": 404, "message": "Not found", "status": "NOT_FOUND"}}
        if path == "/token":
            return self._token(body)
        if path == SEND_PATH:
            return self._send(headers, body)
        return 404, {"error": {"code": 404, "message": "Not found", "status": "NOT_FOUND"}}

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

    def _send(self, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, Any]]:
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
        return 200, {"name": f"projects/{PROJECT_ID}/messages/{next(self.ids)}"}


def _fcm_error(code: int, status: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "status": status}}


class HttpProtocol(asyncio.Protocol):
    """HTTP/1.1 with keep-alive and Content-Length bodies: what httpx sends."""

    def __init__(self, state: FcmState) -> None:
        self.state = state
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a TCP server's transport

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
            status, document = self.state.handle(method, target.split("?", 1)[0], headers, body)
            payload = json.dumps(document).encode()
            close = headers.get("connection", "").lower() == "close"
            self.transport.write(
                f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n"
                "content-type: application/json; charset=UTF-8\r\n"
                f"content-length: {len(payload)}\r\n"
                f"{'connection: close' if close else 'connection: keep-alive'}\r\n\r\n".encode()
                + payload
            )
            if close:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


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


async def serve(directory: Path) -> None:
    push_records = RecordFile(directory / "push.tsv")
    email_records = RecordFile(directory / "email.tsv")
    credentials = directory / "fcm-service-account.json"
    fcm = FcmState(push_records)

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--dir", type=Path, required=True, help="where the record files go")
    directory: Path = parser.parse_args().dir
    directory.mkdir(parents=True, exist_ok=True)
    asyncio.run(serve(directory))


if __name__ == "__main__":
    main()
