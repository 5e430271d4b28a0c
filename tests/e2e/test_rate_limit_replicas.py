"""Rate limits across two message-service replicas on one database and the machine's Redis: 100
requests with a bad token (or 100 sign-ins with wrong passwords) from one address, spread over
both replicas, are answered 401 as many times as the failed-authentication budget allows, all
together, then 429; after the `Retry-After` they were given, requests from that address pass
again. A user on another address is never affected. Wrong passwords for one account spend its
budget on both replicas together, from any address."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.support import infra
from tests.support.processes import ServiceProcess, free_port

BUDGET = 20
WINDOW_S = 10
ACCOUNT_BUDGET = 3
PASSWORD = "correct horse battery"
ATTEMPTS = 100
ATTACKER = "127.0.0.1"
LEGITIMATE = "127.0.0.2"  # another loopback address: another client to the replicas


@pytest.fixture
async def replicas(
    rabbit_url: str, tmp_path: Path
) -> AsyncIterator[tuple[ServiceProcess, ServiceProcess]]:
    database = await infra.create_database()
    environment = {
        "DATABASE_URL": database,
        "RABBITMQ_URL": rabbit_url,
        "LOG_LEVEL": "INFO",
        "REDIS_URL": infra.REDIS_URL,
        "RATE_LIMIT_KEY_PREFIX": infra.redis_key_prefix(),
        "RATE_LIMIT_AUTH_FAILURES": f"{BUDGET} per {WINDOW_S} seconds",
        "RATE_LIMIT_SIGN_IN_FAILURES": f"{ACCOUNT_BUDGET} per {WINDOW_S} seconds",
        # Every sign-in of the tests here is counted by the failure budgets above.
        "RATE_LIMIT_SIGN_INS": "1000 per minute",
        # Argon2id at its cheapest the settings allow: the budget's guesses must all fall within
        # one window even on a loaded machine (the hash's cost is not what is tested here).
        "PASSWORD_HASH_TIME_COST": "1",
        "PASSWORD_HASH_MEMORY_KIB": str(8 * 1024),
    }
    started = [
        ServiceProcess(
            name="message-service",
            port=free_port(),
            env=environment,
            log_path=tmp_path / f"message-service-{index}.log",
        )
        for index in range(2)
    ]
    try:
        for replica in started:  # one after the other: the first migrates the database
            replica.start()
            await asyncio.to_thread(replica.wait_ready)
        yield started[0], started[1]
    finally:
        codes = [replica.stop() for replica in started]
        await infra.drop_database(database)
    assert codes == [0, 0], [replica.log()[-3000:] for replica in started]
    for replica in started:
        assert "rate_limits=redis" in replica.log()
        assert "shared_storage_unavailable" not in replica.log()


def client_from(address: str) -> httpx.AsyncClient:
    """Requests whose source address is `address` (bound on this machine's loopback)."""
    return httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(local_address=address), timeout=10)


async def register(client: httpx.AsyncClient, base_url: str, name: str) -> dict[str, str]:
    response = await client.post(
        f"{base_url}/users",
        json={
            "username": name,
            "display_name": name,
            "email": f"{name}@example.test",
            "password": PASSWORD,
        },
    )
    assert response.status_code == 201, response.text
    user: dict[str, str] = response.json()
    return user


async def test_bad_tokens_from_one_address_spend_one_budget_across_both_replicas(
    replicas: tuple[ServiceProcess, ServiceProcess],
) -> None:
    first, second = replicas
    async with client_from(ATTACKER) as attacker, client_from(LEGITIMATE) as legitimate:
        alice = await register(legitimate, second.base_url, "alice")
        mallory = await register(attacker, first.base_url, "mallory")
        alice_auth = {"Authorization": f"Bearer {alice['token']}"}
        bad = {"Authorization": "Bearer guessed-token"}

        answers: dict[str, list[httpx.Response]] = {first.base_url: [], second.base_url: []}
        for number in range(ATTEMPTS):  # alternately to each replica
            replica = (first, second)[number % 2]
            response = await attacker.get(f"{replica.base_url}/users/me", headers=bad)
            answers[replica.base_url].append(response)
        # Meanwhile, the user on another address reads her profile on both replicas.
        for replica in (first, second):
            response = await legitimate.get(f"{replica.base_url}/users/me", headers=alice_auth)
            assert response.status_code == 200, response.text

        statuses = [
            response.status_code for responses in answers.values() for response in responses
        ]
        assert statuses.count(401) == BUDGET  # one budget for both, not one each
        assert statuses.count(429) == ATTEMPTS - BUDGET
        for responses in answers.values():
            assert responses[-1].status_code == 429  # each replica refuses
        refusals = [r for responses in answers.values() for r in responses if r.status_code == 429]
        for refusal in refusals:
            assert refusal.headers["ratelimit-policy"] == (
                f'"auth_failures";q={BUDGET};w={WINDOW_S}'
            )
            assert 1 <= int(refusal.headers["retry-after"]) <= WINDOW_S
        # Over the budget, the address's good token is refused too, on either replica.
        mallory_auth = {"Authorization": f"Bearer {mallory['token']}"}
        for replica in (first, second):
            response = await attacker.get(f"{replica.base_url}/users/me", headers=mallory_auth)
            assert response.status_code == 429

        # Retry-After honoured: once it has passed, requests from that address pass again.
        last = max(
            (answers[replica.base_url][-1] for replica in (first, second)),
            key=lambda response: int(response.headers["retry-after"]),
        )
        await asyncio.sleep(int(last.headers["retry-after"]))  # the rule under test is a time
        for replica in (first, second):
            response = await attacker.get(f"{replica.base_url}/users/me", headers=mallory_auth)
            assert response.status_code == 200, response.text
        response = await attacker.get(f"{second.base_url}/users/me", headers=bad)
        assert response.status_code == 401


async def test_wrong_passwords_from_one_address_spend_one_budget_across_both_replicas(
    replicas: tuple[ServiceProcess, ServiceProcess],
) -> None:
    first, second = replicas
    async with client_from(ATTACKER) as attacker, client_from(LEGITIMATE) as legitimate:
        await register(legitimate, second.base_url, "alice")
        await register(attacker, first.base_url, "mallory")

        # A spray: one guess for each of 100 names, alternately to each replica.
        answers = [
            await attacker.post(
                f"{(first, second)[number % 2].base_url}/sessions",
                json={"username": f"user{number}", "password": "Winter2026!"},
            )
            for number in range(ATTEMPTS)
        ]
        # Meanwhile, the user on another address signs in on both replicas.
        for replica in (first, second):
            response = await legitimate.post(
                f"{replica.base_url}/sessions", json={"username": "alice", "password": PASSWORD}
            )
            assert response.status_code == 201, response.text

        statuses = [response.status_code for response in answers]
        assert statuses.count(401) == BUDGET
        assert statuses.count(429) == ATTEMPTS - BUDGET
        assert answers[-2].status_code == answers[-1].status_code == 429  # each replica refuses
        for refusal in answers[BUDGET:]:
            assert refusal.headers["ratelimit-policy"] == (
                f'"auth_failures";q={BUDGET};w={WINDOW_S}'
            )
        # Over the budget, the right password from that address is refused too.
        mallory = {"username": "mallory", "password": PASSWORD}
        for replica in (first, second):
            response = await attacker.post(f"{replica.base_url}/sessions", json=mallory)
            assert response.status_code == 429

        retry_after = max(int(response.headers["retry-after"]) for response in answers[-2:])
        await asyncio.sleep(retry_after)  # the rule under test is a time
        for replica in (first, second):
            response = await attacker.post(f"{replica.base_url}/sessions", json=mallory)
            assert response.status_code == 201, response.text


async def test_wrong_passwords_for_one_account_spend_its_budget_across_both_replicas(
    replicas: tuple[ServiceProcess, ServiceProcess],
) -> None:
    first, second = replicas
    async with client_from(ATTACKER) as attacker, client_from(LEGITIMATE) as legitimate:
        await register(legitimate, first.base_url, "bob")
        guess = {"username": "bob", "password": "not his password"}

        answers = [
            await (attacker, legitimate)[number % 2].post(
                f"{(first, second)[number // 2 % 2].base_url}/sessions", json=guess
            )
            for number in range(ACCOUNT_BUDGET + 1)
        ]
        right = await legitimate.post(
            f"{second.base_url}/sessions", json={"username": "bob", "password": PASSWORD}
        )

    assert [answer.status_code for answer in answers[:ACCOUNT_BUDGET]] == [401] * ACCOUNT_BUDGET
    for refusal in (answers[ACCOUNT_BUDGET], right):
        assert refusal.status_code == 429
        assert refusal.headers["ratelimit-policy"] == (
            f'"sign_in_failures";q={ACCOUNT_BUDGET};w={WINDOW_S}'
        )
