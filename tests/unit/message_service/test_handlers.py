"""The device_invalidations subscriber, through the in-memory broker."""

from __future__ import annotations

import uuid

import httpx

from herald_shared.events import DeviceInvalidated
from herald_shared.topology import DEVICE_INVALIDATED, EXCHANGE
from message_service.app import MessageService
from tests.unit.message_service.helpers import Account, register, user_updates


async def invalidate(runtime: MessageService, user_id: uuid.UUID, device_id: uuid.UUID) -> None:
    event = DeviceInvalidated(user_id=user_id, device_id=device_id, reason="UNREGISTERED")
    await runtime.broker.publish(event, exchange=EXCHANGE, routing_key=DEVICE_INVALIDATED)


async def devices(client: httpx.AsyncClient, account: Account) -> list[str]:
    response = await client.get("/users/me/devices", headers=account.headers)
    return [device["id"] for device in response.json()]


async def test_an_invalidated_device_is_removed_once(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice = await register(client, "alice")
    dead = await client.post(
        "/users/me/devices", json={"platform": "fcm", "token": "dead"}, headers=alice.headers
    )
    alive = await client.post(
        "/users/me/devices", json={"platform": "fcm", "token": "alive"}, headers=alice.headers
    )
    dead_id = uuid.UUID(dead.json()["id"])

    await invalidate(runtime, alice.id, dead_id)
    await invalidate(runtime, alice.id, dead_id)  # redelivered: nothing more happens

    assert await devices(client, alice) == [alive.json()["id"]]
    updates = await user_updates(runtime, alice.id)
    assert [u.version for u in updates] == [1, 2, 3, 4]
    assert [d.token for d in updates[-1].devices] == ["alive"]
    subscriber_mock = runtime.subscribers.on_device_invalidated.mock
    assert subscriber_mock is not None
    assert subscriber_mock.call_count == 2


async def test_a_device_is_only_removed_for_the_user_named(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice = await register(client, "alice")
    bob = await register(client, "bob")
    device = await client.post(
        "/users/me/devices", json={"platform": "fcm", "token": "tok"}, headers=alice.headers
    )
    device_id = uuid.UUID(device.json()["id"])

    await invalidate(runtime, bob.id, device_id)
    await invalidate(runtime, uuid.uuid4(), device_id)
    await invalidate(runtime, alice.id, uuid.uuid4())

    assert await devices(client, alice) == [str(device_id)]
    assert [u.version for u in await user_updates(runtime, alice.id)] == [1, 2]
    assert [u.version for u in await user_updates(runtime, bob.id)] == [1]
