"""The real-time stream, `GET /users/me/events`: Server-Sent Events carrying the new messages of
the user's rooms and their authors' edits and deletes, the user's invitations, their read
markers (for their other devices) and their notification inbox's items as they change, resumable
with `Last-Event-ID` on any replica, and the presence that the open streams imply.

Where the events come from. Every message and every invitation is already a row of the outbox,
committed with it; the inbox items that changed together get a row too, written already
published (the relay never sends it: only the streams read it), which each user's streams get
their own part of. Each replica tails the outbox with one reader,
however many streams it holds, and hands each row to the streams of the users it concerns. An
event's id is its row's position: the id of the transaction that wrote it, then the row's `seq`.
The reader takes rows only below the oldest transaction of the database still running, so no row
can ever appear behind one already read: the ids a stream sends only grow, and `Last-Event-ID`
names a point before which the client has everything. A resume is therefore exact, on whichever
replica the client reconnects to (the outbox is the same database), for as long as the outbox
keeps its rows (`OUTBOX_RETENTION`, a day by default). On SQLite (the zero-setup mode) one
writer at a time makes `seq` alone commit order.

Who gets what. A new message goes to its author and the recipients its event lists (the room's
members, those who blocked the author aside); an edit or a delete, whose event lists no one, to
the same people as the room is when the row is read (`repository.room_audiences`): someone who
left the room since is told nothing more of it.

Why not a queue per replica bound on the exchange, the usual fan-out: each replica would see the
events in its own order, so an id handed out by one would mean nothing to another, and an event
committed late could arrive behind one already sent, so a resume would skip it. Tailing the
outbox gives one order to every replica, keeps streams flowing while RabbitMQ is down, and needs
no broker permission the service does not already have. The cost is a poll per replica every
`STREAM_POLL_INTERVAL` (0.1 s) while at least one stream is open, on an index.

Presence. A user with a stream open is online; every `STREAM_HEARTBEAT` (15 s) each stream gets
a comment line (which also tells a dead client apart: the write fails) and the replica publishes
one `PresenceChanged` renewing all its streams for `PRESENCE_TTL` (45 s). A stream that ends says
so at once; a replica that dies says nothing, and its streams expire in the router's projection.
The room in view is per user, set by the stream's `active_room_id` parameter or by `PUT
/users/me/presence` through any replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Annotated, Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import Field, TypeAdapter, ValidationError
from sqlalchemy.ext.asyncio import AsyncEngine

from herald_shared.events import (
    MAX_ITEMS_PER_EVENT,
    ConnectionPresence,
    InboxItem,
    InboxItemsUpdated,
    InvitationCreated,
    MessageCreated,
    MessageDeleted,
    MessageEdited,
    PresenceChanged,
    RoomInView,
    RoomRead,
    chunks,
    utc_now,
)
from herald_shared.retry import describe_error
from message_service import repository
from message_service.repository import StreamPosition, StreamRow

logger = logging.getLogger("message_service.stream")

Streamed = (
    MessageCreated
    | MessageEdited
    | MessageDeleted
    | InvitationCreated
    | RoomRead
    | InboxItemsUpdated
)
_STREAMED: TypeAdapter[Streamed] = TypeAdapter(Annotated[Streamed, Field(discriminator="type")])
# Per (room, author): whom an edit or a delete of a message there goes to.
RoomAudiences = Mapping[tuple[uuid.UUID, uuid.UUID], frozenset[uuid.UUID]]
# What a stream's client may not have fetched yet before a stream is cut: past this many frames
# waiting, the stream ends and the client resumes from its `Last-Event-ID` (from the database).
MAX_QUEUED_FRAMES = 1000
HEARTBEAT = b": heartbeat\n\n"
# How long a client waits before reconnecting (the SSE `retry` field), in milliseconds.
RECONNECT_MS = 2000

PublishPresence = Callable[[PresenceChanged], Awaitable[None]]


class InvalidPosition(ValueError):
    pass


# Both numbers are PostgreSQL bigints (a 64-bit transaction id, an outbox `seq`; SQLite's integers
# are as wide): a larger one would fail as a query parameter.
_POSITION_MAX = 2**63 - 1


def parse_position(text: str) -> StreamPosition:
    """A `Last-Event-ID` as this service writes them: `<transaction>-<seq>`."""
    xid, separator, seq = text.strip().partition("-")
    # ASCII digits only: `str.isdigit()` also takes others ("²") that `int()` refuses.
    if (
        not separator
        or not (xid.isascii() and xid.isdigit())
        or not (seq.isascii() and seq.isdigit())
        or len(text) > 40
    ):
        raise InvalidPosition("Last-Event-ID is not an event id of this stream")
    position = StreamPosition(int(xid), int(seq))
    if position.xid > _POSITION_MAX or position.seq > _POSITION_MAX:
        raise InvalidPosition("Last-Event-ID is not an event id of this stream")
    return position


def format_position(position: StreamPosition) -> str:
    return f"{position.xid}-{position.seq}"


@dataclass(frozen=True)
class StreamEvent:
    """One row of the outbox as the streams carry it, with the users it is for."""

    position: StreamPosition
    # The SSE event name: "message", "message_edited", "message_deleted", "invitation", "read".
    name: str
    audience: frozenset[uuid.UUID]
    data: str  # JSON, one line

    def frame(self) -> bytes:
        return (
            f"id: {format_position(self.position)}\nevent: {self.name}\ndata: {self.data}\n\n"
        ).encode()


async def stream_events(
    engine: AsyncEngine, rows: Sequence[StreamRow], *, for_users: Collection[uuid.UUID]
) -> list[StreamEvent]:
    """The events of outbox rows for the streams of `for_users`, in their order; the audiences
    of edits and deletes, and the unread counts the inbox's events carry, are looked up in one
    go (rows that do not parse are left out: the relay dead-letters those)."""
    parsed = [(row.position, event) for row in rows if (event := _parse(row)) is not None]
    audiences = await repository.room_audiences(
        engine,
        authors=(
            (event.room_id, event.sender_id)
            for _, event in parsed
            if isinstance(event, MessageEdited | MessageDeleted)
        ),
    )
    badged = {
        user_id for _, event in parsed for user_id in _badged_users(event) if user_id in for_users
    }
    unread = await repository.unread_by_user(engine, badged)
    events: list[StreamEvent] = []
    for position, event in parsed:
        if isinstance(event, InboxItemsUpdated):
            events.extend(inbox_stream_events(position, event, unread))
        else:
            events.append(stream_event(position, event, audiences, unread))
    return events


def _badged_users(event: Streamed) -> set[uuid.UUID]:
    """Whose unread counts the event's stream event carries."""
    if isinstance(event, InboxItemsUpdated):
        return {item.user_id for item in event.items}
    if isinstance(event, RoomRead):
        return {event.user_id}
    return set()


def _unread(counts: Mapping[uuid.UUID, int], rooms: Iterable[uuid.UUID]) -> dict[str, Any]:
    """What a stream event says of the user's unread messages: in total (the app's badge) and in
    each of `rooms`."""
    return {
        "total": sum(counts.values()),
        "rooms": {str(room_id): counts.get(room_id, 0) for room_id in dict.fromkeys(rooms)},
    }


def inbox_stream_events(
    position: StreamPosition,
    event: InboxItemsUpdated,
    unread: Mapping[uuid.UUID, Mapping[uuid.UUID, int]],
) -> list[StreamEvent]:
    """One `notifications` event per user of the items that `unread` has counts for (each user
    sees only theirs; all share the row's position, and a stream gets at most one of them),
    with the user's unread messages now: in total (the app's badge) and in each room of the
    items."""
    by_user: dict[uuid.UUID, list[InboxItem]] = {}
    for item in event.items:
        if item.user_id in unread:
            by_user.setdefault(item.user_id, []).append(item)
    return [
        StreamEvent(
            position=position,
            name="notifications",
            audience=frozenset((user_id,)),
            data=_json(
                {
                    "items": [_inbox_item(item) for item in items],
                    "unread": _unread(unread[user_id], (item.room_id for item in items)),
                }
            ),
        )
        for user_id, items in by_user.items()
    ]


def _inbox_item(item: InboxItem) -> dict[str, Any]:
    return {
        "message_id": item.message_id,
        "room_id": item.room_id,
        "trigger": item.trigger,
        "created_at": (item.message_created_at or item.decided_at).isoformat(),
        "decided_at": item.decided_at.isoformat(),
        "deliveries": [delivery.model_dump(mode="json") for delivery in item.deliveries],
    }


def _parse(row: StreamRow) -> Streamed | None:
    try:
        return _STREAMED.validate_json(row.payload)
    except ValidationError:
        return None


def stream_event(
    position: StreamPosition,
    event: MessageCreated | MessageEdited | MessageDeleted | InvitationCreated | RoomRead,
    audiences: RoomAudiences,
    unread: Mapping[uuid.UUID, Mapping[uuid.UUID, int]] | None = None,
) -> StreamEvent:
    """The event of an outbox row, shaped like the REST API's own objects (a message like an
    item of `GET /rooms/{id}/messages`, an edit like the part of it that changed, an invitation
    like one of `GET /rooms`, a read marker like `PUT /rooms/{id}/read`'s answer), with whom it
    is for (for an edit or a delete, from `audiences`)."""
    if isinstance(event, RoomRead):
        # The user's other devices follow: the room's unread count is 0 up to there, and the
        # badge what is left (as it is when the stream reads the row).
        read: dict[str, Any] = {"room_id": event.room_id, "up_to": event.message_id}
        if unread is not None and event.user_id in unread:
            read["unread"] = _unread(unread[event.user_id], (event.room_id,))
        return StreamEvent(
            position=position,
            name="read",
            audience=frozenset((event.user_id,)),
            data=_json(read),
        )
    if isinstance(event, MessageCreated):
        return StreamEvent(
            position=position,
            name="message",
            audience=frozenset((event.sender_id, *event.recipient_ids)),
            data=_json(
                {
                    "id": event.message_id,
                    "room_id": event.room_id,
                    "sender_id": event.sender_id,
                    "content": event.message_content,
                    "created_at": event.timestamp.isoformat(),
                    "edited_at": None,
                }
            ),
        )
    if isinstance(event, MessageEdited):
        return StreamEvent(
            position=position,
            name="message_edited",
            audience=audiences.get((event.room_id, event.sender_id), frozenset()),
            data=_json(
                {
                    "id": event.message_id,
                    "room_id": event.room_id,
                    "content": event.message_content,
                    "edited_at": event.edited_at.isoformat(),
                }
            ),
        )
    if isinstance(event, MessageDeleted):
        return StreamEvent(
            position=position,
            name="message_deleted",
            audience=audiences.get((event.room_id, event.sender_id), frozenset()),
            data=_json({"id": event.message_id, "room_id": event.room_id}),
        )
    return StreamEvent(
        position=position,
        name="invitation",
        audience=frozenset((event.invitee_id,)),
        data=_json(
            {
                "room_id": event.room_id,
                "name": event.room_name,
                "invited_by": event.inviter.user_id,
                "invited_at": event.timestamp.isoformat(),
            }
        ),
    )


def _json(value: dict[str, Any]) -> str:
    return json.dumps(value, default=str, ensure_ascii=False, separators=(",", ":"))


@dataclass(eq=False)
class Stream:
    """One open `GET /users/me/events`: what it has been sent up to, and its frames to send."""

    user_id: uuid.UUID
    last: StreamPosition  # the newest position sent (or that the client said it had)
    # The session that opened it: when that ends (signed out, expired), so does the stream.
    session_id: uuid.UUID | None = None
    id: uuid.UUID = field(default_factory=uuid.uuid4)
    frames: asyncio.Queue[bytes | None] = field(default_factory=asyncio.Queue)
    # While the stream catches up from the database, what the tail brings waits here.
    catching_up: bool = False
    held: list[StreamEvent] = field(default_factory=list)
    ended: bool = False

    def offer(self, event: StreamEvent) -> bool:
        """Queue the event unless it was sent already; False when the client is too far
        behind (the stream must end)."""
        if self.ended:
            return True
        if self.catching_up:
            self.held.append(event)
            return len(self.held) <= MAX_QUEUED_FRAMES
        if event.position <= self.last:
            return True
        self.last = event.position
        self.frames.put_nowait(event.frame())
        return self.frames.qsize() <= MAX_QUEUED_FRAMES

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            self.frames.put_nowait(None)


class StreamMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.open = Gauge(
            "herald_streams_open", "Real-time streams open on this replica.", registry=registry
        )
        self.events = Counter(
            "herald_stream_events_total",
            "Events sent on real-time streams, by kind.",
            ["kind"],
            registry=registry,
        )
        self.presence_failures = Counter(
            "herald_presence_publish_failures_total",
            "Presence updates that could not be published (the next heartbeat repeats them).",
            registry=registry,
        )


class StreamHub:
    """This replica's streams, the outbox reader that feeds them, and their heartbeats."""

    def __init__(
        self,
        *,
        engine: AsyncEngine,
        publish_presence: PublishPresence,
        metrics: StreamMetrics,
        poll_interval: float,
        heartbeat: float,
        presence_ttl: float,
        batch_size: int = 500,
    ) -> None:
        self._engine = engine
        self._publish_presence = publish_presence
        self._metrics = metrics
        self._poll_interval = poll_interval
        self._heartbeat = heartbeat
        self._presence_ttl = timedelta(seconds=presence_ttl)
        self._batch_size = batch_size
        self._by_user: dict[uuid.UUID, set[Stream]] = {}
        # The position up to which the outbox was read; None while no stream is open.
        self._head: StreamPosition | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._tail(), name="stream-tail"),
            asyncio.create_task(self._beat(), name="stream-heartbeat"),
        ]

    async def stop(self) -> None:
        self.end_all()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    def end_all(self) -> None:
        """End every stream (the server is shutting down: its clients reconnect elsewhere)."""
        for streams in list(self._by_user.values()):
            for stream in list(streams):
                stream.end()

    @property
    def open_streams(self) -> int:
        return sum(len(streams) for streams in self._by_user.values())

    # --- streams ------------------------------------------------------------------------------

    async def open(
        self,
        user_id: uuid.UUID,
        *,
        after: StreamPosition | None,
        active_room_id: uuid.UUID | None,
        session_id: uuid.UUID | None = None,
    ) -> Stream:
        """A new stream for the user: from `after` (a `Last-Event-ID`), caught up from the
        database, or from now; it ends at the first heartbeat after `session_id` ended."""
        head = await self._current_head()
        stream = Stream(
            user_id=user_id, last=after if after is not None else head, session_id=session_id
        )
        # Registered before catching up: what the tail reads meanwhile is held, then sent after.
        stream.catching_up = after is not None and after < head
        self._by_user.setdefault(user_id, set()).add(stream)
        self._metrics.open.set(self.open_streams)
        now = utc_now()
        self._spawn(
            PresenceChanged(
                connections=[self._alive(stream)],
                rooms=[RoomInView(user_id=user_id, room_id=active_room_id, at=now)],
            )
        )
        if stream.catching_up:
            try:
                await self._catch_up(stream, until=head)
            except BaseException:
                self.close(stream)
                raise
        return stream

    async def _current_head(self) -> StreamPosition:
        """Where the tail reads from; at first, the newest position. Two streams opening at once
        both ask for that: the first answer stands, since the tail may have read on from it
        meanwhile (a later, newer answer would skip the rows in between for good)."""
        if self._head is None:
            head = await repository.stream_head(self._engine)
            if self._head is None:
                self._head = head
                return head
        return self._head

    async def _catch_up(self, stream: Stream, *, until: StreamPosition) -> None:
        position = stream.last
        while True:
            rows = await repository.stream_rows(
                self._engine, after=position, until=until, limit=self._batch_size
            )
            for event in await stream_events(self._engine, rows, for_users={stream.user_id}):
                if stream.user_id in event.audience:
                    stream.frames.put_nowait(event.frame())
                    stream.last = event.position
                    self._metrics.events.labels(event.name).inc()
                    if stream.frames.qsize() >= MAX_QUEUED_FRAMES:
                        # As for a live stream too far behind: what is queued goes out, then the
                        # stream ends, and the client goes on from its last id when it
                        # reconnects. Catching up never holds more than a stream may queue.
                        logger.info(
                            "message_service.stream.too_far_behind connection_id=%s", stream.id
                        )
                        stream.catching_up = False
                        stream.held = []
                        stream.end()
                        return
            if len(rows) < self._batch_size:
                break
            position = rows[-1].position
        stream.last = max(stream.last, until)
        stream.catching_up = False
        held, stream.held = stream.held, []
        for event in held:
            stream.offer(event)

    def close(self, stream: Stream) -> None:
        """Forget the stream and say the user's connection ended. Not a coroutine: it runs as a
        cancelled request unwinds, where nothing may be awaited."""
        streams = self._by_user.get(stream.user_id)
        if streams is None or stream not in streams:
            return
        streams.discard(stream)
        if not streams:
            del self._by_user[stream.user_id]
        self._metrics.open.set(self.open_streams)
        now = utc_now()
        self._spawn(
            PresenceChanged(
                connections=[
                    ConnectionPresence(
                        user_id=stream.user_id, connection_id=stream.id, expires_at=now, at=now
                    )
                ]
            )
        )

    async def frames(self, stream: Stream) -> AsyncIterator[bytes]:
        """The stream's bytes: the reconnect delay, then its frames until it ends."""
        yield f"retry: {RECONNECT_MS}\n\n".encode()
        while True:
            frame = await stream.frames.get()
            if frame is None:
                return
            yield frame

    # --- presence -----------------------------------------------------------------------------

    async def set_room_in_view(self, user_id: uuid.UUID, room_id: uuid.UUID | None) -> None:
        await self._publish(
            PresenceChanged(rooms=[RoomInView(user_id=user_id, room_id=room_id, at=utc_now())])
        )

    def _alive(self, stream: Stream) -> ConnectionPresence:
        now = utc_now()
        return ConnectionPresence(
            user_id=stream.user_id,
            connection_id=stream.id,
            expires_at=now + self._presence_ttl,
            at=now,
        )

    def _spawn(self, event: PresenceChanged) -> None:
        task = asyncio.create_task(self._publish(event))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _publish(self, event: PresenceChanged) -> None:
        try:
            await self._publish_presence(event)
        except Exception as exc:
            # Presence is renewed every heartbeat: a lost update heals within one.
            self._metrics.presence_failures.inc()
            logger.warning("message_service.presence.publish_failed error=%s", describe_error(exc))

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self._heartbeat)
            streams = [stream for group in self._by_user.values() for stream in group]
            streams = await self._end_signed_out(streams)
            for stream in streams:
                if not stream.ended:
                    stream.frames.put_nowait(HEARTBEAT)
            for part in chunks([self._alive(stream) for stream in streams], MAX_ITEMS_PER_EVENT):
                await self._publish(PresenceChanged(connections=list(part)))

    async def _end_signed_out(self, streams: list[Stream]) -> list[Stream]:
        """End the streams whose session ended (signed out on any replica, or expired): one
        query per heartbeat for all of them. The others, to keep alive; all of them when the
        database cannot say (a stream is not cut for an outage)."""
        sessions = {stream.session_id for stream in streams if stream.session_id is not None}
        if not sessions:
            return streams
        try:
            live = await repository.live_sessions(self._engine, sessions, now=utc_now())
        except Exception as exc:
            logger.warning(
                "message_service.stream.session_check_failed error=%s", describe_error(exc)
            )
            return streams
        kept = []
        for stream in streams:
            if stream.session_id is None or stream.session_id in live:
                kept.append(stream)
            else:
                stream.end()
        return kept

    # --- the outbox reader --------------------------------------------------------------------

    async def _tail(self) -> None:
        while True:
            if not self._by_user:
                self._head = None
                await asyncio.sleep(self._poll_interval)
                continue
            try:
                read = await self._read_once()
            except Exception as exc:
                logger.warning("message_service.stream.read_failed error=%s", describe_error(exc))
                await asyncio.sleep(max(self._poll_interval, 1.0))
                continue
            if read < self._batch_size:
                await asyncio.sleep(self._poll_interval)

    async def _read_once(self) -> int:
        head = await self._current_head()
        rows = await repository.stream_rows(self._engine, after=head, limit=self._batch_size)
        if rows:
            # Read whole before the head moves: a failure reads the same rows again.
            events = await stream_events(self._engine, rows, for_users=self._by_user.keys())
            self._head = rows[-1].position
            self._dispatch(events)
        return len(rows)

    def _dispatch(self, events: Iterable[StreamEvent]) -> None:
        for event in events:
            for user_id in event.audience:
                for stream in list(self._by_user.get(user_id, ())):
                    if not stream.offer(event):
                        logger.info(
                            "message_service.stream.too_far_behind connection_id=%s", stream.id
                        )
                        stream.end()
                    else:
                        self._metrics.events.labels(event.name).inc()
