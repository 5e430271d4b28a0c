"""Every service's AsyncAPI page, served with the AsyncAPI React component from the service itself.

FastStream's page loads the component's script and style from a CDN (and its favicons from
asyncapi.com), so it is blank without the internet. This one loads only the files vendored in
`static/asyncapi/` (see the README there), from the service that serves the page, and has no
try-it-out plugin: that would let anyone publish onto the bus.
"""

from __future__ import annotations

import functools
import html
import json
from importlib.resources import files
from typing import Any

from faststream.asgi import AsgiResponse, get
from faststream.asgi.types import ASGIApp, Scope
from faststream.specification.base import SpecificationFactory

ASYNCAPI_PATH = "/docs/asyncapi"
ASYNCAPI_JSON_PATH = f"{ASYNCAPI_PATH}.json"
# The version of `@asyncapi/react-component` vendored in static/asyncapi: the one FastStream's
# own page asks the CDN for (a unit test keeps them equal).
ASYNCAPI_COMPONENT_VERSION = "3.1.5"
# The version is in the path so that browsers may cache the files for good.
ASSETS_PATH = f"{ASYNCAPI_PATH}/assets/{ASYNCAPI_COMPONENT_VERSION}"
SCRIPT = "index.js"
STYLESHEET = "default.min.css"
ASSET_MEDIA_TYPES = {
    SCRIPT: "text/javascript; charset=utf-8",
    STYLESHEET: "text/css; charset=utf-8",
}
ASSET_CACHE_CONTROL = "public, max-age=31536000, immutable"

# What the component shows: everything FastStream's page shows.
_COMPONENT_CONFIG = {
    "show": {
        "sidebar": True,
        "info": True,
        "servers": True,
        "operations": True,
        "messages": True,
        "schemas": True,
        "errors": True,
    },
    "expand": {"messageExamples": True},
    "sidebar": {"showServers": "byDefault", "showOperations": "byDefault"},
}

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title} AsyncAPI</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="{stylesheet}">
<style>
html {{
  font-family: ui-sans-serif, system-ui, -apple-system, BlinkMacSystemFont, "Segoe UI", Roboto,
    "Helvetica Neue", Arial, "Noto Sans", sans-serif;
  line-height: 1.5;
}}
</style>
</head>
<body>
<div id="asyncapi"></div>
<script src="{script}"></script>
<script>
window.AsyncApiStandalone.render({props}, document.getElementById("asyncapi"));
</script>
</body>
</html>
"""


def asset_url(name: str) -> str:
    return f"{ASSETS_PATH}/{name}"


@functools.cache
def asset(name: str) -> bytes:
    """The content of a vendored file, one of `ASSET_MEDIA_TYPES` (KeyError for any other name:
    this is never a lookup of a path a request chose)."""
    if name not in ASSET_MEDIA_TYPES:
        raise KeyError(name)
    return (files("herald_shared") / "static" / "asyncapi" / name).read_bytes()


def asset_headers(name: str) -> dict[str, str]:
    return {"content-type": ASSET_MEDIA_TYPES[name], "cache-control": ASSET_CACHE_CONTROL}


def _script_json(value: Any) -> str:
    """JSON that is safe inside a <script> element: no `</script>`, `<!--` or `&` in the text
    of a description can end the element or change how it is parsed."""
    text = json.dumps(value, ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def asyncapi_html(title: str, document_json: str) -> str:
    """The page rendering `document_json` (an AsyncAPI document as JSON text)."""
    props = {"schema": document_json, "config": _COMPONENT_CONFIG}
    return _PAGE.format(
        title=html.escape(title),
        stylesheet=asset_url(STYLESHEET),
        script=asset_url(SCRIPT),
        props=_script_json(props),
    )


def asyncapi_routes(specification: SpecificationFactory) -> list[tuple[str, ASGIApp]]:
    """For a FastStream ASGI app: the page, the document as JSON and the component's files."""

    @functools.cache
    def rendered() -> tuple[bytes, bytes]:
        # Once, on the first request: the document is complete only once every subscriber and
        # publisher is declared.
        document = specification.to_specification()
        return asyncapi_html(
            document.title, document.to_json()
        ).encode(), document.to_json().encode()

    @get(include_in_schema=False)
    async def page(scope: Scope) -> AsgiResponse:
        return AsgiResponse(
            rendered()[0], 200, headers={"content-type": "text/html; charset=utf-8"}
        )

    @get(include_in_schema=False)
    async def document(scope: Scope) -> AsgiResponse:
        return AsgiResponse(rendered()[1], 200, headers={"content-type": "application/json"})

    def asset_route(name: str) -> ASGIApp:
        @get(include_in_schema=False)
        async def serve_asset(scope: Scope) -> AsgiResponse:
            return AsgiResponse(asset(name), 200, headers=asset_headers(name))

        return serve_asset

    routes: list[tuple[str, ASGIApp]] = [(ASYNCAPI_PATH, page), (ASYNCAPI_JSON_PATH, document)]
    routes += [(asset_url(name), asset_route(name)) for name in ASSET_MEDIA_TYPES]
    return routes
