"""The RabbitMQ topology, declared once and imported by every service.

One durable topic exchange carries every event. Each consumer owns one quorum queue per concern,
bound to exactly the routing keys it needs plus its own retry key. Around each consumer queue:

* wait queues `<queue>.wait.<ms>ms` (one per delay tier) that hold a message for a fixed TTL and
  then dead-letter it back to the main exchange with the queue's retry key, so only that queue
  sees the retry;
* a dead-letter queue `<queue>.dlq` holding what could not be processed, for inspection and
  replay.

A consumer's own failures go through `notifications.delay`, a topic exchange, with the target
queue's name as routing key (a wait queue for a retry, the dead-letter queue for a dead letter):
RabbitMQ checks topic permissions on topic exchanges only, so each service's user may reach its
own wait and dead-letter queues there and nobody else's. What RabbitMQ dead-letters by itself
(a reject, the delivery limit) goes through the work queue's `x-dead-letter-exchange`,
`notifications.dlx` (direct, by the origin queue's name), which needs no user permission.

Publisher and consumers import the same objects, so a name, a flag or an `x-` argument can never
differ between them (which RabbitMQ would refuse with PRECONDITION_FAILED).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from faststream.rabbit import ExchangeType, QueueType, RabbitExchange, RabbitQueue
from faststream.rabbit.publisher import RabbitPublisher
from faststream.rabbit.subscriber import RabbitSubscriber

from herald_shared.events import (
    DeliveriesReported,
    DeliveryBatchReported,
    DeliveryReported,
    DeviceInvalidated,
    EmailBatchRequested,
    EmailBounced,
    EmailJobsRequested,
    EmailRequested,
    EmailVerificationRequested,
    Event,
    InboxItemsUpdated,
    InvitationCreated,
    MessageCreated,
    MessageDeleted,
    MessageEdited,
    PresenceChanged,
    PushBatchRequested,
    PushJobsRequested,
    PushRequested,
    RoomLeft,
    RoomRead,
    UserUpdated,
)

if TYPE_CHECKING:
    from faststream.rabbit import RabbitBroker

# Routing keys: the specification's four, then new ones in the same <domain>.<entity>.<verb> shape.
MESSAGE_NEW = "notification.message.new"
MESSAGE_RETRY = "notification.message.retry"
PUSH_SEND = "notification.push.send"
PUSH_RETRY = "notification.push.retry"
EMAIL_SEND = "notification.email.send"
EMAIL_RETRY = "notification.email.retry"
# The urgent lane: jobs of DMs and personal mentions, on queues of their own, so a backlog of
# room chatter never holds them back (quorum queues have no priorities).
PUSH_SEND_URGENT = "notification.push.send.urgent"
PUSH_RETRY_URGENT = "notification.push.retry.urgent"
EMAIL_SEND_URGENT = "notification.email.send.urgent"
EMAIL_RETRY_URGENT = "notification.email.retry.urgent"
PUSH_DELIVERED = "notification.push.delivered"
PUSH_FAILED = "notification.push.failed"
EMAIL_DELIVERED = "notification.email.delivered"
EMAIL_FAILED = "notification.email.failed"
REPORT_RETRY = "notification.report.retry"
ROOM_INVITATION_CREATED = "room.invitation.created"
PRESENCE_CHANGED = "presence.changed"
PRESENCE_RETRY = "presence.changed.retry"
MESSAGE_UPDATED = "message.updated"
MESSAGE_DELETED = "message.deleted"
MESSAGE_CHANGED_RETRY = "message.changed.retry"
ROOM_READ = "room.read"
ROOM_LEFT = "room.left"
ROOM_READ_RETRY = "room.read.retry"
USER_UPDATED = "user.updated"
USER_RETRY = "user.updated.retry"
DEVICE_INVALIDATED = "device.invalidated"
DEVICE_RETRY = "device.invalidated.retry"
INBOX_UPDATED = "notification.inbox.updated"
INBOX_RETRY = "notification.inbox.retry"
# The mail that confirms an address (message-service → email-sender), and a notification e-mail
# the mail server refused for good (email-sender → message-service, which counts bounces).
EMAIL_VERIFY = "notification.email.verify"
EMAIL_VERIFY_RETRY = "notification.email.verify.retry"
EMAIL_BOUNCED = "email.bounced"
EMAIL_BOUNCED_RETRY = "email.bounced.retry"

EXCHANGE = RabbitExchange("notifications", type=ExchangeType.TOPIC, durable=True)
# RabbitMQ's own dead-lettering (rejects, the delivery limit), named by every work queue's
# `x-dead-letter-exchange`; routed by the origin queue's name. No service publishes to it.
DEAD_LETTER_EXCHANGE = RabbitExchange("notifications.dlx", type=ExchangeType.DIRECT, durable=True)
# Where consumers put a message to wait before its next attempt, or park what they cannot
# process; routed by the target queue's name (`<queue>.wait.<ms>ms` or `<queue>.dlq`). A topic
# exchange so that per-service topic permissions confine each service to its own queues (a
# direct one would let any writer reach every queue bound to it), and a dedicated one rather than
# the default exchange, so no service needs write access to amq.default. Not the former direct
# `notifications.retry`: re-declaring that name as a topic exchange would fail
# (PRECONDITION_FAILED) on a vhost that still has it.
RETRY_EXCHANGE = RabbitExchange("notifications.delay", type=ExchangeType.TOPIC, durable=True)

# Backstop for a message that kills its consumer before any outcome is recorded: after this many
# deliveries RabbitMQ dead-letters it with reason `delivery_limit`.
DELIVERY_LIMIT = 5


@dataclass(frozen=True)
class ConsumerQueue:
    """A work queue, the routing keys it binds and the key its retries come back on."""

    name: str
    routing_keys: tuple[str, ...]
    retry_routing_key: str

    @property
    def queue(self) -> RabbitQueue:
        """The FastStream queue object; subscribing binds it with its first routing key."""
        return RabbitQueue(
            self.name,
            queue_type=QueueType.QUORUM,
            durable=True,
            routing_key=self.routing_keys[0],
            arguments={
                "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE.name,
                "x-dead-letter-routing-key": self.name,
                "x-delivery-limit": DELIVERY_LIMIT,
            },
        )

    @property
    def bindings(self) -> tuple[str, ...]:
        return (*self.routing_keys, self.retry_routing_key)

    @property
    def dead_letter_queue(self) -> RabbitQueue:
        return RabbitQueue(
            f"{self.name}.dlq", queue_type=QueueType.QUORUM, durable=True, routing_key=self.name
        )

    def wait_queue(self, delay_seconds: float) -> RabbitQueue:
        delay_ms = round(delay_seconds * 1000)
        name = f"{self.name}.wait.{delay_ms}ms"
        return RabbitQueue(
            name,
            queue_type=QueueType.QUORUM,
            durable=True,
            routing_key=name,
            arguments={
                "x-message-ttl": delay_ms,
                "x-dead-letter-exchange": EXCHANGE.name,
                "x-dead-letter-routing-key": self.retry_routing_key,
            },
        )


# notification-router
# Invitations share the messages' queue: each is the one notification of a room its invitee is
# not in, decided by the same batches, ledger and lanes.
MESSAGE_NOTIFICATIONS = ConsumerQueue(
    "message_notifications", (MESSAGE_NEW, ROOM_INVITATION_CREATED), MESSAGE_RETRY
)
RECIPIENT_UPDATES = ConsumerQueue("recipient_updates", (USER_UPDATED,), USER_RETRY)
PRESENCE_UPDATES = ConsumerQueue("presence_updates", (PRESENCE_CHANGED,), PRESENCE_RETRY)
# A room left is the last word of the user on it, like a read marker's.
READ_MARKERS = ConsumerQueue("read_markers", (ROOM_READ, ROOM_LEFT), ROOM_READ_RETRY)
MESSAGE_CHANGES = ConsumerQueue(
    "message_changes", (MESSAGE_UPDATED, MESSAGE_DELETED), MESSAGE_CHANGED_RETRY
)
DELIVERY_REPORTS = ConsumerQueue(
    "delivery_reports",
    (PUSH_DELIVERED, PUSH_FAILED, EMAIL_DELIVERED, EMAIL_FAILED),
    REPORT_RETRY,
)
# push-sender and email-sender
PUSH_NOTIFICATIONS = ConsumerQueue("push_notifications", (PUSH_SEND,), PUSH_RETRY)
EMAIL_NOTIFICATIONS = ConsumerQueue("email_notifications", (EMAIL_SEND,), EMAIL_RETRY)
PUSH_NOTIFICATIONS_URGENT = ConsumerQueue(
    "push_notifications_urgent", (PUSH_SEND_URGENT,), PUSH_RETRY_URGENT
)
EMAIL_NOTIFICATIONS_URGENT = ConsumerQueue(
    "email_notifications_urgent", (EMAIL_SEND_URGENT,), EMAIL_RETRY_URGENT
)
# A queue of its own: a backlog of notification e-mails never holds back the mail a person
# waits for right after registering.
EMAIL_VERIFICATIONS = ConsumerQueue("email_verifications", (EMAIL_VERIFY,), EMAIL_VERIFY_RETRY)
# message-service
DEVICE_INVALIDATIONS = ConsumerQueue("device_invalidations", (DEVICE_INVALIDATED,), DEVICE_RETRY)
INBOX_UPDATES = ConsumerQueue("inbox_updates", (INBOX_UPDATED,), INBOX_RETRY)
EMAIL_BOUNCES = ConsumerQueue("email_bounces", (EMAIL_BOUNCED,), EMAIL_BOUNCED_RETRY)

CONSUMER_QUEUES: tuple[ConsumerQueue, ...] = (
    MESSAGE_NOTIFICATIONS,
    RECIPIENT_UPDATES,
    PRESENCE_UPDATES,
    READ_MARKERS,
    MESSAGE_CHANGES,
    DELIVERY_REPORTS,
    PUSH_NOTIFICATIONS,
    PUSH_NOTIFICATIONS_URGENT,
    EMAIL_NOTIFICATIONS,
    EMAIL_NOTIFICATIONS_URGENT,
    EMAIL_VERIFICATIONS,
    DEVICE_INVALIDATIONS,
    INBOX_UPDATES,
    EMAIL_BOUNCES,
)

_QUEUE_BY_ROUTING_KEY: dict[str, ConsumerQueue] = {
    key: queue for queue in CONSUMER_QUEUES for key in queue.bindings
}


def queue_for_routing_key(routing_key: str) -> ConsumerQueue | None:
    """The one consumer queue a routing key reaches (each key is bound by exactly one queue)."""
    return _QUEUE_BY_ROUTING_KEY.get(routing_key)


def queue_by_name(name: str) -> ConsumerQueue | None:
    return next((queue for queue in CONSUMER_QUEUES if queue.name == name), None)


def routing_key_for(event: Event) -> str:
    """The routing key an event is published with."""
    match event:
        case MessageCreated():
            return MESSAGE_NEW
        case InvitationCreated():
            return ROOM_INVITATION_CREATED
        case PresenceChanged():
            return PRESENCE_CHANGED
        case RoomRead():
            return ROOM_READ
        case RoomLeft():
            return ROOM_LEFT
        case MessageEdited():
            return MESSAGE_UPDATED
        case MessageDeleted():
            return MESSAGE_DELETED
        case UserUpdated():
            return USER_UPDATED
        case PushJobsRequested(urgent=True):
            return PUSH_SEND_URGENT
        case EmailJobsRequested(urgent=True):
            return EMAIL_SEND_URGENT
        case PushRequested() | PushBatchRequested() | PushJobsRequested():
            return PUSH_SEND
        case EmailRequested() | EmailBatchRequested() | EmailJobsRequested():
            return EMAIL_SEND
        case DeliveryReported() | DeliveryBatchReported() | DeliveriesReported():
            return f"notification.{event.channel}.{event.outcome}"
        case DeviceInvalidated():
            return DEVICE_INVALIDATED
        case InboxItemsUpdated():
            return INBOX_UPDATED
        case EmailVerificationRequested():
            return EMAIL_VERIFY
        case EmailBounced():
            return EMAIL_BOUNCED
    raise TypeError(f"no routing key for {type(event).__name__}")


_Declarable = TypeVar("_Declarable", RabbitQueue, RabbitExchange)


def existing(declarable: _Declarable) -> _Declarable:
    """The same queue or exchange with FastStream's `declare=False`: a passive declare, which
    only checks that it exists (and needs no configure permission), and no binding."""
    passive = copy.copy(declarable)
    passive.declare = False
    return passive


def use_existing_topology(broker: RabbitBroker) -> None:
    """Make every subscriber and publisher of `broker` check its queue or exchange instead of
    creating it (herald_shared.broker.HeraldBroker does this in passive mode, at start)."""
    for subscriber in broker.subscribers:
        if isinstance(subscriber, RabbitSubscriber):
            subscriber.queue = existing(subscriber.queue)
    for publisher in broker.publishers:
        if isinstance(publisher, RabbitPublisher) and publisher.exchange.name:
            publisher.exchange = existing(publisher.exchange)


def passive_scope(
    broker: RabbitBroker, queues: Iterable[ConsumerQueue] = CONSUMER_QUEUES
) -> tuple[tuple[RabbitExchange, ...], tuple[ConsumerQueue, ...]]:
    """What a service in passive mode checks: the exchanges it writes (`notifications` if it
    publishes there, `notifications.delay` if it consumes: its retries and dead letters go
    through it) and, of `queues`, those it consumes (each with its wait queues and dead-letter
    queue). Not `notifications.dlx`, which only RabbitMQ itself writes, nor other services'
    queues: from RabbitMQ 4.2.7 and 4.3.1 a passive declare needs some permission (configure,
    write or read) on the object, and a service's least-privilege user has none on those
    (deploy/rabbitmq/README.md, "Creating the topology")."""
    consumed = {
        subscriber.queue.name
        for subscriber in broker.subscribers
        if isinstance(subscriber, RabbitSubscriber)
    }
    publishes = any(
        isinstance(publisher, RabbitPublisher) and publisher.exchange.name == EXCHANGE.name
        for publisher in broker.publishers
    )
    own = tuple(queue for queue in queues if queue.name in consumed)
    exchanges = ((EXCHANGE,) if publishes else ()) + ((RETRY_EXCHANGE,) if own else ())
    return exchanges, own


async def declare_topology(
    broker: RabbitBroker,
    *,
    retry_delays: Sequence[float],
    queues: Iterable[ConsumerQueue] = CONSUMER_QUEUES,
) -> None:
    """Declare exchanges, work queues with all their bindings, wait queues and dead-letter queues.

    Idempotent. Every service runs it in `on_startup`, before its consumers start (it connects
    the broker itself), for the whole topology: a publisher then never finds a routing key
    unbound because its consumer has not started yet, and no consumer takes a message before
    the wait queues and dead-letter queues its failures need exist.

    With a broker in passive mode (RABBITMQ_DECLARE=passive) it only checks that what the
    service itself uses exists (`passive_scope`), so a service whose topology an admin step
    forgot fails at startup (NOT_FOUND) instead of at its first publish or retry.
    """
    # Here, not at the top: herald_shared.broker imports this module.
    from herald_shared.broker import HeraldBroker

    passive = isinstance(broker, HeraldBroker) and broker.declares_passively
    exchanges: tuple[RabbitExchange, ...] = (EXCHANGE, DEAD_LETTER_EXCHANGE, RETRY_EXCHANGE)
    if passive:
        exchanges, queues = passive_scope(broker, queues)

    def declarable(item: _Declarable) -> _Declarable:
        return existing(item) if passive else item

    async def bind(queue: Any, exchange: Any, routing_key: str) -> None:
        if not passive:  # binding needs permissions a service does not have
            await queue.bind(exchange, routing_key=routing_key)

    await broker.connect()  # idempotent; broker.start() reuses the connection
    checked = {item.name: await broker.declare_exchange(declarable(item)) for item in exchanges}
    # None for an exchange passive mode does not check: only `bind`, which skips, takes them.
    exchange = checked.get(EXCHANGE.name)
    dead_letter_exchange = checked.get(DEAD_LETTER_EXCHANGE.name)
    retry_exchange = checked.get(RETRY_EXCHANGE.name)
    for consumer_queue in queues:
        queue = await broker.declare_queue(declarable(consumer_queue.queue))
        for routing_key in consumer_queue.bindings:
            await bind(queue, exchange, routing_key)
        dead_letters = await broker.declare_queue(declarable(consumer_queue.dead_letter_queue))
        await bind(dead_letters, dead_letter_exchange, consumer_queue.name)
        await bind(dead_letters, retry_exchange, consumer_queue.dead_letter_queue.name)
        for delay in retry_delays:
            wait_queue = consumer_queue.wait_queue(delay)
            declared: Any = await broker.declare_queue(declarable(wait_queue))
            await bind(declared, retry_exchange, wait_queue.name)
