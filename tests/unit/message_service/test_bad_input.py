"""Inputs that once answered 500: text that is not Unicode, NaN in JSON, a cursor holding an
instant no database can store. Each is a 422 that names the place and does not echo the input."""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import pytest

from tests.unit.message_service.helpers import create_room, register
from tests.unit.message_service.test_device_lifecycle import subscription

JSON = {"content-type": "application/json"}


def echoes(response: httpx.Response, secret: str) -> bool:
    return secret in response.text


@pytest.mark.parametrize(
    ("path", "raw"),
    [
        ("/users", b'{"username":"bob","display_name":"\\ud800","email":"bob@x.test"}'),
        ("/users", b'{"username":"bob","display_name":"B","email":"b\\udfff@x.test"}'),
        ("/users", b'{"username":"bob","display_name":"B","email":"b@x.test","\\ud800":1}'),
    ],
)
async def test_a_lone_surrogate_is_422(client: httpx.AsyncClient, path: str, raw: bytes) -> None:
    response = await client.post(path, content=raw, headers=JSON)

    assert response.status_code == 422
    assert "Unicode" in response.text


async def test_a_lone_surrogate_in_a_message_is_422(client: httpx.AsyncClient) -> None:
    alice = await register(client, "alice")
    room = await create_room(client, alice, [])

    response = await client.post(
        f"/rooms/{room}/messages",
        content=b'{"content":"a\\udfffb"}',
        headers={**alice.headers, **JSON},
    )
    listed = await client.get(f"/rooms/{room}/messages", headers=alice.headers)

    assert response.status_code == 422
    assert listed.json()["items"] == []


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity"])
async def test_nan_and_infinity_are_422(client: httpx.AsyncClient, number: str) -> None:
    alice = await register(client, "alice")
    body = json.dumps(subscription())[:-1] + f', "expirationTime": {number}}}'

    response = await client.post(
        "/users/me/devices", content=body.encode(), headers={**alice.headers, **JSON}
    )

    assert response.status_code == 422
    assert "expirationTime" in response.text


async def test_a_422_names_the_field_but_does_not_echo_the_input(
    client: httpx.AsyncClient,
) -> None:
    secret = "hunter2-not-an-address"

    response = await client.post(
        "/users",
        json={"username": "bob", "display_name": "Bob", "email": secret, "password": "12345678"},
    )
    extra = await client.post(
        "/users",
        content=b'{"username":"bob","display_name":"B","email":"b@x.test","password":"12345678",'
        b'"x":NaN}',
        headers=JSON,
    )

    assert response.status_code == extra.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "email"]
    assert not echoes(response, secret)
    assert extra.json()["detail"][0]["loc"] == ["body", "x"]


@pytest.mark.parametrize(
    "instant",
    ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"],
)
async def test_a_cursor_out_of_range_is_refused(client: httpx.AsyncClient, instant: str) -> None:
    alice = await register(client, "alice")
    room = await create_room(client, alice, [])
    position: list[Any] = [instant, "00000000-0000-0000-0000-000000000000"]
    cursor = base64.urlsafe_b64encode(json.dumps(position).encode()).decode().rstrip("=")

    response = await client.get(
        f"/rooms/{room}/messages", params={"before": cursor}, headers=alice.headers
    )

    assert response.status_code == 422
