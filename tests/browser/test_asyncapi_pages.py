"""Every service's AsyncAPI page renders offline in a real browser (Debian's headless Chromium).

The four services run in this process, each behind its own uvicorn on loopback, without their
lifespans: serving the documentation needs no broker and no database. Chromium can resolve no
host but 127.0.0.1, as on a machine without the internet; the page must still show every
channel, message and schema of the service's own document, without any request leaving
loopback. A screenshot of each page is kept in `.herald/artifacts/asyncapi-<service>.png`.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import Browser, Page, Request, sync_playwright

from email_sender.app import create_app as create_email_app
from email_sender.settings import Settings as EmailSettings
from herald_shared.asyncapi_docs import ASYNCAPI_JSON_PATH, ASYNCAPI_PATH
from herald_shared.broker import RabbitSettings
from message_service.app import create_app as create_message_app
from message_service.docs_index import DOCS_INDEX_PATH
from message_service.settings import Settings as MessageSettings
from notification_router.app import create_app as create_router_app
from notification_router.settings import Settings as RouterSettings
from push_sender.app import create_app as create_push_app
from push_sender.settings import Settings as PushSettings
from tests.fakes.served import ServedApp

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / ".herald" / "artifacts"
LOOPBACK = "127.0.0.1"
# Nothing listens there; the apps' lifespans never run, so nothing tries.
CLOSED_RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:1/"
IN_MEMORY_DB = "sqlite+aiosqlite:///:memory:"
TEST_SECRET = "browser-test-unsubscribe-secret-0123456789"
SERVICES = ("message-service", "notification-router", "push-sender", "email-sender")
RENDER_TIMEOUT_MS = 30_000
CHROMIUM_ARGS = [
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # Offline, as far as the page can tell: every name but loopback fails to resolve.
    f"--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE {LOOPBACK}",
]


def chromium_path() -> str:
    """Debian's chromium; skipped without it on a developer's machine, failed in CI (`CI` set),
    whose `.ci/run` installs it, so that CI cannot pass without running these tests."""
    found = shutil.which("chromium") or (
        "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None
    )
    if found is None:
        reason = (
            "Debian's chromium is not installed (`apt-get install chromium`); "
            ".ci/run installs it for CI"
        )
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser tests: {reason}")
        pytest.skip(reason)
    return found


# --- the services, served on loopback -----------------------------------------------------------


def _rabbitmq() -> RabbitSettings:
    return RabbitSettings(url=CLOSED_RABBITMQ_URL)


def _consumer_apps() -> dict[str, Callable[[], Any]]:
    return {
        "notification-router": lambda: create_router_app(
            RouterSettings(rabbitmq=_rabbitmq(), database_url=IN_MEMORY_DB)
        ),
        "push-sender": lambda: create_push_app(
            PushSettings(rabbitmq=_rabbitmq(), database_url=IN_MEMORY_DB)
        ),
        "email-sender": lambda: create_email_app(
            EmailSettings(
                rabbitmq=_rabbitmq(),
                database_url=IN_MEMORY_DB,
                unsubscribe_secret=TEST_SECRET,
            )
        ),
    }


@pytest.fixture(scope="module")
def served() -> Iterator[dict[str, ServedApp]]:
    """The four services; message-service's index links the other three where they run."""
    apps: dict[str, ServedApp] = {}
    try:
        for name, make in _consumer_apps().items():
            apps[name] = ServedApp(make(), name)
        message_app = create_message_app(
            MessageSettings(
                rabbitmq=_rabbitmq(),
                database_url=IN_MEMORY_DB,
                unsubscribe_secret=TEST_SECRET,
                notification_router_docs_url=apps["notification-router"].base_url,
                push_sender_docs_url=apps["push-sender"].base_url,
                email_sender_docs_url=apps["email-sender"].base_url,
            )
        )
        apps["message-service"] = ServedApp(message_app, "message-service")
        yield apps
    finally:
        for app in apps.values():
            app.stop()


# --- the browser ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = chromium_path()
    with sync_playwright() as playwright:
        # Never `playwright install`: Debian's build, as CI installs it.
        launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@dataclass
class PageWatch:
    """What a page asked for and what went wrong in it."""

    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def off_loopback(self) -> list[str]:
        return [url for url in self.requests if not _is_local(url)]


def _is_local(url: str) -> bool:
    parsed = urlsplit(url)
    return parsed.scheme in {"data", "about", "blob"} or parsed.hostname == LOOPBACK


@pytest.fixture
def page(browser: Browser) -> Iterator[tuple[Page, PageWatch]]:
    context = browser.new_context(viewport={"width": 1440, "height": 1000})
    watch = PageWatch()

    def on_request(request: Request) -> None:
        watch.requests.append(request.url)

    # Belt and braces: whatever is not loopback is refused here too (and recorded above).
    context.route(
        re.compile(r"^(?!https?://127\.0\.0\.1[:/]).*"),
        lambda route: route.abort("blockedbyclient"),
    )
    opened = context.new_page()
    opened.on("request", on_request)
    opened.on("pageerror", lambda error: watch.errors.append(f"page error: {error}"))
    opened.on(
        "console",
        lambda message: (
            watch.errors.append(f"console: {message.text}") if message.type == "error" else None
        ),
    )
    try:
        yield opened, watch
    finally:
        context.close()


# --- what the document says the page must show -------------------------------------------------


def expected_names(document: dict[str, Any]) -> set[str]:
    """Every channel (its name and its address), every message (its title or name) and every
    schema of an AsyncAPI 3 document."""
    names: set[str] = set()
    for channel_name, channel in document.get("channels", {}).items():
        names.add(channel_name)
        if channel.get("address"):
            names.add(channel["address"])
    components = document.get("components", {})
    for message_name, message in components.get("messages", {}).items():
        names.add(message.get("title") or message.get("name") or message_name)
    names.update(components.get("schemas", {}))
    return names


def rendered_title(page: Page) -> str:
    """The document's title as the component shows it, once it has rendered the page (the
    component's introduction section, then the messages, are the last parts to appear)."""
    page.locator("#asyncapi #messages").wait_for(timeout=RENDER_TIMEOUT_MS)
    title = page.locator("#asyncapi #introduction > div").first.inner_text()
    return title.replace("\u00a0", " ").strip()


@pytest.fixture
def report(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """A line on pytest's terminal, even with output captured (where the screenshots are)."""
    terminal: Any = request.config.pluginmanager.get_plugin("terminalreporter")
    capture: Any = request.config.pluginmanager.get_plugin("capturemanager")

    def write(line: str) -> None:
        if terminal is None or capture is None:
            return
        with capture.global_and_fixture_disabled():
            terminal.write_line(f"\n{line}")

    return write


def screenshot_path(service: str) -> Path:
    return ARTIFACTS / f"asyncapi-{service}.png"


_HTTP_URL = re.compile(r"https?://([^/\s\"'<>:]+)")


# --- the tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("service", SERVICES)
def test_asyncapi_page_renders_offline(
    service: str,
    served: dict[str, ServedApp],
    page: tuple[Page, PageWatch],
    report: Callable[[str], None],
) -> None:
    opened, watch = page
    base_url = served[service].base_url
    document = httpx.get(f"{base_url}{ASYNCAPI_JSON_PATH}", timeout=10).json()
    names = expected_names(document)
    assert document["channels"], f"{service} documents no channel"
    assert document["components"]["messages"], f"{service} documents no message"

    response = opened.goto(f"{base_url}{ASYNCAPI_PATH}", wait_until="load")
    assert response is not None
    assert response.ok
    hosts = set(_HTTP_URL.findall(response.text()))
    assert hosts <= {LOOPBACK}, f"the page names other hosts: {hosts}"
    assert rendered_title(opened) == f"{document['info']['title']} {document['info']['version']}"
    rendered = opened.inner_text("#asyncapi")

    missing = sorted(name for name in names if name not in rendered)
    assert not missing, f"{service}'s page does not show: {missing}"
    assert not watch.off_loopback(), f"requests left {LOOPBACK}: {watch.off_loopback()}"
    assert not watch.errors, watch.errors
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = screenshot_path(service)
    opened.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000  # a rendered page, not a blank one
    report(f"{service}: AsyncAPI page screenshot at {shot.relative_to(ROOT)}")


def test_index_links_every_service_page(
    served: dict[str, ServedApp], page: tuple[Page, PageWatch]
) -> None:
    opened, watch = page
    message_service = served["message-service"].base_url
    opened.goto(f"{message_service}{DOCS_INDEX_PATH}", wait_until="load")

    hrefs: list[str] = opened.eval_on_selector_all("a", "links => links.map(link => link.href)")
    expected = {f"{served[service].base_url}{ASYNCAPI_PATH}" for service in SERVICES}
    assert expected <= set(hrefs)
    assert f"{message_service}/openapi.json" in hrefs
    for service in SERVICES:
        opened.get_by_role("link", name=service, exact=True).click()
        assert rendered_title(opened).startswith(f"{service} ")
        assert opened.url == f"{served[service].base_url}{ASYNCAPI_PATH}"
        opened.go_back(wait_until="load")
    assert not watch.off_loopback(), f"requests left {LOOPBACK}: {watch.off_loopback()}"
    assert not watch.errors, watch.errors


REDOC_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"
BLOCKED = "console: Failed to load resource: net::ERR_BLOCKED_BY_CLIENT"


@pytest.mark.parametrize(
    ("path", "rendered"),
    [
        # Swagger UI: one block per operation; ReDoc: the operations in its side menu.
        ("/docs", ".opblock-summary-path"),
        ("/redoc", "li[data-item-id^='tag/']"),
    ],
)
def test_swagger_ui_and_redoc_render_offline(
    path: str, rendered: str, served: dict[str, ServedApp], page: tuple[Page, PageWatch]
) -> None:
    """message-service's HTTP API pages: every path of its OpenAPI document shown, with nothing
    loaded from anywhere but the service (FastAPI's own pages were blank offline)."""
    opened, watch = page
    base_url = served["message-service"].base_url
    document = httpx.get(f"{base_url}/openapi.json", timeout=10).json()

    response = opened.goto(f"{base_url}{path}", wait_until="load")
    assert response is not None
    assert response.ok
    opened.locator(rendered).first.wait_for(timeout=RENDER_TIMEOUT_MS)
    shown = opened.inner_text("body")

    if path == "/docs":
        missing = sorted(p for p in document["paths"] if p not in shown)
    else:
        missing = sorted(
            operation["summary"]
            for item in document["paths"].values()
            for operation in item.values()
            if operation["summary"] not in shown
        )
    assert not missing, f"{path} does not show: {missing}"
    # ReDoc 2 always asks for its vendor's logo (its side menu's footer, no option turns it
    # off) and hides it when that fails: the one request allowed to leave, and to fail.
    allowed = {REDOC_LOGO} if path == "/redoc" else set()
    left = [url for url in watch.off_loopback() if url not in allowed]
    assert not left, f"requests left {LOOPBACK}: {left}"
    errors = [error for error in watch.errors if not error.startswith(BLOCKED) or not allowed]
    assert not errors, errors
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / f"openapi{path.replace('/', '-')}.png"
    opened.screenshot(path=str(shot), full_page=False)
    assert shot.stat().st_size > 10_000  # a rendered page, not a blank one
