"""A local SMTP server for tests: aiosmtpd on 127.0.0.1, in its own thread, with scripted replies.

```python
smtp = FakeSmtp()
smtp.start()                              # smtp.host, smtp.port
smtp.reply("bob@example.test", 451, times=1)   # first RCPT for bob: 451, then accepted
smtp.reply("eve@example.test", 550)            # every RCPT for eve: 550
smtp.drop("dan@example.test", times=1)         # connection dropped in the middle of DATA
smtp.reply("noreply@example.test", 553, stage="mail")  # MAIL FROM of this sender: 553
smtp.refuse_greeting(554, "5.7.1 blocked", times=1)    # the next session greeted with 554
...
smtp.received                             # list[EmailMessage], policy=email.policy.default
smtp.connections                          # SMTP sessions opened by clients so far
smtp.noops                                # NOOP commands received
smtp.close_connections()                  # the server drops every open session (idle timeout)
smtp.stop()
```

A scripted reply is given at RCPT (the default) or at DATA, for one recipient address, or at MAIL
for one sender address, `times` times or for ever; a 421 at RCPT also closes the connection, as
real servers do. A refused greeting (a 5xx or 421 instead of 220) closes the session after it.

It speaks real SMTP (EHLO, optional AUTH PLAIN/LOGIN, MAIL, RCPT, DATA), so a client sees the
same replies and errors as from a real server. Used by unit, integration and end-to-end tests; in
the latter the e-mail sender runs as a separate process and reaches it over TCP.
"""

from __future__ import annotations

import asyncio
import email.policy
import threading
import time
from dataclasses import dataclass
from email.message import EmailMessage
from email.parser import BytesParser
from types import TracebackType
from typing import Any, Literal

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

Stage = Literal["mail", "rcpt", "data"]

# A scripted "reply" with this code closes the connection instead of answering.
DROP = 0
# The scripts' key of the greeting (no address is empty).
_GREETING = ""


@dataclass
class _Script:
    stage: Stage | Literal["greeting"]
    code: int
    text: str
    remaining: int | None  # None: for ever


class _CountingSmtp(SMTP):
    """aiosmtpd's session, reporting its connection's start and end to the fake."""

    def __init__(self, fake: FakeSmtp, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fake = fake

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.fake._opened(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self.transport is not None:
            self.fake._closed(self.transport)
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        greeting = self.fake._take(_GREETING, "greeting")
        if greeting is None:
            await super()._handle_client()
            return
        # What a server that refuses this client says instead of its 220, then it hangs up.
        await self.push(f"{greeting.code} {greeting.text}")
        if self.transport is not None:
            self.transport.close()


class _FreePortController(Controller):
    """aiosmtpd's threaded controller, listening on a port the OS picks (it wants a fixed one)."""

    def __init__(self, fake: FakeSmtp, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fake = fake

    def factory(self) -> SMTP:
        return _CountingSmtp(self.fake, self.handler, **self.SMTP_kwargs)

    def _create_server(self) -> Any:
        async def create() -> asyncio.AbstractServer:
            server = await self.loop.create_server(
                self._factory_invoker, host=self.hostname, port=0, ssl=self.ssl_context
            )
            self.port = server.sockets[0].getsockname()[1]
            return server

        return create()


class _Handler:
    def __init__(self, fake: FakeSmtp) -> None:
        self.fake = fake

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, mail_options: list[str]
    ) -> str:
        script = self.fake._take(address, "mail")
        if script is not None:
            return f"{script.code} {script.text}"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        script = self.fake._take(address, "rcpt")
        if script is not None:
            if script.code == 421:  # "closing transmission channel": say it, then close
                await server.push(f"421 {script.text}")
                server.transport.close()
                return "421 closed"  # never reaches the client
            return f"{script.code} {script.text}"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_NOOP(self, server: Any, session: Any, envelope: Any, arg: str) -> str:
        with self.fake._lock:
            self.fake.noops += 1
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        for recipient in envelope.rcpt_tos:
            script = self.fake._take(recipient, "data")
            if script is None:
                continue
            if script.code == DROP:
                server.transport.abort()
                return "421 connection dropped"  # never reaches the client
            return f"{script.code} {script.text}"
        content = envelope.original_content or envelope.content
        message = BytesParser(policy=email.policy.default).parsebytes(content)
        assert isinstance(message, EmailMessage)
        self.fake._record(message, envelope.mail_from, list(envelope.rcpt_tos), peer=session.peer)
        return "250 Message accepted for delivery"


class FakeSmtp:
    """An SMTP server on 127.0.0.1:<free port>; see the module docstring.

    With `username` and `password` it offers AUTH (without TLS: a test server) and answers
    wrong credentials with 535.
    """

    def __init__(self, *, username: str | None = None, password: str | None = None) -> None:
        self.host = "127.0.0.1"
        self.port = 0
        self.received: list[EmailMessage] = []
        # (MAIL FROM, RCPT TOs) of every accepted message, and when it was accepted (wall clock,
        # seconds since the epoch), in the order of `received`.
        self.envelopes: list[tuple[str, list[str]]] = []
        self.received_at: list[float] = []
        self._credentials = (
            (username.encode(), password.encode())
            if username is not None and password is not None
            else None
        )
        # SMTP sessions clients opened, and NOOPs received, since `start`.
        self.connections = 0
        self.noops = 0
        self._lock = threading.Lock()
        self._scripts: dict[str, list[_Script]] = {}
        self._open: set[asyncio.BaseTransport] = set()
        self._controller: _FreePortController | None = None

    def start(self) -> None:
        if self._controller is not None:
            raise RuntimeError("FakeSmtp already started")
        options: dict[str, Any] = {"enable_SMTPUTF8": True, "server_hostname": "fake-smtp.test"}
        if self._credentials is not None:
            options.update(authenticator=self._authenticate, auth_require_tls=False)
        controller = _FreePortController(self, _Handler(self), hostname=self.host, **options)
        controller.start()
        self._controller = controller
        self.port = controller.port
        with self._lock:  # `start` itself connects once, to check the server answers
            self.connections = 0

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._open)

    def close_connections(self) -> None:
        """Drop every open session, as a server does with idle ones."""
        controller = self._controller
        if controller is None:
            return
        with self._lock:
            transports = list(self._open)
        for transport in transports:
            controller.loop.call_soon_threadsafe(transport.close)

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def __enter__(self) -> FakeSmtp:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def reply(
        self,
        recipient: str,
        code: int,
        text: str = "Scripted reply",
        *,
        times: int | None = None,
        stage: Stage = "rcpt",
    ) -> None:
        """Answer `code text` to `recipient`'s RCPT (or, with stage="data", to the DATA of a
        message for it; with stage="mail", `recipient` is a sender, answered at its MAIL FROM),
        `times` times or for ever; scripts of one address apply in order."""
        if times is not None and times < 1:
            raise ValueError("times must be at least 1")
        with self._lock:
            self._scripts.setdefault(recipient.lower(), []).append(
                _Script(stage=stage, code=code, text=text, remaining=times)
            )

    def refuse_greeting(
        self, code: int, text: str = "Scripted greeting", *, times: int | None = None
    ) -> None:
        """Greet the next sessions (`times` of them, or all) with `code text` instead of 220, and
        close them."""
        if times is not None and times < 1:
            raise ValueError("times must be at least 1")
        with self._lock:
            self._scripts.setdefault(_GREETING, []).append(
                _Script(stage="greeting", code=code, text=text, remaining=times)
            )

    def drop(self, recipient: str, *, times: int | None = None) -> None:
        """Close the connection in the middle of DATA of a message for `recipient`."""
        self.reply(recipient, DROP, "", times=times, stage="data")

    def forget(self) -> None:
        """Drop what was received so far (a test's setup: what follows is the test's own)."""
        with self._lock:
            self.received.clear()
            self.envelopes.clear()
            self.received_at.clear()

    def messages_to(self, address: str) -> list[EmailMessage]:
        with self._lock:
            return [
                message
                for message, (_, recipients) in zip(self.received, self.envelopes, strict=True)
                if address.lower() in (recipient.lower() for recipient in recipients)
            ]

    def _take(self, recipient: str, stage: Stage | Literal["greeting"]) -> _Script | None:
        with self._lock:
            scripts = self._scripts.get(recipient.lower(), [])
            for index, script in enumerate(scripts):
                if script.stage != stage:
                    continue
                if script.remaining is not None:
                    script.remaining -= 1
                    if script.remaining == 0:
                        del scripts[index]
                return script
        return None

    def _opened(self, transport: asyncio.BaseTransport) -> None:
        with self._lock:
            self.connections += 1
            self._open.add(transport)

    def _closed(self, transport: asyncio.BaseTransport) -> None:
        with self._lock:
            self._open.discard(transport)

    def _record(
        self,
        message: EmailMessage,
        mail_from: str,
        recipients: list[str],
        *,
        peer: Any = None,  # the client's (host, port)
    ) -> None:
        with self._lock:
            self.envelopes.append((mail_from, recipients))
            self.received.append(message)
            self.received_at.append(time.time())

    def _authenticate(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        ok = (
            isinstance(auth_data, LoginPassword)
            and (auth_data.login, auth_data.password) == self._credentials
        )
        return AuthResult(success=ok, handled=False)
