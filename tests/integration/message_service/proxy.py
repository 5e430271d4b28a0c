"""A TCP proxy in front of RabbitMQ that a test can cut and restore, to play a broker outage
without touching the machine's server, or whose answers it can hold back, to play a broker that
answers late."""

from __future__ import annotations

import asyncio
import contextlib

from tests.support.processes import free_port


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.BaseTransport] = set()
        self._answering = asyncio.Event()
        self._answering.set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def cut(self) -> None:
        """Refuse new connections and reset the open ones, as a dead broker would."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for transport in list(self._transports):
            if isinstance(transport, asyncio.WriteTransport):
                transport.abort()
        self._transports.clear()

    async def restore(self) -> None:
        await self.start()

    def hold_answers(self) -> None:
        """Keep what the server sends from the client (it still gets what the client sends)
        until `release_answers`."""
        self._answering.clear()

    def release_answers(self) -> None:
        self._answering.set()

    async def _serve(
        self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter
    ) -> None:
        try:
            upstream_reader, upstream = await asyncio.open_connection(*self.target)
        except OSError:
            client.transport.abort()
            return
        pair = {client.transport, upstream.transport}
        self._transports |= pair
        try:
            await asyncio.gather(
                self._pipe(client_reader, upstream),
                self._pipe(upstream_reader, client, gate=self._answering),
            )
        finally:
            self._transports -= pair

    @staticmethod
    async def _pipe(
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        gate: asyncio.Event | None = None,
    ) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                if gate is not None:
                    await gate.wait()
                writer.write(data)
                await writer.drain()
        writer.transport.abort()
