"""The link of the e-mails' List-Unsubscribe header.

No bearer token here: the signed, expiring token in the link is the credential, and it names the
one user whose e-mail notifications it turns off (herald_shared.unsubscribe). GET only shows a
confirmation form, because mail scanners and link previews open links; the change is a POST:
RFC 8058's one-click request from the mail client, or that form.
"""

from __future__ import annotations

import re
from typing import Annotated, Any
from urllib.parse import parse_qs, urlencode

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse

from herald_shared.events import utc_now
from herald_shared.unsubscribe import InvalidUnsubscribeToken
from message_service import service
from message_service.api import unsubscribe_pages
from message_service.api.deps import Anonymous, SessionDep, Tokens

# Links from e-mails, followed without a token: the IP's budget for anonymous calls.
router = APIRouter(tags=["unsubscribe"], dependencies=[Anonymous])

UnsubscribeToken = Annotated[
    str, Query(max_length=200, description="The signed token from the e-mail's link.")
]

_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/html": {}}},
    400: {"description": "Malformed, forged or expired link", "content": {"text/html": {}}},
}
# The form field of a multipart/form-data body (RFC 7578), its value on the line after the blank
# one that ends its headers.
_MULTIPART_ONE_CLICK = re.compile(
    rb'name="List-Unsubscribe"\r?\n(?:[^\r\n]+\r?\n)*\r?\nOne-Click\r?\n'
)


def is_one_click(content_type: str, body: bytes) -> bool:
    """Whether a POST body carries RFC 8058's `List-Unsubscribe=One-Click`, form-urlencoded or
    multipart/form-data (the two encodings the RFC allows)."""
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type == "application/x-www-form-urlencoded":
        fields = parse_qs(body.decode("latin-1"), keep_blank_values=True)
        return fields.get("List-Unsubscribe") == ["One-Click"]
    if media_type == "multipart/form-data":
        return _MULTIPART_ONE_CLICK.search(body) is not None
    return False


@router.get("/unsubscribe", response_class=HTMLResponse, responses=_RESPONSES)
async def unsubscribe_page(token: UnsubscribeToken, tokens: Tokens) -> HTMLResponse:
    """The e-mail's unsubscribe link, opened in a browser: a confirmation form. Changes nothing."""
    try:
        tokens.verify(token, now=utc_now())
    except InvalidUnsubscribeToken as exc:
        return unsubscribe_pages.refused(exc)
    return unsubscribe_pages.confirmation(f"unsubscribe?{urlencode({'token': token})}")


@router.post(
    "/unsubscribe",
    response_class=HTMLResponse,
    responses=_RESPONSES,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/x-www-form-urlencoded": {"example": "List-Unsubscribe=One-Click"}
            },
        }
    },
)
async def unsubscribe(
    request: Request, token: UnsubscribeToken, tokens: Tokens, session: SessionDep
) -> HTMLResponse:
    """RFC 8058 one-click unsubscribe (body `List-Unsubscribe=One-Click`): turns the link's
    user's e-mail notifications off and publishes `user.updated`. Repeating it changes nothing."""
    try:
        user_id = tokens.verify(token, now=utc_now())
    except InvalidUnsubscribeToken as exc:
        return unsubscribe_pages.refused(exc)
    if not is_one_click(request.headers.get("content-type", ""), await request.body()):
        return unsubscribe_pages.refused(
            InvalidUnsubscribeToken("the request lacks List-Unsubscribe=One-Click")
        )
    await service.turn_email_off(session=session, user_id=user_id)
    return unsubscribe_pages.done()
