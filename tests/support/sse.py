"""A small Server-Sent Events client for the tests of `GET /users/me/events`: it reads the stream
in a task, parses it as the HTML standard says (fields, blank line dispatches, `:` comments),
and queues each event with the moment it arrived."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx


@dataclass(frozen=True)
class SseEvent:
    id: str | None
    event: str
    data: str
    received_at: float  # time.monotonic()

    def json(self) -> Any:
        return json.loads(self.data)


class SseClient:
    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        active_room_id: str | None = None,
        last_event_id: str | None = None,
    ) -> None:
        self._url = f"{base_url}/users/me/events"
        self._params = {"active_room_id": active_room_id} if active_room_id else {}
        self._headers = {"Authorization": f"Bearer {token}"}
        if last_event_id is not None:
            self._headers["Last-Event-ID"] = last_event_id
        self.events: asyncio.Queue[SseEvent] = asyncio.Queue()
        self.heartbeats = 0
        self.status: int | None = None
        self.ended = asyncio.Event()
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> SseClient:
        self._task = asyncio.create_task(self._read())
        connected = asyncio.create_task(self._connected.wait())
        ended = asyncio.create_task(self.ended.wait())
        await asyncio.wait({connected, ended}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        connected.cancel()
        ended.cancel()
        if self.status != 200:
            await self.close()
            raise AssertionError(f"the stream answered {self.status}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Drop the connection, as a client that goes away does."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def next(self, timeout: float = 5.0) -> SseEvent:
        async with asyncio.timeout(timeout):
            return await self.events.get()

    def pending(self) -> list[SseEvent]:
        """The events received and not taken yet."""
        taken = []
        while not self.events.empty():
            taken.append(self.events.get_nowait())
        return taken

    async def _read(self) -> None:
        try:
            async with (
                httpx.AsyncClient(timeout=httpx.Timeout(10, read=None)) as client,
                client.stream(
                    "GET", self._url, params=self._params, headers=self._headers
                ) as response,
            ):
                self.status = response.status_code
                if response.status_code != 200:
                    return
                self._connected.set()
                fields: dict[str, str] = {}
                data: list[str] = []
                async for line in response.aiter_lines():
                    if line == "":
                        if data:
                            self.events.put_nowait(
                                SseEvent(
                                    fields.get("id"),
                                    fields.get("event", "message"),
                                    "\n".join(data),
                                    time.monotonic(),
                                )
                            )
                        fields, data = {}, []
                    elif line.startswith(":"):
                        self.heartbeats += 1
                    else:
                        name, _, value = line.partition(":")
                        value = value.removeprefix(" ")
                        if name == "data":
                            data.append(value)
                        else:
                            fields[name] = value
        finally:
            self.ended.set()
