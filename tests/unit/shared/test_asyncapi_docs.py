"""The AsyncAPI page and its vendored component: served by every consumer service, no CDN."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator

import httpx
import pytest
from faststream.rabbit import RabbitBroker
from faststream.specification.asyncapi.site import (
    ASYNCAPI_CSS_DEFAULT_URL,
    ASYNCAPI_JS_DEFAULT_URL,
)
from prometheus_client import CollectorRegistry

from herald_shared.asyncapi_docs import (
    ASSET_MEDIA_TYPES,
    ASYNCAPI_COMPONENT_VERSION,
    ASYNCAPI_JSON_PATH,
    ASYNCAPI_PATH,
    SCRIPT,
    STYLESHEET,
    asset,
    asset_url,
    asyncapi_html,
)
from herald_shared.ops import consumer_app

HOSTILE_DESCRIPTION = "ends the script? </script><script>alert(1)</script> & <!-- too"
HTTP_URL = re.compile(r"https?://")


def test_the_vendored_component_is_the_version_faststream_asks_for() -> None:
    # FastStream's page loads these from a CDN: a FastStream upgrade that moves to another
    # version of the component means refreshing static/asyncapi (see its README).
    for url in (ASYNCAPI_JS_DEFAULT_URL, ASYNCAPI_CSS_DEFAULT_URL):
        assert f"@asyncapi/react-component@{ASYNCAPI_COMPONENT_VERSION}/" in url


def test_the_vendored_files_are_the_bundle_and_its_style() -> None:
    script = asset(SCRIPT)
    assert len(script) > 1_000_000
    assert b"AsyncApiStandalone" in script
    assert b".aui-root" in asset(STYLESHEET)


@pytest.mark.parametrize("name", ["LICENSE", "README.md", "../ops.py", "index.js/../LICENSE"])
def test_only_the_vendored_assets_are_served(name: str) -> None:
    with pytest.raises(KeyError):
        asset(name)


def test_the_page_loads_nothing_from_another_host() -> None:
    page = asyncapi_html("svc", json.dumps({"info": {"title": "svc", "version": "1"}}))

    assert not HTTP_URL.search(page)
    assert f'<script src="{asset_url(SCRIPT)}"></script>' in page
    assert f'<link rel="stylesheet" href="{asset_url(STYLESHEET)}">' in page
    assert "TryItPlugin" not in page


def test_document_text_cannot_break_out_of_the_script() -> None:
    document = json.dumps({"info": {"title": "svc", "description": HOSTILE_DESCRIPTION}})

    page = asyncapi_html("<svc>", document)

    assert page.count("</script>") == 2  # the two elements of the page itself
    assert "<!--" not in page
    assert "<title>&lt;svc&gt; AsyncAPI</title>" in page
    # The escapes are JSON's own: the component reads the description back unchanged.
    props = re.search(r"render\((.*), document\.getElementById", page, re.DOTALL)
    assert props is not None
    schema = json.loads(json.loads(props.group(1))["schema"])
    assert schema["info"]["description"] == HOSTILE_DESCRIPTION


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    broker = RabbitBroker("amqp://guest:guest@127.0.0.1:1/")

    @broker.subscriber("docs-test-queue", description="A queue for the page.")
    async def handle(body: str) -> None:
        return None

    app = consumer_app(
        broker,
        title="docs-test",
        version="1.2.3",
        description=HOSTILE_DESCRIPTION,
        registry=CollectorRegistry(),
        checks={},
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as opened:
        yield opened


async def test_a_consumer_service_serves_the_page_its_document_and_the_component(
    client: httpx.AsyncClient,
) -> None:
    page = await client.get(ASYNCAPI_PATH)
    document = await client.get(ASYNCAPI_JSON_PATH)

    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert not HTTP_URL.search(page.text)
    assert document.json()["info"]["description"] == HOSTILE_DESCRIPTION
    channels = document.json()["channels"].values()
    assert [channel["address"] for channel in channels] == ["docs-test-queue"]
    for name, media_type in ASSET_MEDIA_TYPES.items():
        served = await client.get(asset_url(name))
        assert served.status_code == 200
        assert served.headers["content-type"] == media_type
        assert "immutable" in served.headers["cache-control"]
        assert served.content == asset(name)


async def test_a_consumer_service_has_no_try_it_out(client: httpx.AsyncClient) -> None:
    response = await client.post(f"{ASYNCAPI_PATH}/try", json={})

    assert response.status_code in {404, 405}
