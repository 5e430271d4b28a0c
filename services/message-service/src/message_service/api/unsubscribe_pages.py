"""The pages the e-mails' unsubscribe link shows: a whole HTML document each, escaped, which holds
a credential in its URL and is therefore neither cached, nor indexed, nor sent as a Referer."""

from __future__ import annotations

import html

from fastapi.responses import HTMLResponse

from herald_shared.unsubscribe import InvalidUnsubscribeToken

PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Robots-Tag": "noindex",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'",
}


def page(title: str, body: str, *, status_code: int = 200) -> HTMLResponse:
    """`body` is HTML: whoever builds it escapes what goes in."""
    document = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title></head>"
        '<body style="font-family: sans-serif; max-width: 32em; margin: 3em auto;">'
        f"<h1>{html.escape(title)}</h1>{body}</body></html>\n"
    )
    return HTMLResponse(document, status_code=status_code, headers=PAGE_HEADERS)


def confirmation(action: str) -> HTMLResponse:
    """The form that asks before changing anything, posting to `action` (a relative URL)."""
    return page(
        "Turn off e-mail notifications?",
        f'<form method="post" action="{html.escape(action)}">'
        '<input type="hidden" name="List-Unsubscribe" value="One-Click">'
        '<button type="submit">Turn off e-mail notifications</button></form>'
        "<p>Push and in-app notifications stay as they are.</p>",
    )


def refused(error: InvalidUnsubscribeToken) -> HTMLResponse:
    reason = html.escape(error.reason[:1].upper() + error.reason[1:])
    return page(
        "Link not valid",
        f"<p>{reason}. Nothing was changed. You can turn e-mail notifications off in your"
        " Herald settings.</p>",
        status_code=400,
    )


def done() -> HTMLResponse:
    return page(
        "E-mail notifications are off",
        "<p>You will get no more e-mail notifications. You can turn them on again in your"
        " Herald settings.</p>",
    )
