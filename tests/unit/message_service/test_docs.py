"""message-service's documentation: its AsyncAPI page served offline, and the index of all four."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from html.parser import HTMLParser

import httpx
import pytest
from pydantic import ValidationError

from herald_shared.asyncapi_docs import ASSET_MEDIA_TYPES, ASYNCAPI_PATH, asset, asset_url
from message_service import openapi_pages
from message_service.app import create_app
from message_service.docs_index import DOCS_INDEX_PATH, ServiceDocs, docs_index_html
from tests.unit.message_service.helpers import client_for, make_settings

HTTP_URL = re.compile(r"https?://([^/\s\"'<>:]+)")


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        href = dict(attrs).get("href")
        if tag == "a" and href is not None:
            self.hrefs.append(href)


def links(page: str) -> list[str]:
    parser = _Links()
    parser.feed(page)
    return parser.hrefs


@pytest.fixture
async def client(sqlite_url: str) -> AsyncIterator[httpx.AsyncClient]:
    settings = make_settings(
        sqlite_url,
        notification_router_docs_url="http://router.internal:8001/",
        push_sender_docs_url="https://push.example.org",
    )
    async with client_for(create_app(settings)) as opened:
        yield opened


async def test_the_index_links_every_service_and_the_http_api(client: httpx.AsyncClient) -> None:
    response = await client.get(DOCS_INDEX_PATH)

    assert response.status_code == 200
    hrefs = links(response.text)
    assert {
        ASYNCAPI_PATH,
        f"http://router.internal:8001{ASYNCAPI_PATH}",
        f"https://push.example.org{ASYNCAPI_PATH}",
        f"http://127.0.0.1:8003{ASYNCAPI_PATH}",
        "/openapi.json",
        "/docs",
    } <= set(hrefs)
    # A page of links: it loads nothing itself.
    assert "<script" not in response.text
    assert 'rel="stylesheet"' not in response.text


async def test_the_asyncapi_page_and_its_component_are_served_here(
    client: httpx.AsyncClient,
) -> None:
    page = await client.get(ASYNCAPI_PATH)

    assert page.status_code == 200
    assert set(HTTP_URL.findall(page.text)) == set()
    for name, media_type in ASSET_MEDIA_TYPES.items():
        assert asset_url(name) in page.text
        served = await client.get(asset_url(name))
        assert served.status_code == 200
        assert served.headers["content-type"] == media_type
        assert served.content == asset(name)


async def test_the_docs_stay_out_of_the_openapi_document(client: httpx.AsyncClient) -> None:
    paths = (await client.get("/openapi.json")).json()["paths"]

    assert not [path for path in paths if path.startswith("/docs")]


def test_names_and_descriptions_are_escaped() -> None:
    page = docs_index_html([ServiceDocs("<b>x</b>", 'http://h/"onclick="x', "a & b")])

    assert "<b>x</b>" not in page
    assert "&lt;b&gt;x&lt;/b&gt;" in page
    assert 'href="http://h/&quot;onclick=&quot;x/docs/asyncapi"' in page
    assert "a &amp; b" in page


@pytest.mark.parametrize("url", ["ftp://router:8001", "router:8001", "http://", "/relative"])
def test_a_docs_url_must_be_an_http_base_url(sqlite_url: str, url: str) -> None:
    with pytest.raises(ValidationError):
        make_settings(sqlite_url, email_sender_docs_url=url)


@pytest.mark.parametrize(
    ("page", "names"),
    [
        ("/docs", [openapi_pages.SWAGGER_SCRIPT, openapi_pages.SWAGGER_STYLESHEET]),
        ("/redoc", [openapi_pages.REDOC_SCRIPT]),
    ],
)
async def test_swagger_ui_and_redoc_load_their_files_from_here(
    client: httpx.AsyncClient, page: str, names: list[str]
) -> None:
    response = await client.get(page)

    assert response.status_code == 200
    assert set(HTTP_URL.findall(response.text)) == set()
    for name in names:
        assert openapi_pages.asset_url(name) in response.text
        served = await client.get(openapi_pages.asset_url(name))
        assert served.status_code == 200
        assert served.headers["content-type"] == openapi_pages.ASSET_MEDIA_TYPES[name]
        assert served.content == openapi_pages.asset(name)
