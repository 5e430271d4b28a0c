"""The load generator's registration speaks both account APIs: with a password (today's) and
without (a version from before accounts, which `--compare` can run)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from bench.load import api_session, register_account

ACCOUNT = {"username": "b_1", "display_name": "Bench User 1", "email": "user1@bench.example"}


def users_endpoint(*, takes_password: bool, bodies: list[dict[str, Any]]) -> web.Application:
    """`POST /users` as one version answers it: the user with a token, or FastAPI's 422 for a
    field the model forbids."""

    async def register(request: web.Request) -> web.Response:
        body = await request.json()
        bodies.append(body)
        if "password" in body and not takes_password:
            detail = [{"type": "extra_forbidden", "loc": ["body", "password"]}]
            return web.json_response({"detail": detail}, status=422)
        if "email" not in body:
            detail = [{"type": "missing", "loc": ["body", "email"]}]
            return web.json_response({"detail": detail}, status=422)
        return web.json_response(
            {"id": "1", "username": body["username"], "token": "t"}, status=201
        )

    app = web.Application()
    app.router.add_post("/users", register)
    return app


@pytest.fixture
async def serve() -> AsyncIterator[Any]:
    servers: list[TestServer] = []

    async def started(app: web.Application) -> str:
        server = TestServer(app)
        await server.start_server()
        servers.append(server)
        return str(server.make_url(""))

    yield started
    for server in servers:
        await server.close()


@pytest.mark.parametrize("takes_password", [True, False])
async def test_registers_with_a_password_or_without_where_the_api_forbids_one(
    serve: Any, takes_password: bool
) -> None:
    bodies: list[dict[str, Any]] = []
    base_url = await serve(users_endpoint(takes_password=takes_password, bodies=bodies))

    async with api_session([base_url], connections=1) as session:
        user = await register_account(session, dict(ACCOUNT), password="secret")

    assert user == {"id": "1", "username": "b_1", "token": "t"}
    with_password = {**ACCOUNT, "password": "secret"}
    assert bodies == ([with_password] if takes_password else [with_password, ACCOUNT])


async def test_another_refusal_stops_the_set_up_with_its_reason(serve: Any) -> None:
    bodies: list[dict[str, Any]] = []
    base_url = await serve(users_endpoint(takes_password=True, bodies=bodies))
    no_email = {key: value for key, value in ACCOUNT.items() if key != "email"}

    async with api_session([base_url], connections=1) as session:
        with pytest.raises(RuntimeError, match="register: HTTP 422") as refused:
            await register_account(session, no_email, password="secret")

    assert "email" in str(refused.value)
    assert bodies == [{**no_email, "password": "secret"}]  # not tried again without it
