"""Verifying e-mail addresses: the link of the verification e-mail (`/verify-email`, without a
bearer token: its signed token is the credential) and asking for another one.

GET only shows a confirmation form (mail scanners and link previews open links); the POST of
that form verifies. A link is good for the one address it was sent to, until it expires
(`message_service.email_verification`).
"""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import HTMLResponse

from message_service import service
from message_service.api import email_verification_pages as pages
from message_service.api.deps import Anonymous, Me, SessionDep, Verification
from message_service.api.responses import CONFLICT
from message_service.email_verification import InvalidVerificationToken

# Links from e-mails, followed without a token: the IP's budget for anonymous calls.
links = APIRouter(tags=["email verification"], dependencies=[Anonymous])
# Asking for a link: the caller's own.
account = APIRouter(tags=["email verification"])

VerificationToken = Annotated[
    str, Query(max_length=200, description="The signed token from the e-mail's link.")
]

_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/html": {}}},
    400: {
        "description": "Malformed, forged or expired link, or one sent to an earlier address",
        "content": {"text/html": {}},
    },
}


@links.get("/verify-email", response_class=HTMLResponse, responses=_RESPONSES)
async def verification_page(
    token: VerificationToken, session: SessionDep, verification: Verification
) -> HTMLResponse:
    """The verification e-mail's link, opened in a browser: a confirmation form. Changes
    nothing."""
    try:
        checked = await service.check_verification_link(
            session=session, token=token, verification=verification
        )
    except InvalidVerificationToken as exc:
        return pages.refused(exc)
    if checked.already:
        return pages.already()
    return pages.confirmation(f"verify-email?{urlencode({'token': token})}")


@links.post("/verify-email", response_class=HTMLResponse, responses=_RESPONSES)
async def verify(
    token: VerificationToken, session: SessionDep, verification: Verification
) -> HTMLResponse:
    """Confirm the address the link was sent to (the form of the link's page): from now on it
    is e-mailed, and its bounces are forgotten. Repeating it changes nothing."""
    try:
        verified = await service.verify_email(
            session=session, token=token, verification=verification
        )
    except InvalidVerificationToken as exc:
        return pages.refused(exc)
    return pages.already() if verified.already else pages.done()


@account.post("/users/me/email/verification", status_code=202, responses=CONFLICT)
async def resend_verification(me: Me, session: SessionDep, verification: Verification) -> None:
    """Send your address its verification link again. 409 if it is verified, or if your account
    has none (an identity provider's may not); 429 with
    `Retry-After` if a verification e-mail went to that address in the last
    `EMAIL_VERIFICATION_INTERVAL` (10 minutes), whoever asked for it."""
    try:
        await service.resend_email_verification(
            session=session, user_id=me.id, verification=verification
        )
    except service.TooSoon as exc:
        raise HTTPException(
            429, exc.detail, headers={"Retry-After": str(exc.retry_after)}
        ) from None
