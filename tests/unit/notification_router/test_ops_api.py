"""The operators' "why (not)?" endpoint: its own token, ids only, the ledger's answer."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from herald_shared.database import run_migrations
from herald_shared.events import Level
from notification_router import repository, routing
from notification_router.app import RouterService, build_service
from notification_router.settings import Settings
from tests.support.router_factories import NOW, message_created, user_updated

OPS_TOKEN = "operator-secret-token"


async def router(sqlite_url: str, token: str | None) -> RouterService:
    service = build_service(Settings(database_url=sqlite_url, ops_token=token))
    await run_migrations(
        service.engine, script_location="notification_router:migrations", service_name="router"
    )
    return service


@pytest.fixture
async def client(sqlite_url: str) -> AsyncIterator[tuple[httpx.AsyncClient, RouterService]]:
    service = await router(sqlite_url, OPS_TOKEN)
    transport = httpx.ASGITransport(app=service.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        yield http, service
    await service.engine.dispose()


async def test_it_says_what_was_decided_and_why_per_channel_and_device(
    client: tuple[httpx.AsyncClient, RouterService],
) -> None:
    http, service = client
    snapshot = user_updated(devices=2, email_level=Level.NONE)
    await repository.upsert_recipient(service.engine, snapshot, now=NOW)
    user = routing.Recipient.from_snapshot(snapshot)
    event = message_created(recipient_ids=[snapshot.user_id], mentions=[snapshot.user_id])
    plan = routing.plan_notifications(event, {user.user_id: user}, now=NOW)
    await repository.record_decisions(service.engine, [(event, plan.decisions)], now=NOW)
    auth = {"Authorization": f"Bearer {OPS_TOKEN}"}
    query = {"message_id": str(event.message_id), "user_id": str(snapshot.user_id)}

    answer = await http.get("/ops/notifications", params=query, headers=auth)

    assert answer.status_code == 200
    body = answer.json()
    assert (body["trigger"], body["push"], body["email"]) == (
        "mention",
        "pending",
        "skipped:email_disabled",
    )
    assert [delivery["channel"] for delivery in body["deliveries"]] == ["push", "push"]
    assert {delivery["device_id"] for delivery in body["deliveries"]} == {
        str(device.device_id) for device in snapshot.devices
    }
    assert all(delivery["status"] == "pending" for delivery in body["deliveries"])
    # Ids, reasons and times only: no token, address or text of the user or the message.
    for secret in (snapshot.email, event.message_content, *(d.token for d in snapshot.devices)):
        assert secret is None or secret not in answer.text


@pytest.mark.parametrize(
    ("headers", "params", "status"),
    [
        ({}, {"message_id": "x", "user_id": "y"}, 401),
        ({"Authorization": "Bearer wrong"}, {}, 401),
        ({"Authorization": f"Basic {OPS_TOKEN}"}, {}, 401),
        ({"Authorization": f"Bearer {OPS_TOKEN}"}, {"message_id": "not-a-uuid"}, 400),
        (
            {"Authorization": f"Bearer {OPS_TOKEN}"},
            {
                "message_id": "00000000-0000-0000-0000-000000000001",
                "user_id": "00000000-0000-0000-0000-000000000002",
            },
            404,
        ),
    ],
)
async def test_it_refuses_without_the_operator_token_and_says_what_is_wrong(
    client: tuple[httpx.AsyncClient, RouterService],
    headers: dict[str, str],
    params: dict[str, str],
    status: int,
) -> None:
    http, _ = client

    answer = await http.get("/ops/notifications", params=params, headers=headers)

    assert answer.status_code == status
    assert answer.headers["content-type"] == "application/json"


async def test_without_a_token_set_the_endpoint_does_not_exist(sqlite_url: str) -> None:
    service = await router(sqlite_url, None)
    transport = httpx.ASGITransport(app=service.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        answer = await http.get("/ops/notifications", headers={"Authorization": "Bearer "})
    await service.engine.dispose()

    assert answer.status_code == 404
