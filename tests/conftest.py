from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from herald_shared.database import make_engine, run_migrations
from tests.fakes.apns import FakeApns
from tests.fakes.fcm import FakeFcm
from tests.fakes.smtp import FakeSmtp
from tests.support import infra, parallel
from tests.support.parallel import (  # noqa: F401  (hooks: how the tests run in several processes)
    pytest_configure,
    pytest_runtest_logreport,
    pytest_testnodedown,
    pytest_xdist_auto_num_workers,
    pytest_xdist_make_scheduler,
)

TESTS = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The folder says what a test needs; the marker lets `-m "not integration and not e2e"`
    # select the fast, server-free layer, and `-m "not fault"` leave out the fault layer. The
    # containers layer needs the machine's servers too: `containers` and `integration`.
    for item in items:
        parts = Path(str(item.fspath)).relative_to(TESTS).parts
        if parts[0] in {"integration", "e2e", "fault", "containers"}:
            item.add_marker(getattr(pytest.mark, parts[0]))
        if parts[0] == "containers":
            item.add_marker(pytest.mark.integration)
    parallel.order(items)


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
    """An empty SQLite database in the test's temporary folder."""
    return f"sqlite+aiosqlite:///{tmp_path / 'service.db'}"


MIGRATIONS = {
    "message-service": "message_service:migrations",
    "notification-router": "notification_router:migrations",
    "push-sender": "push_sender:migrations",
    "email-sender": "email_sender:migrations",
}


@pytest.fixture(scope="session")
def migrated_sqlite(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """`migrated_sqlite(service)`: an SQLite file with that service's migrations applied (its
    real `run_migrations`, as at start-up), made once per session (per worker) on first use."""
    made: dict[str, Path] = {}
    lock = threading.Lock()

    async def migrate(path: Path, service: str) -> None:
        engine = make_engine(f"sqlite+aiosqlite:///{path}")
        try:
            await run_migrations(engine, script_location=MIGRATIONS[service], service_name=service)
        finally:
            await engine.dispose()  # the last connection closing folds the WAL into the file

    def template(service: str) -> Path:
        with lock:
            if service not in made:
                path = tmp_path_factory.mktemp("migrated") / f"{service}.db"
                # Its own thread and event loop: a test's loop may be running in this one.
                with ThreadPoolExecutor(1) as executor:
                    executor.submit(asyncio.run, migrate(path, service)).result()
                made[service] = path
            return made[service]

    return template


@pytest.fixture
def migrated_sqlite_url(
    migrated_sqlite: Callable[[str], Path], tmp_path: Path
) -> Callable[[str], str]:
    """`migrated_sqlite_url(service)`: a database of the test's own, already at that service's
    newest revision: a copy of `migrated_sqlite(service)` in the test's temporary folder. The
    service's start-up still runs its migrations, which find nothing to do."""

    def url(service: str) -> str:
        path = tmp_path / "service.db"
        shutil.copyfile(migrated_sqlite(service), path)
        return f"sqlite+aiosqlite:///{path}"

    return url


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
