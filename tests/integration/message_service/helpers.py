"""Helpers for message-service's integration tests (imported by tests; never a conftest)."""

from __future__ import annotations

from typing import Any

import aio_pika
from sqlmodel import col, select

from herald_shared.broker import RabbitSettings
from message_service.app import MessageService
from message_service.models import OutboxEvent
from message_service.settings import Settings


def settings_for(pg_url: str, rabbit_url: str, **overrides: Any) -> Settings:
    rabbitmq = RabbitSettings(url=rabbit_url, publish_timeout=2.0, retry_delays=(0.2,))
    values: dict[str, Any] = {
        "outbox_relay_interval": 0.1,
        "outbox_max_backoff": 0.5,
        **overrides,
    }
    return Settings(database_url=pg_url, rabbitmq=rabbitmq, **values)


async def drain(rabbit_url: str, queue_name: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    connection = await aio_pika.connect(rabbit_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(queue_name)
        messages = []
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            messages.append(message)
        return messages


async def pending(runtime: MessageService) -> list[OutboxEvent]:
    async with runtime.sessions() as session:
        statement = (
            select(OutboxEvent)
            .where(col(OutboxEvent.published_at).is_(None))
            .order_by(col(OutboxEvent.seq))
        )
        return list((await session.exec(statement)).all())


async def nothing_pending(runtime: MessageService) -> bool:
    return not await pending(runtime)
