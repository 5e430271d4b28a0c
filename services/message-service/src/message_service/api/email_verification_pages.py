"""The pages of the link in the verification e-mail: like the unsubscribe link's (whole HTML
documents, escaped, never cached, indexed or sent as a Referer, since their URL holds a
credential), and a GET never verifies: mail scanners and link previews open links, so only the
button's POST does."""

from __future__ import annotations

import html

from fastapi.responses import HTMLResponse

from message_service.api.unsubscribe_pages import page
from message_service.email_verification import InvalidVerificationToken


def confirmation(action: str) -> HTMLResponse:
    """The form that asks before verifying, posting to `action` (a relative URL)."""
    return page(
        "Confirm your e-mail address?",
        f'<form method="post" action="{html.escape(action)}">'
        '<button type="submit">Confirm my e-mail address</button></form>'
        "<p>Herald sends e-mail notifications only to addresses confirmed by their owner. If you"
        " did not register with Herald, ignore this page: nothing will be sent to you.</p>",
    )


def refused(error: InvalidVerificationToken) -> HTMLResponse:
    reason = html.escape(error.reason[:1].upper() + error.reason[1:])
    return page(
        "Link not valid",
        f"<p>{reason}. Nothing was changed. You can ask for a new link in your Herald"
        " settings.</p>",
        status_code=400,
    )


def already() -> HTMLResponse:
    return page("Address already confirmed", "<p>Your e-mail address is already confirmed.</p>")


def done() -> HTMLResponse:
    return page(
        "Address confirmed",
        "<p>Thank you: your e-mail address is confirmed, and Herald's e-mail notifications"
        " reach it from now on.</p>",
    )
