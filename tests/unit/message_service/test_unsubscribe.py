"""`/unsubscribe`: the signed link of the e-mails' List-Unsubscribe header (RFC 8058 one-click).

Tokens are issued here as email-sender issues them (herald_shared.unsubscribe, same secret).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import httpx
import pytest
from fastapi import FastAPI

from herald_shared.events import utc_now
from herald_shared.unsubscribe import UnsubscribeTokens
from message_service.api.routes.unsubscribe import is_one_click
from message_service.app import MessageService, service_of
from message_service.models import Preferences, User
from tests.unit.message_service.helpers import (
    Account,
    client_for,
    make_settings,
    register,
    running_app,
    user_updates,
)

SECRET = "test-unsubscribe-secret-0123456789abcdef"
ONE_CLICK = {"List-Unsubscribe": "One-Click"}


@pytest.fixture
async def app(sqlite_url: str) -> AsyncIterator[FastAPI]:
    async with running_app(make_settings(sqlite_url, unsubscribe_secret=SECRET)) as app:
        yield app


@pytest.fixture
def runtime(app: FastAPI) -> MessageService:
    return service_of(app)


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(app) as client:
        yield client


def token_for(user_id: uuid.UUID, *, secret: str = SECRET, age: timedelta = timedelta()) -> str:
    return UnsubscribeTokens(secret.encode()).issue(
        user_id, now=utc_now() - age, lifetime=timedelta(days=30)
    )


async def email_enabled(client: httpx.AsyncClient, account: Account) -> bool:
    response = await client.get("/users/me/preferences", headers=account.headers)
    enabled: bool = response.json()["email_enabled"]
    return enabled


async def test_one_click_turns_email_off_and_publishes_user_updated(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice = await register(client, "alice")
    bob = await register(client, "bob")

    # As a mail client sends it: form-encoded body, no Authorization header.
    response = await client.post(
        "/unsubscribe", params={"token": token_for(alice.id)}, data=ONE_CLICK
    )
    again = await client.post("/unsubscribe", params={"token": token_for(alice.id)}, data=ONE_CLICK)

    assert response.status_code == again.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "E-mail notifications are off" in response.text
    assert not await email_enabled(client, alice)
    assert await email_enabled(client, bob)  # only the token's user
    updates = await user_updates(runtime, alice.id)
    assert [u.version for u in updates] == [1, 2]  # the repeated POST changed nothing
    assert updates[-1].preferences.email_enabled is False
    assert updates[-1].preferences.push_enabled is True


async def test_one_click_as_multipart_form_data(client: httpx.AsyncClient) -> None:
    alice = await register(client, "alice")

    response = await client.post(
        "/unsubscribe",
        params={"token": token_for(alice.id)},
        files={"List-Unsubscribe": (None, "One-Click")},
    )

    assert response.status_code == 200, response.text
    assert not await email_enabled(client, alice)


async def test_a_link_of_a_deleted_account_changes_nothing_and_is_answered_as_any_other(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    """A link mailed before the account was deleted: a snapshot now, newer than the last
    (`deleted`) one, would make the router recreate the user. The answer is the one a valid
    link gets, as for an account that never existed: the link does not tell which it is."""
    alice = await register(client, "alice")
    token = token_for(alice.id)
    assert (await client.delete("/users/me", headers=alice.headers)).status_code == 204
    (deletion,) = await user_updates(runtime, alice.id)
    nobody = uuid.uuid4()

    deleted = await client.post("/unsubscribe", params={"token": token}, data=ONE_CLICK)
    unknown = await client.post("/unsubscribe", params={"token": token_for(nobody)}, data=ONE_CLICK)

    assert deleted.status_code == unknown.status_code == 200
    assert deleted.text == unknown.text
    assert "E-mail notifications are off" in deleted.text
    assert await user_updates(runtime, alice.id) == [deletion]
    assert deletion.deleted
    assert await user_updates(runtime, nobody) == []
    async with runtime.sessions() as session:
        row = await session.get(User, alice.id)
        preferences = [await session.get(Preferences, user) for user in (alice.id, nobody)]
    assert row is not None
    assert (row.deleted_at is not None, row.version) == (True, deletion.version)
    assert preferences == [None, None]


async def test_get_shows_a_confirmation_form_and_changes_nothing(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice = await register(client, "alice")
    token = token_for(alice.id)

    response = await client.get("/unsubscribe", params={"token": token})

    assert response.status_code == 200
    assert f'action="unsubscribe?token={token}"' in response.text
    assert '<input type="hidden" name="List-Unsubscribe" value="One-Click">' in response.text
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert await email_enabled(client, alice)
    assert [u.version for u in await user_updates(runtime, alice.id)] == [1]


def _forged(token: str) -> str:
    _user, expires, signature = token.split(".")
    return f"{uuid.uuid4().hex}.{expires}.{signature}"  # someone else's id, the same signature


@pytest.mark.parametrize(
    ("make_token", "reason"),
    [
        (lambda user: token_for(user, age=timedelta(days=31)), "Expired unsubscribe link"),
        (lambda user: _forged(token_for(user)), "Invalid unsubscribe link"),
        (
            lambda user: token_for(user, secret="another-secret-0123456789abcdefghij"),
            "Invalid unsubscribe link",
        ),
        (lambda user: token_for(user)[:-1], "Malformed unsubscribe link"),
        (lambda user: str(user), "Malformed unsubscribe link"),
    ],
    ids=["expired", "other-user", "other-secret", "truncated", "bare-user-id"],
)
@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_a_bad_link_is_400_with_its_reason_and_changes_nothing(
    client: httpx.AsyncClient,
    runtime: MessageService,
    method: str,
    make_token: object,
    reason: str,
) -> None:
    alice = await register(client, "alice")
    assert callable(make_token)
    token = make_token(alice.id)

    data = ONE_CLICK if method == "POST" else None
    response = await client.request(method, "/unsubscribe", params={"token": token}, data=data)

    assert response.status_code == 400
    assert reason in response.text
    assert token not in response.text
    assert await email_enabled(client, alice)
    assert [u.version for u in await user_updates(runtime, alice.id)] == [1]


async def test_a_post_without_the_one_click_body_is_400(client: httpx.AsyncClient) -> None:
    alice = await register(client, "alice")

    response = await client.post(
        "/unsubscribe", params={"token": token_for(alice.id)}, data={"other": "x"}
    )

    assert response.status_code == 400
    assert "List-Unsubscribe=One-Click" in response.text
    assert await email_enabled(client, alice)


async def test_a_missing_token_is_422(client: httpx.AsyncClient) -> None:
    assert (await client.post("/unsubscribe", data=ONE_CLICK)).status_code == 422


@pytest.mark.parametrize(
    ("content_type", "body", "expected"),
    [
        ("application/x-www-form-urlencoded", b"List-Unsubscribe=One-Click", True),
        ("application/x-www-form-urlencoded; charset=utf-8", b"List-Unsubscribe=One-Click", True),
        ("application/x-www-form-urlencoded", b"List-Unsubscribe=Two-Click", False),
        ("application/x-www-form-urlencoded", b"", False),
        (
            "multipart/form-data; boundary=b",
            b'--b\r\nContent-Disposition: form-data; name="List-Unsubscribe"\r\n\r\n'
            b"One-Click\r\n--b--\r\n",
            True,
        ),
        (
            "multipart/form-data; boundary=b",
            b'--b\r\nContent-Disposition: form-data; name="Other"\r\n\r\nOne-Click\r\n--b--\r\n',
            False,
        ),
        ("text/plain", b"List-Unsubscribe=One-Click", False),
    ],
)
def test_is_one_click(content_type: str, body: bytes, expected: bool) -> None:
    assert is_one_click(content_type, body) is expected
