"""Sessions: signing in and out, listing and ending sessions, token rotation, expiry (sliding,
then swept with the session's devices), passwords (Argon2id, changed, rehashed), and the
sign-in budgets per IP and per account."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlmodel import select

from herald_shared.events import utc_now
from message_service import service
from message_service.app import MessageService, service_of
from message_service.models import AuthSession, User
from message_service.passwords import PasswordParameters, Passwords
from message_service.pruning import SessionSweeper
from tests.unit.message_service.helpers import (
    PASSWORD,
    Account,
    register,
    sign_in,
    user_updates,
)
from tests.unit.message_service.test_rate_limits import (
    ATTACKER,
    NEIGHBOUR,
    assert_rate_limited,
    client_from,
    limited_app,
)


async def add_phone(client: httpx.AsyncClient, account: Account, token: str) -> str:
    response = await client.post(
        "/users/me/devices", json={"platform": "fcm", "token": token}, headers=account.headers
    )
    assert response.status_code == 201, response.text
    device_id: str = response.json()["id"]
    return device_id


async def status_of(client: httpx.AsyncClient, account: Account) -> int:
    return (await client.get("/users/me", headers=account.headers)).status_code


async def stored_session(runtime: MessageService, session_id: uuid.UUID) -> AuthSession | None:
    async with runtime.sessions() as session:
        return await session.get(AuthSession, session_id)


# --- signing in ---------------------------------------------------------------------------------


async def test_signing_in_starts_another_session_of_the_same_user(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice = await register(client, "alice")

    response = await client.post(
        "/sessions", json={"username": "Alice", "password": PASSWORD, "name": " Alice's laptop "}
    )

    assert response.status_code == 201, response.text
    body = response.json()
    assert set(body) == {"id", "user_id", "token", "expires_at"}
    assert body["user_id"] == str(alice.id)
    assert body["id"] != str(alice.session_id)
    laptop = Account(alice.id, "alice", body["token"], uuid.UUID(body["id"]))
    assert await status_of(client, laptop) == await status_of(client, alice) == 200
    stored = await stored_session(runtime, laptop.session_id)
    assert stored is not None
    assert stored.name == "Alice's laptop"
    assert stored.token_hash == hashlib.sha256(body["token"].encode()).hexdigest()
    assert stored.expires_at - utc_now() > timedelta(days=29)


@pytest.mark.parametrize(
    "credentials",
    [
        {"username": "alice", "password": "not the password"},
        {"username": "nobody", "password": PASSWORD},
        {"username": "alice", "password": ""},
    ],
)
async def test_a_wrong_password_or_an_unknown_user_gets_the_same_401(
    client: httpx.AsyncClient, credentials: dict[str, str]
) -> None:
    await register(client, "alice")

    response = await client.post("/sessions", json=credentials)

    assert response.status_code == 401
    assert response.json() == {"detail": "wrong username or password"}
    assert response.headers["www-authenticate"] == "Bearer"


async def test_an_unknown_user_is_checked_against_a_stand_in_hash() -> None:
    """So that refusing an unknown user takes as long as refusing a wrong password."""
    passwords = Passwords(PasswordParameters(memory_kib=8 * 1024, time_cost=1))
    real = await passwords.hash(PASSWORD)

    assert await passwords.verify(real, PASSWORD)
    assert not await passwords.verify(real, PASSWORD + "!")
    assert not await passwords.verify(None, PASSWORD)
    assert not await passwords.verify(None, "herald: no such user")  # the stand-in's own text
    assert passwords._nobody is not None
    assert passwords._nobody.startswith("$argon2id$")


async def test_passwords_are_stored_as_argon2id_hashes_only(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice = await register(client, "alice")

    async with runtime.sessions() as session:
        user = await session.get(User, alice.id)
    assert user is not None
    assert user.password_hash is not None
    assert user.password_hash.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    assert PASSWORD not in user.password_hash


async def test_a_hash_made_with_older_parameters_is_redone_at_sign_in(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice = await register(client, "alice")
    weaker = Passwords(PasswordParameters(memory_kib=8 * 1024, time_cost=1))
    async with runtime.sessions() as session:
        user = await session.get(User, alice.id)
        assert user is not None
        user.password_hash = await weaker.hash(PASSWORD)
        await session.commit()

    await sign_in(client, "alice")

    async with runtime.sessions() as session:
        user = await session.get(User, alice.id)
    assert user is not None
    assert user.password_hash is not None
    assert user.password_hash.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    await sign_in(client, "alice")  # the new hash is of the same password


@pytest.mark.parametrize(
    "body",
    [
        {"username": "alice"},
        {"password": PASSWORD},
        {"username": "alice", "password": PASSWORD, "extra": 1},
        {"username": "alice", "password": "x" * 129},
        {"username": "a" * 33, "password": PASSWORD},
        {"username": "alice", "password": PASSWORD, "name": "line\nbreak"},
        # No username has one; PostgreSQL refuses a NUL in a query parameter (a 500).
        {"username": "ali\u0000ce", "password": PASSWORD},
        {"username": "alice\u202e", "password": PASSWORD},
    ],
)
async def test_a_malformed_sign_in_is_422(client: httpx.AsyncClient, body: dict[str, Any]) -> None:
    await register(client, "alice")

    assert (await client.post("/sessions", json=body)).status_code == 422


async def test_a_username_with_a_nul_is_refused_as_such(client: httpx.AsyncClient) -> None:
    await register(client, "alice")

    response = await client.post(
        "/sessions", json={"username": "ali\u0000ce", "password": PASSWORD}
    )

    assert response.status_code == 422
    assert [error["loc"] for error in response.json()["detail"]] == [["body", "username"]]


# --- signing out, and ending other sessions -----------------------------------------------------


async def test_signing_out_ends_the_token_and_removes_the_sessions_devices(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    phone = await register(client, "alice")
    laptop = await sign_in(client, "alice")
    await add_phone(client, phone, "alice-phone")
    kept = await add_phone(client, laptop, "alice-browser")

    response = await client.delete("/sessions/current", headers=phone.headers)

    assert response.status_code == 204
    assert await status_of(client, phone) == 401
    devices = (await client.get("/users/me/devices", headers=laptop.headers)).json()
    assert [device["id"] for device in devices] == [kept]
    # The router learns it: the user's newest snapshot has the laptop's device only.
    last = (await user_updates(runtime, phone.id))[-1]
    assert [str(device.device_id) for device in last.devices] == [kept]
    assert await stored_session(runtime, phone.session_id) is None


async def test_signing_out_a_session_without_devices_publishes_nothing(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice = await register(client, "alice")
    laptop = await sign_in(client, "alice")
    before = len(await user_updates(runtime, alice.id))

    assert (await client.delete("/sessions/current", headers=laptop.headers)).status_code == 204

    assert len(await user_updates(runtime, alice.id)) == before


async def test_sessions_are_listed_and_another_can_be_ended(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    phone = await register(client, "alice")
    laptop = await sign_in(client, "alice", name="laptop")
    await add_phone(client, laptop, "alice-laptop-browser")

    listed = (await client.get("/users/me/sessions", headers=phone.headers)).json()
    ended = await client.delete(f"/users/me/sessions/{laptop.session_id}", headers=phone.headers)

    assert [(s["id"], s["name"], s["current"]) for s in listed] == [
        (str(phone.session_id), None, True),
        (str(laptop.session_id), "laptop", False),
    ]
    assert set(listed[0]) == {"id", "name", "created_at", "last_used_at", "expires_at", "current"}
    assert ended.status_code == 204
    assert await status_of(client, laptop) == 401
    assert (await client.get("/users/me/devices", headers=phone.headers)).json() == []
    assert (await user_updates(runtime, phone.id))[-1].devices == []


async def test_someone_elses_session_is_not_found(client: httpx.AsyncClient) -> None:
    alice = await register(client, "alice")
    bob = await register(client, "bob")

    response = await client.delete(f"/users/me/sessions/{alice.session_id}", headers=bob.headers)
    unknown = await client.delete(f"/users/me/sessions/{uuid.uuid4()}", headers=bob.headers)

    assert response.status_code == unknown.status_code == 404
    assert await status_of(client, alice) == 200


# --- rotation -----------------------------------------------------------------------------------


async def test_rotating_the_token_keeps_the_session_and_its_devices(
    client: httpx.AsyncClient,
) -> None:
    alice = await register(client, "alice")
    device = await add_phone(client, alice, "alice-phone")

    response = await client.post("/sessions/current/rotate", headers=alice.headers)

    assert response.status_code == 200
    body = response.json()
    assert body["id"] == str(alice.session_id)
    assert body["token"] != alice.token
    rotated = Account(alice.id, "alice", body["token"], alice.session_id)
    assert await status_of(client, alice) == 401
    devices = (await client.get("/users/me/devices", headers=rotated.headers)).json()
    assert [d["id"] for d in devices] == [device]


# --- expiry -------------------------------------------------------------------------------------


async def test_a_session_expires_after_its_ttl_unless_used(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice = await register(client, "alice")
    ttl = timedelta(days=30)
    now = utc_now()

    def at(moment: Any) -> Any:
        return service.authenticate(
            engine=runtime.engine, token=alice.token, session_ttl=ttl, now=moment
        )

    # Used after 20 days: it slides to 30 days from then, so it still works after 45.
    assert await at(now + timedelta(days=20)) is not None
    slid = await stored_session(runtime, alice.session_id)
    assert slid is not None
    assert slid.expires_at - (now + timedelta(days=50)) < timedelta(seconds=5)
    assert await at(now + timedelta(days=45)) is not None
    # Not used for 30 days: refused.
    assert await at(now + timedelta(days=45) + ttl + timedelta(seconds=1)) is None


async def test_uses_within_a_minute_are_not_written(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice = await register(client, "alice")
    before = await stored_session(runtime, alice.session_id)

    for _ in range(3):
        assert await status_of(client, alice) == 200

    after = await stored_session(runtime, alice.session_id)
    assert before is not None
    assert after is not None
    assert (after.last_used_at, after.expires_at) == (before.last_used_at, before.expires_at)


async def test_expired_sessions_are_swept_with_their_devices(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    phone = await register(client, "alice")
    laptop = await sign_in(client, "alice")
    bob = await register(client, "bob")
    await add_phone(client, phone, "alice-phone")
    kept = await add_phone(client, laptop, "alice-browser")
    bobs = await add_phone(client, bob, "bob-phone")
    async with runtime.sessions() as session:
        for session_id in (phone.session_id,):
            stored = await session.get(AuthSession, session_id)
            assert stored is not None
            stored.expires_at = utc_now() - timedelta(seconds=1)
        await session.commit()
    sweeper = SessionSweeper(sessions=runtime.sessions, nudge=runtime.relay.nudge, interval=60)

    assert await status_of(client, phone) == 401  # refused from the moment it expired
    assert await sweeper.prune_once() == 1
    assert await sweeper.prune_once() == 0

    assert await stored_session(runtime, phone.session_id) is None
    mine = (await client.get("/users/me/devices", headers=laptop.headers)).json()
    assert [d["id"] for d in mine] == [kept]
    assert [str(d.device_id) for d in (await user_updates(runtime, phone.id))[-1].devices] == [kept]
    theirs = (await client.get("/users/me/devices", headers=bob.headers)).json()
    assert [d["id"] for d in theirs] == [bobs]


# --- passwords ----------------------------------------------------------------------------------


async def test_changing_the_password_signs_out_every_other_session(
    client: httpx.AsyncClient,
) -> None:
    phone = await register(client, "alice")
    laptop = await sign_in(client, "alice")
    new = "a new passphrase"

    response = await client.put(
        "/users/me/password",
        json={"current_password": PASSWORD, "new_password": new},
        headers=phone.headers,
    )

    assert response.status_code == 204
    assert await status_of(client, phone) == 200
    assert await status_of(client, laptop) == 401
    old = await client.post("/sessions", json={"username": "alice", "password": PASSWORD})
    assert old.status_code == 401
    await sign_in(client, "alice", password=new)


@pytest.mark.parametrize("current", [None, "not the password"])
async def test_a_password_change_needs_the_current_one(
    client: httpx.AsyncClient, current: str | None
) -> None:
    alice = await register(client, "alice")
    laptop = await sign_in(client, "alice")
    body: dict[str, Any] = {"new_password": "a new passphrase"}
    if current is not None:
        body["current_password"] = current

    response = await client.put("/users/me/password", json=body, headers=alice.headers)

    assert response.status_code == 403
    assert response.json() == {"detail": "the current password is not right"}
    assert await status_of(client, laptop) == 200
    await sign_in(client, "alice")


async def test_an_account_from_before_passwords_sets_one_without_the_current(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice = await register(client, "alice")
    async with runtime.sessions() as session:
        user = await session.get(User, alice.id)
        assert user is not None
        user.password_hash = None  # as the migration leaves an account registered before
        await session.commit()
    refused = await client.post("/sessions", json={"username": "alice", "password": PASSWORD})

    response = await client.put(
        "/users/me/password", json={"new_password": "finally one"}, headers=alice.headers
    )

    assert refused.status_code == 401
    assert response.status_code == 204
    await sign_in(client, "alice", password="finally one")


# --- budgets ------------------------------------------------------------------------------------


async def test_wrong_passwords_for_one_account_are_refused_from_every_address(
    sqlite_url: str,
) -> None:
    async with (
        limited_app(sqlite_url, rate_limit_sign_in_failures="3 per 15 minutes") as app,
        client_from(app, ATTACKER) as attacker,
        client_from(app, NEIGHBOUR) as neighbour,
    ):
        alice = await register(neighbour, "alice")
        wrong = {"username": "alice", "password": "guess"}
        answers = [await attacker.post("/sessions", json=wrong) for _ in range(3)]
        # Another address, even with the right password: the account's budget is spent.
        over = await neighbour.post("/sessions", json={"username": "alice", "password": PASSWORD})
        bob = await register(neighbour, "bob")
        other_account = await attacker.post(
            "/sessions", json={"username": "bob", "password": PASSWORD}
        )
        still_signed_in = await neighbour.get("/users/me", headers=alice.headers)

    assert [answer.status_code for answer in answers] == [401, 401, 401]
    assert_rate_limited(over, "sign_in_failures", limit=3, window=900)
    assert other_account.status_code == 201
    assert other_account.json()["user_id"] == str(bob.id)
    assert still_signed_in.status_code == 200


async def test_guesses_sent_at_once_spend_the_accounts_budget_in_turn(sqlite_url: str) -> None:
    """Before, every guess of a burst passed the budget's check before the first had spent it:
    all were checked, and the right password, sent last, signed in. Now one at a time."""
    async with (
        limited_app(sqlite_url, rate_limit_sign_in_failures="3 per 15 minutes") as app,
        client_from(app, NEIGHBOUR) as owner,
    ):
        await register(owner, "alice")
        addresses = [f"203.0.113.{n}" for n in range(1, 13)]  # one guess each: no IP's budget
        clients = [client_from(app, address) for address in addresses]
        guesses = [{"username": "alice", "password": f"guess {n}"} for n in range(11)]
        guesses.append({"username": "alice", "password": PASSWORD})
        try:
            answers = await asyncio.gather(
                *(
                    client.post("/sessions", json=guess)
                    for client, guess in zip(clients, guesses, strict=True)
                )
            )
        finally:
            for client in clients:
                await client.aclose()

    statuses = [answer.status_code for answer in answers]
    assert statuses.count(401) == 3
    assert statuses.count(429) == len(guesses) - 3
    assert 201 not in statuses


async def test_wrong_passwords_from_one_address_are_refused_before_the_lookup(
    sqlite_url: str,
) -> None:
    async with (
        limited_app(sqlite_url, rate_limit_auth_failures="4 per 10 minutes") as app,
        client_from(app, ATTACKER) as attacker,
        client_from(app, NEIGHBOUR) as neighbour,
    ):
        await register(neighbour, "alice")
        answers = [
            await attacker.post("/sessions", json={"username": f"user{n}", "password": "guess"})
            for n in range(5)
        ]
        right_there = await attacker.post(
            "/sessions", json={"username": "alice", "password": PASSWORD}
        )
        elsewhere = await neighbour.post(
            "/sessions", json={"username": "alice", "password": PASSWORD}
        )
        failures = service_of(app).registry.get_sample_value(
            "herald_message_rate_limited_total", {"budget": "auth_failures"}
        )

    assert [answer.status_code for answer in answers[:4]] == [401] * 4
    assert_rate_limited(answers[4], "auth_failures", limit=4, window=600)
    assert_rate_limited(right_there, "auth_failures", limit=4, window=600)
    assert elsewhere.status_code == 201
    assert failures == 2


async def test_sign_ins_spend_the_ip_budget_whatever_their_answer(sqlite_url: str) -> None:
    async with (
        limited_app(sqlite_url, rate_limit_sign_ins="2 per 10 minutes") as app,
        client_from(app, ATTACKER) as attacker,
    ):
        await register(attacker, "alice")
        good = {"username": "alice", "password": PASSWORD}
        answers = [await attacker.post("/sessions", json=good) for _ in range(3)]

    assert [answer.status_code for answer in answers[:2]] == [201, 201]
    assert_rate_limited(answers[2], "sign_ins", limit=2, window=600)


async def test_no_session_row_holds_a_token(
    client: httpx.AsyncClient, runtime: MessageService
) -> None:
    alice = await register(client, "alice")
    laptop = await sign_in(client, "alice")

    async with runtime.sessions() as session:
        rows = (await session.exec(select(AuthSession))).all()

    dumped = " ".join(str(row.model_dump()) for row in rows)
    assert len(rows) == 2
    assert alice.token not in dumped
    assert laptop.token not in dumped
