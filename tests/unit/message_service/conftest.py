from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from fastapi import FastAPI

from message_service.app import MessageService, service_of
from tests.unit.message_service.helpers import client_for, make_settings, running_app


@pytest.fixture
def sqlite_url(migrated_sqlite_url: Callable[[str], str]) -> str:
    """A database of the test's own, already migrated (a copy of one migrated per session):
    message-service's migrations rebuild tables on SQLite, the largest part of an app's start-up
    here. `test_app.py` checks the migrated schema against the models."""
    return migrated_sqlite_url("message-service")


@pytest.fixture
async def app(sqlite_url: str) -> AsyncIterator[FastAPI]:
    async with running_app(make_settings(sqlite_url)) as app:
        yield app


@pytest.fixture
def runtime(app: FastAPI) -> MessageService:
    return service_of(app)


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(app) as client:
        yield client
