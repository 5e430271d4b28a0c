from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.fakes.apns import FakeApns
from tests.fakes.fcm import FakeFcm
from tests.fakes.smtp import FakeSmtp
from tests.support import infra

TESTS = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The folder says what a test needs; the marker lets `-m "not integration and not e2e"`
    # select the fast, server-free layer.
    for item in items:
        parts = Path(str(item.fspath)).relative_to(TESTS).parts
        if parts[0] in {"integration", "e2e"}:
            item.add_marker(getattr(pytest.mark, parts[0]))


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    """A fresh PostgreSQL database on the machine's server, dropped afterwards."""
    url = await infra.create_database()
    try:
        yield url
    finally:
        await infra.drop_database(url)


@pytest.fixture
def rabbit_url() -> Iterator[str]:
    """A fresh RabbitMQ virtual host on the machine's server, deleted afterwards."""
    url = infra.create_vhost()
    try:
        yield url
    finally:
        infra.delete_vhost(url)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'service.db'}"


@pytest.fixture
def fcm() -> Iterator[FakeFcm]:
    """A local server speaking FCM HTTP v1, OAuth token exchange included."""
    with FakeFcm() as fake:
        yield fake


@pytest.fixture
def credentials(fcm: FakeFcm, tmp_path: Path) -> Path:
    """A service-account file whose key and token_uri the fake FCM server knows."""
    return fcm.write_credentials(tmp_path / "fcm-service-account.json")


@pytest.fixture
def apns() -> Iterator[FakeApns]:
    """A local server speaking the APNs provider API over HTTP/2, verifying provider tokens."""
    with FakeApns() as fake:
        yield fake


@pytest.fixture
def apns_key(apns: FakeApns, tmp_path: Path) -> Path:
    """A `.p8` signing key whose public half (and key id `apns.key_id`) the fake APNs knows."""
    return apns.write_key(tmp_path / "AuthKey.p8")


@pytest.fixture
def smtp() -> Iterator[FakeSmtp]:
    """A local SMTP server (aiosmtpd) that records what it receives."""
    with FakeSmtp() as fake:
        yield fake
