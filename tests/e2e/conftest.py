"""The four services as processes on the machine's PostgreSQL and RabbitMQ, with local FCM and
SMTP servers: the `pipeline` the end-to-end tests post to."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.fakes.fcm import FakeFcm
from tests.fakes.smtp import FakeSmtp
from tests.support import infra
from tests.support.processes import SERVICES, ServiceProcess, running_services, service_env


@dataclass
class Pipeline:
    services: dict[str, ServiceProcess]
    databases: dict[str, str]
    fcm: FakeFcm
    smtp: FakeSmtp

    @property
    def api(self) -> str:
        return self.services["message-service"].base_url

    async def invitations_sent(self, count: int) -> tuple[int, int]:
        """Wait until `count` invitations were decided and their deliveries all reported
        delivered; how many pushes and e-mails the fakes hold then (the workload's come after)."""

        async def sent() -> bool:
            router_db = self.databases["notification-router"]
            return await infra.invitations_delivered(router_db) == count

        await infra.wait_until(sent, timeout=60, interval=0.05)
        return len(self.fcm.accepted), len(self.smtp.received)


@pytest.fixture
async def pipeline(
    rabbit_url: str, fcm: FakeFcm, smtp: FakeSmtp, credentials: Path, tmp_path: Path
) -> AsyncIterator[Pipeline]:
    async with started_pipeline(rabbit_url, fcm, smtp, credentials, tmp_path) as pipeline:
        yield pipeline


@contextlib.asynccontextmanager
async def started_pipeline(
    rabbit_url: str,
    fcm: FakeFcm,
    smtp: FakeSmtp,
    credentials: Path,
    tmp_path: Path,
    overrides: Mapping[str, str] | None = None,
) -> AsyncIterator[Pipeline]:
    """The four services on fresh databases; `overrides`: settings for all of them."""
    databases = {name: await infra.create_database() for name in SERVICES}
    environments = service_env(
        rabbit_url=rabbit_url,
        databases=databases,
        fcm=fcm,
        credentials=credentials,
        smtp=smtp,
        overrides=overrides,
    )
    try:
        # Leaving the block stops every service and asserts a clean exit (a graceful drain).
        async with running_services(environments, tmp_path) as services:
            yield Pipeline(services, databases, fcm, smtp)
    finally:
        for url in databases.values():
            await infra.drop_database(url)


class Person:
    """A registered user with one FCM device, as the end-to-end tests drive them."""

    def __init__(self, user: dict[str, str], device_token: str) -> None:
        self.id = user["id"]
        self.username = user["username"]
        self.token = user["token"]
        self.auth = {"Authorization": f"Bearer {user['token']}"}
        self.device_token = device_token


async def register_person(
    client: httpx.AsyncClient,
    name: str,
    *,
    levels: dict[str, str] | None = None,
    email_delay: int = 0,
) -> Person:
    """Register `name` (e-mail `<name>@example.test`) with an FCM device; `levels`: their
    notification levels (None: a new user's defaults, DMs and mentions); `email_delay`: 0 (not
    a new user's two minutes), so that a test sees each e-mail at once unless it is about
    waiting."""
    response = await client.post(
        "/users",
        json={
            "username": name,
            "display_name": name.title(),
            "email": f"{name}@example.test",
            "password": "correct horse battery",
        },
    )
    assert response.status_code == 201, response.text
    person = Person(response.json(), f"device-{name}-{uuid.uuid4().hex}")
    device = await client.post(
        "/users/me/devices",
        json={"platform": "fcm", "token": person.device_token},
        headers=person.auth,
    )
    assert device.status_code == 201, device.text
    preferences = {**(levels or {}), "email_delay": email_delay}
    answer = await client.put("/users/me/preferences", json=preferences, headers=person.auth)
    assert answer.status_code == 200, answer.text
    return person
