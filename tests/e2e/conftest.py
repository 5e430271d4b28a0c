"""The four services as processes on the machine's PostgreSQL and RabbitMQ, with local FCM and
SMTP servers: the `pipeline` the end-to-end tests post to."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

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
    databases = {name: await infra.create_database() for name in SERVICES}
    environments = service_env(
        rabbit_url=rabbit_url, databases=databases, fcm=fcm, credentials=credentials, smtp=smtp
    )
    try:
        # Leaving the block stops every service and asserts a clean exit (a graceful drain).
        async with running_services(environments, tmp_path) as services:
            yield Pipeline(services, databases, fcm, smtp)
    finally:
        for url in databases.values():
            await infra.drop_database(url)
