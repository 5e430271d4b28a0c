"""What message-service consumes: `device_invalidations`, `inbox_updates` and `email_bounces`.

Handlers only parse (FastStream does it from the annotation), call a use case and return; a
failure raises and the shared retry middleware decides (see `herald_shared.retry`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from faststream.rabbit import RabbitBroker
from faststream.rabbit.subscriber import RabbitSubscriber
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from herald_shared.events import DeviceInvalidated, EmailBounced, InboxItemsUpdated
from herald_shared.topology import DEVICE_INVALIDATIONS, EMAIL_BOUNCES, EXCHANGE, INBOX_UPDATES
from message_service import repository, service
from message_service.outbox import Nudge, session_scope

if TYPE_CHECKING:
    from unittest.mock import MagicMock

logger = logging.getLogger("message_service.handlers")


class Recorded(Protocol):
    """A registered handler, as tests see it: the in-memory broker records its calls."""

    @property
    def mock(self) -> MagicMock: ...


@dataclass(frozen=True)
class HandlerDeps:
    sessions: async_sessionmaker[AsyncSession]
    nudge: Nudge
    # Hard bounces after which an address is unverified (`EMAIL_BOUNCE_LIMIT`).
    email_bounce_limit: int = 3


@dataclass(frozen=True)
class Subscribers:
    """The subscriber (for AsyncAPI and health) and its handler (whose `mock` tests inspect)."""

    device_invalidations: RabbitSubscriber
    on_device_invalidated: Recorded
    inbox_updates: RabbitSubscriber
    on_inbox_updated: Recorded
    email_bounces: RabbitSubscriber
    on_email_bounced: Recorded


def register_handlers(broker: RabbitBroker, deps: HandlerDeps) -> Subscribers:
    subscriber = broker.subscriber(
        DEVICE_INVALIDATIONS.queue,
        EXCHANGE,
        title=f"{DEVICE_INVALIDATIONS.name}:consume",
        description=(
            "A push provider said a token is dead: remove that device of that user (a no-op "
            "if it is already gone) and publish the user's new snapshot."
        ),
    )

    @subscriber
    async def on_device_invalidated(event: DeviceInvalidated) -> None:
        async with session_scope(deps.sessions, deps.nudge) as session:
            removed = await service.remove_invalidated_device(
                session=session, user_id=event.user_id, device_id=event.device_id
            )
        logger.info(
            "message_service.device.invalidated event_id=%s user_id=%s device_id=%s removed=%s",
            event.event_id,
            event.user_id,
            event.device_id,
            removed,
        )

    inbox_updates = broker.subscriber(
        INBOX_UPDATES.queue,
        EXCHANGE,
        title=f"{INBOX_UPDATES.name}:consume",
        description=(
            "The router's latest view of users' inbox items: keep, per item, the highest "
            "version (a replayed or late event changes nothing)."
        ),
    )

    @inbox_updates
    async def on_inbox_updated(event: InboxItemsUpdated) -> None:
        async with deps.sessions() as session, session.begin():
            changed = await repository.apply_inbox_items(session, event)
        logger.debug(
            "message_service.inbox.updated version=%d items=%d changed=%d",
            event.version,
            len(event.items),
            changed,
        )

    email_bounces = broker.subscriber(
        EMAIL_BOUNCES.queue,
        EXCHANGE,
        title=f"{EMAIL_BOUNCES.name}:consume",
        description=(
            "The mail server refused a notification e-mail for good: count it against the "
            "user's address (once per notification, only while it is the address that "
            "bounced); at EMAIL_BOUNCE_LIMIT the address is unverified and the user's new "
            "snapshot published."
        ),
    )

    @email_bounces
    async def on_email_bounced(event: EmailBounced) -> None:
        async with session_scope(deps.sessions, deps.nudge) as session:
            unverified = await service.record_email_bounce(
                session=session, event=event, bounce_limit=deps.email_bounce_limit
            )
        logger.info(
            "message_service.email.bounced event_id=%s user_id=%s notification_id=%s unverified=%s",
            event.event_id,
            event.user_id,
            event.notification_id,
            unverified,
        )

    return Subscribers(
        device_invalidations=subscriber,
        on_device_invalidated=on_device_invalidated,
        inbox_updates=inbox_updates,
        on_inbox_updated=on_inbox_updated,
        email_bounces=email_bounces,
        on_email_bounced=on_email_bounced,
    )
