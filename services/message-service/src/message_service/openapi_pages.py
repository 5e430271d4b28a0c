"""Swagger UI (`/docs`) and ReDoc (`/redoc`) with their scripts and style served from here.

FastAPI's own pages load them from a CDN (and ReDoc its fonts from Google), so they are blank
without the internet. These load only the files vendored in `static/openapi/` (see the README
there), like the AsyncAPI page (`herald_shared.asyncapi_docs`).
"""

from __future__ import annotations

import functools
from importlib.resources import files

from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse

SWAGGER_UI_VERSION = "5.35.0"
REDOC_VERSION = "2.5.4"
# The versions are in the path so that browsers may cache the files for good.
ASSETS_PATH = f"/docs/openapi/assets/swagger-ui-{SWAGGER_UI_VERSION}-redoc-{REDOC_VERSION}"
SWAGGER_SCRIPT = "swagger-ui-bundle.js"
SWAGGER_STYLESHEET = "swagger-ui.css"
REDOC_SCRIPT = "redoc.standalone.js"
ASSET_MEDIA_TYPES = {
    SWAGGER_SCRIPT: "text/javascript; charset=utf-8",
    SWAGGER_STYLESHEET: "text/css; charset=utf-8",
    REDOC_SCRIPT: "text/javascript; charset=utf-8",
}
ASSET_CACHE_CONTROL = "public, max-age=31536000, immutable"
# No favicon request leaves the page.
_NO_FAVICON = "data:,"


def asset_url(name: str) -> str:
    return f"{ASSETS_PATH}/{name}"


@functools.cache
def asset(name: str) -> bytes:
    """The content of a vendored file, one of `ASSET_MEDIA_TYPES` (KeyError for any other name:
    this is never a lookup of a path a request chose)."""
    if name not in ASSET_MEDIA_TYPES:
        raise KeyError(name)
    return (files("message_service") / "static" / "openapi" / name).read_bytes()


def asset_headers(name: str) -> dict[str, str]:
    return {"content-type": ASSET_MEDIA_TYPES[name], "cache-control": ASSET_CACHE_CONTROL}


def swagger_ui_page(title: str, openapi_url: str) -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url=openapi_url,
        title=f"{title} - Swagger UI",
        swagger_js_url=asset_url(SWAGGER_SCRIPT),
        swagger_css_url=asset_url(SWAGGER_STYLESHEET),
        swagger_favicon_url=_NO_FAVICON,
        # Swagger UI would send the document to an online validator for its badge.
        swagger_ui_parameters={"validatorUrl": None},
    )


def redoc_page(title: str, openapi_url: str) -> HTMLResponse:
    return get_redoc_html(
        openapi_url=openapi_url,
        title=f"{title} - ReDoc",
        redoc_js_url=asset_url(REDOC_SCRIPT),
        redoc_favicon_url=_NO_FAVICON,
        with_google_fonts=False,
    )
