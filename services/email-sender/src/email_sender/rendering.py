"""Turn an `EmailRequested` into an RFC 5322 message: text and HTML alternatives, safe headers.

Everything user-controlled that reaches a header (the recipient's and the sender's display names,
the room name) goes through `header_text`, which turns CR, LF and every other control or line
separator character into a space, so no user text can start a new header line; the address itself
goes through `email.headerregistry.Address`, which refuses anything that is not one addr-spec.
The HTML template autoescapes; user content is never marked safe.
"""

from __future__ import annotations

import unicodedata
import uuid
from dataclasses import dataclass
from datetime import datetime
from email import policy
from email.errors import HeaderParseError
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from herald_shared.events import EmailRequested, utc_now

TEXT_TEMPLATE = "new_message.txt.j2"
HTML_TEMPLATE = "new_message.html.j2"

MAX_NAME_LENGTH = 64
MAX_DISPLAY_NAME_LENGTH = 100

# Bidirectional overrides and isolates can make a name read differently from what it is.
_BIDI_CONTROLS = dict.fromkeys(
    map(ord, "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"), None
)
# Cc: C0/C1 controls (CR, LF, NUL, TAB, NEL…); Zl/Zp: U+2028/U+2029; Cs: lone surrogates.
_HEADER_UNSAFE_CATEGORIES = frozenset({"Cc", "Zl", "Zp", "Cs"})


class UnrenderableEmail(ValueError):
    """The job cannot become an e-mail (a permanent failure). `reason` holds no personal data."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def header_text(value: str, *, limit: int) -> str:
    """`value` as one line fit for a header: control characters and line breaks become spaces,
    runs of whitespace collapse, and it is cut to `limit` characters."""
    cleaned = "".join(
        " " if unicodedata.category(char) in _HEADER_UNSAFE_CATEGORIES else char
        for char in value.translate(_BIDI_CONTROLS)
    )
    cleaned = " ".join(cleaned.split())
    if len(cleaned) > limit:
        cleaned = cleaned[: limit - 1].rstrip() + "…"
    return cleaned


def body_text(value: str) -> str:
    """Message text for the body: line breaks normalised to LF, other control characters dropped
    (tabs kept), lone surrogates replaced, so that the text always encodes."""
    value = value.replace("\r\n", "\n").replace("\r", "\n").translate(_BIDI_CONTROLS)
    return "".join(
        "\ufffd"
        if unicodedata.category(char) == "Cs"
        else char
        if char in "\n\t" or unicodedata.category(char) != "Cc"
        else ""
        for char in value
    )


def subject_for(*, sender_name: str, room_name: str) -> str:
    if room_name:
        return f"New message from {sender_name} in {room_name}"
    return f"New message from {sender_name}"


def message_id_for(notification_id: uuid.UUID, domain: str) -> str:
    """Identical for every attempt of one notification, so a duplicate is recognisable."""
    return f"<{notification_id}@{domain}>"


def template_environment() -> Environment:
    """The templates of this package; autoescaping is on for everything but `*.txt.j2`."""
    return Environment(
        loader=PackageLoader("email_sender", "templates"),
        autoescape=select_autoescape(
            enabled_extensions=("html.j2", "html"),
            disabled_extensions=("txt.j2",),
            default_for_string=True,
            default=True,
        ),
        undefined=StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )


@dataclass(frozen=True)
class RenderedParts:
    subject: str
    text: str
    html: str


class EmailRenderer:
    """Builds the e-mail for a job. `sender` is the validated EMAIL_FROM."""

    def __init__(
        self, *, sender: str, message_id_domain: str, environment: Environment | None = None
    ) -> None:
        self._sender = sender
        self._message_id_domain = message_id_domain
        self._environment = environment or template_environment()

    def parts(self, job: EmailRequested) -> RenderedParts:
        """Subject, text and HTML, from the templates."""
        sender_name = header_text(job.sender_display_name, limit=MAX_NAME_LENGTH) or "Someone"
        room_name = header_text(job.room_name, limit=MAX_NAME_LENGTH)
        subject = subject_for(sender_name=sender_name, room_name=room_name)
        context = {
            "subject": subject,
            "recipient_name": header_text(job.to_name, limit=MAX_DISPLAY_NAME_LENGTH),
            "sender_name": sender_name,
            "room_name": room_name,
            "message_content": body_text(job.message_content),
        }
        return RenderedParts(
            subject=subject,
            text=self._environment.get_template(TEXT_TEMPLATE).render(context),
            html=self._environment.get_template(HTML_TEMPLATE).render(context),
        )

    def render(self, job: EmailRequested, *, now: datetime | None = None) -> EmailMessage:
        """The complete message, or `UnrenderableEmail` (never with the offending input in it)."""
        try:
            recipient = Address(
                display_name=header_text(job.to_name, limit=MAX_DISPLAY_NAME_LENGTH),
                addr_spec=job.to_address.strip(),
            )
            if not recipient.username or not recipient.domain:
                raise ValueError("incomplete address")
        except (ValueError, IndexError, TypeError, HeaderParseError):
            raise UnrenderableEmail("invalid recipient address") from None

        try:
            parts = self.parts(job)
            message = EmailMessage(policy=policy.default)
            message["From"] = self._sender
            message["To"] = recipient
            message["Subject"] = parts.subject
            message["Date"] = format_datetime(now or utc_now())
            message["Message-ID"] = message_id_for(job.notification_id, self._message_id_domain)
            # RFC 3834: an automatic message; auto-responders should not answer it.
            message["Auto-Submitted"] = "auto-generated"
            message.set_content(parts.text)
            message.add_alternative(parts.html, subtype="html")
            # Serialise once now, so that anything unencodable fails here and not in a backend.
            message.as_bytes()
        except (ValueError, IndexError, TypeError, HeaderParseError):
            raise UnrenderableEmail("message could not be built") from None
        return message
