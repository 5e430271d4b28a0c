"""The OpenAPI description says what the server does: every status it answers with its body, and
the rules it checks as patterns. (tests/e2e/test_fuzz_api.py checks the same against the running
service with a fuzzer; these are the cases it found, kept as fast regressions.)"""

from __future__ import annotations

import base64
import json
import re
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from herald_shared.events import utc_now
from message_service.api.responses import ECHO_MAX
from message_service.cursor import decode_cursor, encode_cursor
from tests.unit.message_service.helpers import PASSWORD, register

JSON = {"content-type": "application/json"}


@pytest.fixture
async def document(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    openapi: dict[str, Any] = response.json()
    return openapi


def operations(document: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{method.upper()} {path}", operation)
        for path, item in document["paths"].items()
        for method, operation in item.items()
    ]


def answer_schema(operation: dict[str, Any], status: str) -> str:
    ref: str = operation["responses"][status]["content"]["application/json"]["schema"]["$ref"]
    return ref.rsplit("/", 1)[1]


def fullmatch(pattern: str, text: str) -> bool:
    """A JSON Schema pattern as a validator reads it (`$` is the end of the text, never before a
    final line break as in Python)."""
    assert pattern.startswith("^")
    assert pattern.endswith("$")
    return re.search(pattern[:-1] + r"\Z", text) is not None


def test_every_operation_documents_its_error_answers(document: dict[str, Any]) -> None:
    for name, operation in operations(document):
        answers = operation["responses"]
        if operation.get("security"):
            assert answer_schema(operation, "401") == "ErrorOut", name
            assert "WWW-Authenticate" in answers["401"]["headers"], name
        if "requestBody" in operation and name != "POST /unsubscribe":  # an HTML form
            assert answer_schema(operation, "400") == "ErrorOut", name
            assert answer_schema(operation, "413") == "ErrorOut", name
        if "422" in answers:
            assert answer_schema(operation, "422") == "InvalidOut", name
        assert answer_schema(operation, "429") == "ErrorOut", name
        assert {"Retry-After", "RateLimit-Policy", "RateLimit"} <= set(answers["429"]["headers"])
    assert "HTTPValidationError" not in document["components"]["schemas"]


async def test_the_documented_error_answers_are_the_ones_given(client: httpx.AsyncClient) -> None:
    no_token = await client.get("/users/me")
    bad_token = await client.get("/users/me", headers={"Authorization": "Bearer nope"})
    # FastAPI answers 422 to most bodies that are not JSON, 400 to some it cannot decode.
    not_json = await client.post("/users", content=b"\x02P\xb1", headers=JSON)

    assert no_token.status_code == bad_token.status_code == 401
    assert no_token.headers["www-authenticate"] == "Bearer"
    assert bad_token.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    assert not_json.status_code == 400
    for response in (no_token, bad_token, not_json):
        assert set(response.json()) == {"detail"}


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("OPTIONS", "/users/me", "DELETE, GET, PATCH"),
        ("DELETE", "/unsubscribe", "GET, POST"),
        ("PATCH", "/rooms", "GET, POST"),
        ("GET", f"/users/me/blocked/{uuid.UUID(int=1)}", "DELETE, PUT"),
    ],
)
async def test_a_405_allows_every_method_of_the_path(
    client: httpx.AsyncClient, method: str, path: str, allow: str
) -> None:
    """Starlette named the methods of the first route of the path only (GET, not PATCH)."""
    response = await client.request(method, path)

    assert response.status_code == 405
    assert response.headers["allow"] == allow


async def test_patch_me_documents_display_name_as_never_null(
    client: httpx.AsyncClient, document: dict[str, Any]
) -> None:
    alice = await register(client, "alice")
    fields = document["components"]["schemas"]["UserPatch"]["properties"]

    refused = await client.patch("/users/me", json={"display_name": None}, headers=alice.headers)
    left_out = await client.patch("/users/me", json={}, headers=alice.headers)

    assert fields["display_name"]["type"] == fields["email"]["type"] == "string"
    assert refused.status_code == 422
    assert left_out.status_code == 200


NAMES = [
    "Alice",
    "  Alice 👋 ",
    "A" * 100,
    "A" * 101,
    "",
    "   ",
    "\u3000",
    "Alice\r\nBcc: x@example.test",
    "Alice\x00",
    "Alice\x85",
    "evil\u202egnp.exe",
    "line\u2028break",
    "tab\there",
    "Al\u00a0ice",
]


@pytest.mark.parametrize("name", NAMES)
async def test_the_display_name_pattern_is_the_servers_rule(
    client: httpx.AsyncClient, document: dict[str, Any], name: str
) -> None:
    schema = document["components"]["schemas"]["UserCreate"]["properties"]["display_name"]
    documented = len(name) <= schema["maxLength"] and fullmatch(schema["pattern"], name)

    response = await client.post(
        "/users",
        json={
            "username": "alice",
            "display_name": name,
            "email": "a@example.test",
            "password": PASSWORD,
        },
    )

    assert response.status_code == (201 if documented else 422)


ADDRESSES = [
    "alice@example.test",
    " Alice@Example.TEST\n",
    "alice@localhost",
    "not-an-address",
    "alice@example.test\r\nBcc: x@example.test",
    "a" * 65 + "@example.test",
    "a@" + "b" * 64 + ".test",
    "a@b.c\u00a0",
]


@pytest.mark.parametrize("address", ADDRESSES)
async def test_the_email_pattern_is_the_servers_rule(
    client: httpx.AsyncClient, document: dict[str, Any], address: str
) -> None:
    schema = document["components"]["schemas"]["UserCreate"]["properties"]["email"]
    documented = len(address) <= schema["maxLength"] and fullmatch(schema["pattern"], address)

    response = await client.post(
        "/users",
        json={
            "username": "alice",
            "display_name": "Alice",
            "email": address,
            "password": PASSWORD,
        },
    )

    assert response.status_code == (201 if documented else 422)


CONTENTS = ["hi", "  two\nlines\t ", " ", "\n\t\r", "\u2028", "bell\x07", "nul\x00", "é\x9f"]


@pytest.mark.parametrize("content", CONTENTS)
async def test_the_message_pattern_is_the_servers_rule(
    client: httpx.AsyncClient, document: dict[str, Any], content: str
) -> None:
    schema = document["components"]["schemas"]["MessageCreate"]["properties"]["content"]
    documented = fullmatch(schema["pattern"], content)
    alice = await register(client, "alice")
    room = (await client.post("/rooms", json={"name": "R"}, headers=alice.headers)).json()["id"]

    response = await client.post(
        f"/rooms/{room}/messages", json={"content": content}, headers=alice.headers
    )

    assert response.status_code == (201 if documented else 422)


def test_every_cursor_of_the_documented_form_is_a_position(document: dict[str, Any]) -> None:
    parameters = document["paths"]["/rooms/{room_id}/messages"]["get"]["parameters"]
    before = next(parameter for parameter in parameters if parameter["name"] == "before")
    pattern = before["schema"]["pattern"]
    message_id, now = uuid.uuid4(), utc_now()

    for cursor in ("0_" + "0" * 32, "9" * 16 + "_" + "f" * 32, encode_cursor(now, message_id)):
        assert fullmatch(pattern, cursor)
        assert decode_cursor(cursor)[1] in {uuid.UUID(int=0), uuid.UUID(hex="f" * 32), message_id}
    assert decode_cursor(encode_cursor(now, message_id)) == (now, message_id)


def test_a_cursor_of_the_older_form_is_still_read() -> None:
    message_id = uuid.uuid4()
    older = base64.urlsafe_b64encode(
        json.dumps(["2025-01-01T00:00:00+00:00", str(message_id)]).encode()
    ).decode()

    assert decode_cursor(older) == (datetime(2025, 1, 1, tzinfo=UTC), message_id)


async def test_a_422_echoes_at_most_200_characters(client: httpx.AsyncClient) -> None:
    alice = await register(client, "alice")
    long_field = "x" * 1000
    unknown = [str(uuid.uuid4()) for _ in range(50)]

    extra = await client.post(
        "/users",
        json={"username": "bob", "display_name": "B", "email": "b@x.test", long_field: 1},
    )
    strangers = await client.post(
        "/rooms", json={"name": "R", "member_ids": unknown}, headers=alice.headers
    )

    assert extra.status_code == strangers.status_code == 422
    assert max(len(part) for part in extra.json()["detail"][0]["loc"]) <= ECHO_MAX
    assert long_field not in extra.text
    assert len(strangers.json()["detail"]) <= ECHO_MAX
    assert not all(identifier in strangers.text for identifier in unknown)
