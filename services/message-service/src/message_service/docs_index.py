"""The documentation index message-service serves: every service's AsyncAPI page, and this
service's HTTP API. A plain page with no script and nothing loaded from anywhere."""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass

from herald_shared.asyncapi_docs import ASYNCAPI_JSON_PATH, ASYNCAPI_PATH

DOCS_INDEX_PATH = "/docs/services"


@dataclass(frozen=True)
class ServiceDocs:
    """A service and where the reader's browser reaches it ("" for this service's own origin)."""

    name: str
    base_url: str
    description: str

    @property
    def asyncapi_url(self) -> str:
        return f"{self.base_url}{ASYNCAPI_PATH}"

    @property
    def asyncapi_json_url(self) -> str:
        return f"{self.base_url}{ASYNCAPI_JSON_PATH}"


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Herald documentation</title>
<link rel="icon" href="data:,">
<style>
body {{ font-family: ui-sans-serif, system-ui, sans-serif; line-height: 1.5; margin: 2rem auto;
  max-width: 48rem; padding: 0 1rem; color: #1f2937; }}
li {{ margin-bottom: 0.75rem; }}
.what {{ color: #4b5563; }}
</style>
</head>
<body>
<h1>Herald documentation</h1>
<h2>Events (AsyncAPI)</h2>
<ul>
{services}
</ul>
<h2>HTTP API of message-service (OpenAPI)</h2>
<ul>
<li><a href="/openapi.json">OpenAPI document</a> (JSON)</li>
<li><a href="/docs">Swagger UI</a> and <a href="/redoc">ReDoc</a></li>
</ul>
</body>
</html>
"""

_SERVICE = """<li><a href="{page}">{name}</a> (<a href="{document}">JSON</a>)
  <div class="what">{description}</div></li>"""


def docs_index_html(services: Sequence[ServiceDocs]) -> str:
    items = "\n".join(
        _SERVICE.format(
            page=html.escape(service.asyncapi_url),
            document=html.escape(service.asyncapi_json_url),
            name=html.escape(service.name),
            description=html.escape(service.description),
        )
        for service in services
    )
    return _PAGE.format(services=items)


def herald_services(
    *, notification_router_url: str, push_sender_url: str, email_sender_url: str
) -> list[ServiceDocs]:
    """The four services, message-service first (on this page's own origin)."""
    return [
        ServiceDocs(
            "message-service",
            "",
            "Publishes every stored chat message and every user change; consumes device "
            "invalidations.",
        ),
        ServiceDocs(
            "notification-router",
            notification_router_url,
            "Turns new messages into push and e-mail jobs; follows the delivery reports.",
        ),
        ServiceDocs(
            "push-sender",
            push_sender_url,
            "Sends push jobs (FCM, APNs, Web Push); reports outcomes and dead device tokens.",
        ),
        ServiceDocs(
            "email-sender",
            email_sender_url,
            "Sends e-mail jobs; reports outcomes.",
        ),
    ]
