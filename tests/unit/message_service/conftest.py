from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI

from message_service.app import Runtime, runtime_of
from tests.unit.message_service.helpers import client_for, make_settings, running_app


@pytest.fixture
async def app(sqlite_url: str) -> AsyncIterator[FastAPI]:
    async with running_app(make_settings(sqlite_url)) as app:
        yield app


@pytest.fixture
def runtime(app: FastAPI) -> Runtime:
    return runtime_of(app)


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(app) as client:
        yield client
