"""Turn an `EmailRequested` into an RFC 5322 message: text and HTML alternatives, safe headers.

A job with a `digest` becomes one e-mail of all its messages, grouped by room (`digest.*.j2`);
any other job, the e-mail of its one message or invitation (`new_message.*.j2`). With a
ROOM_URL_TEMPLATE, each room the e-mail tells of is linked.

Everything user-controlled that reaches a header (the recipient's and the sender's display names,
the room name, the names of a digest's entries) goes through `header_text`, which turns CR, LF
and every other control or line separator character into a space, so no user text can start a
new header line; the message is then written by `email_sender.mime`, which takes a header value
only as plain printable ASCII or as RFC 2047 encoded words, and an address only as one
addr-spec. As a last guard, the written
header block is parsed back and must hold exactly the headers set, one recipient and the same
subject. The HTML templates autoescape; user content is never marked safe.

An e-mail about one room (a single message, or a digest of one room's messages) carries
`In-Reply-To` and `References` naming that room's thread, `<room-{room_id}@{domain}>`, so mail
clients put a room's e-mails together; a digest over several rooms belongs to no thread.

Every e-mail carries `List-Unsubscribe` (RFC 2369) with a signed, expiring link to
message-service and `List-Unsubscribe-Post: List-Unsubscribe=One-Click` (RFC 8058), so a mail
client can turn the recipient's e-mail notifications off with one POST.
"""

from __future__ import annotations

import re
import unicodedata
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email import errors, policy
from email.header import decode_header, make_header
from email.parser import BytesHeaderParser
from email.utils import format_datetime, getaddresses

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from email_sender import mime
from email_sender.settings import ROOM_ID_PLACEHOLDER
from herald_shared.events import DigestEntry, EmailRequested, Trigger, utc_now
from herald_shared.unsubscribe import UnsubscribeTokens

TEXT_TEMPLATE = "new_message.txt.j2"
HTML_TEMPLATE = "new_message.html.j2"
DIGEST_TEXT_TEMPLATE = "digest.txt.j2"
DIGEST_HTML_TEMPLATE = "digest.html.j2"

MAX_NAME_LENGTH = 64
MAX_DISPLAY_NAME_LENGTH = 100

# Bidirectional overrides and isolates can make a name read differently from what it is.
_BIDI_CONTROLS = dict.fromkeys(
    map(ord, "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"), None
)
# Cc: C0/C1 controls (CR, LF, NUL, TAB, NEL…); Zl/Zp: U+2028/U+2029; Cs: lone surrogates.
_HEADER_UNSAFE_CATEGORIES = frozenset({"Cc", "Zl", "Zp", "Cs"})


ONE_CLICK = "List-Unsubscribe=One-Click"
# What a List-Unsubscribe value may hold: one <URL> of printable ASCII, no spaces.
_URL_HEADER_VALUE = re.compile(r"<[!-~]{1,900}>")
# The headers every e-mail has, in this order (then MIME-Version and Content-Type).
HEADER_NAMES = (
    "From",
    "To",
    "Subject",
    "Date",
    "Message-ID",
    "Auto-Submitted",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
)
# What an e-mail about one room has besides, right after Message-ID, both naming the room's
# thread (`thread_id_for`).
THREAD_HEADER_NAMES = ("In-Reply-To", "References")


def header_names(*, threaded: bool) -> tuple[str, ...]:
    """The headers of an e-mail, in order, as `render` writes them."""
    if not threaded:
        return HEADER_NAMES
    after_message_id = HEADER_NAMES.index("Message-ID") + 1
    return (
        *HEADER_NAMES[:after_message_id],
        *THREAD_HEADER_NAMES,
        *HEADER_NAMES[after_message_id:],
    )


@dataclass(frozen=True)
class RenderedEmail:
    """A message ready for a backend: its bytes (LF line ends; SMTP's CRLF is the client's
    business) and its envelope."""

    data: bytes
    sender: str  # MAIL FROM
    recipient: str  # RCPT TO
    message_id: str


@dataclass(frozen=True)
class UnsubscribeLinks:
    """Links to message-service's `/unsubscribe` (`url`), each with a token for one user."""

    url: str
    tokens: UnsubscribeTokens
    lifetime: timedelta

    def for_user(self, user_id: uuid.UUID, *, now: datetime) -> str:
        token = self.tokens.issue(user_id, now=now, lifetime=self.lifetime)
        return f"{self.url}?token={token}"  # the token is URL-safe as it is


class UnrenderableEmail(ValueError):
    """The job cannot become an e-mail (a permanent failure). `reason` holds no personal data."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def header_text(value: str, *, limit: int) -> str:
    """`value` as one line fit for a header: control characters and line breaks become spaces,
    runs of whitespace collapse, it is cut to `limit` characters, and it cannot be read as an
    encoded word."""
    cleaned = "".join(
        " " if unicodedata.category(char) in _HEADER_UNSAFE_CATEGORIES else char
        for char in value.translate(_BIDI_CONTROLS)
    )
    cleaned = " ".join(cleaned.split())
    if len(cleaned) > limit:
        cleaned = cleaned[: limit - 1].rstrip() + "…"
    # "=?" opens an RFC 2047 encoded word, which Python's email package decodes when the header
    # is set and then writes out decoded: "=?utf-8?q?=0D=0ABcc:…?=" became a real Bcc line
    # (CPython before 3.11.10 / 3.12.5, CVE-2024-6923). A space keeps it literal text.
    return cleaned.replace("=?", "= ?")


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


def subject_for(*, sender_name: str, room_name: str, invitation: bool = False) -> str:
    if invitation:
        return f"{sender_name} invited you to #{room_name.lstrip('#')}"
    if room_name:
        return f"New message from {sender_name} in {room_name}"
    return f"New message from {sender_name}"


@dataclass(frozen=True)
class DigestLine:
    """One message of a digest as the templates show it."""

    sender_name: str  # through `header_text`, like every name
    time: str  # "14:03", UTC
    text: str  # through `body_text`
    invitation: bool  # an invitation to the room, not a message: it has no text


@dataclass(frozen=True)
class DigestRoom:
    """One room's part of a digest: its messages, oldest first."""

    heading: str  # "#general", or "Direct messages with Alice"
    subject_place: str  # how a subject about this room alone ends: "in #general", "from Alice"
    url: str | None  # where the chat shows it (None without a ROOM_URL_TEMPLATE)
    lines: tuple[DigestLine, ...]


def digest_by_room(entries: Sequence[DigestEntry]) -> list[list[DigestEntry]]:
    """The entries of each room, oldest first; the rooms in the order of their first entry."""
    by_room: dict[uuid.UUID, list[DigestEntry]] = {}
    # The router lists them oldest first already; a stable sort keeps its order among equals.
    for entry in sorted(entries, key=lambda entry: entry.sent_at):
        by_room.setdefault(entry.room_id, []).append(entry)
    return list(by_room.values())


def digest_line(entry: DigestEntry) -> DigestLine:
    """An entry as the templates show it; blank lines around its text are dropped, they would
    only push the next message away."""
    return DigestLine(
        sender_name=header_text(entry.sender_display_name, limit=MAX_NAME_LENGTH) or "Someone",
        time=entry.sent_at.astimezone(UTC).strftime("%H:%M"),
        text=body_text(entry.message_content).strip("\n"),
        invitation=entry.trigger is Trigger.INVITATION,
    )


def digest_subject(*, count: int, rooms: Sequence[DigestRoom]) -> str:
    """The subject of a digest of `count` messages: "3 new messages in #general", "… from
    Alice" (a direct room), or over several rooms "… in 2 conversations"."""
    messages = "1 new message" if count == 1 else f"{count} new messages"
    if len(rooms) == 1:
        return f"{messages} {rooms[0].subject_place}"
    return f"{messages} in {len(rooms)} conversations"


def more_messages(omitted: int) -> str:
    """What a digest says of the messages it does not list ("" when it lists them all)."""
    if omitted == 0:
        return ""
    return "and 1 more message" if omitted == 1 else f"and {omitted} more messages"


def message_id_for(notification_id: uuid.UUID, domain: str) -> str:
    """Identical for every attempt of one notification, so a duplicate is recognisable."""
    return f"<{notification_id}@{domain}>"


def thread_id_for(room_id: uuid.UUID, domain: str) -> str:
    """The message id every e-mail about one room replies to: no e-mail has it, but mail clients
    that thread by `References` (or `In-Reply-To`) put a room's e-mails together under it."""
    return f"<room-{room_id}@{domain}>"


def thread_room(job: EmailRequested) -> uuid.UUID | None:
    """The one room the e-mail is about: a single message's, or the room all of a digest's
    entries share; None for a digest over several rooms (it belongs to no room's thread)."""
    rooms = {entry.room_id for entry in job.digest} if job.digest else {job.room_id}
    return next(iter(rooms)) if len(rooms) == 1 else None


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
    unsubscribe_url: str


class EmailRenderer:
    """Builds the e-mail for a job. `sender` is the validated EMAIL_FROM."""

    def __init__(
        self,
        *,
        sender: str,
        message_id_domain: str,
        unsubscribe: UnsubscribeLinks,
        room_url_template: str | None = None,
        environment: Environment | None = None,
    ) -> None:
        # EMAIL_FROM is the operator's, checked at start-up: written once, with the email
        # package's own header rules.
        header = policy.default.header_factory("From", sender)
        self._from_header = f"From: {header}".strip()
        self._envelope_sender = header.addresses[0].addr_spec
        self._message_id_domain = message_id_domain
        self._unsubscribe = unsubscribe
        # The validated ROOM_URL_TEMPLATE (None: e-mails carry no room links).
        self._room_url_template = room_url_template
        self._environment = environment or template_environment()
        self._text = self._environment.get_template(TEXT_TEMPLATE)
        self._html = self._environment.get_template(HTML_TEMPLATE)
        self._digest_text = self._environment.get_template(DIGEST_TEXT_TEMPLATE)
        self._digest_html = self._environment.get_template(DIGEST_HTML_TEMPLATE)

    def parts(self, job: EmailRequested, *, now: datetime) -> RenderedParts:
        """Subject, text and HTML, from the templates; `now` dates the unsubscribe link."""
        if job.digest:
            return self._digest_parts(job, now=now)
        return self._message_parts(job, now=now)

    def _message_parts(self, job: EmailRequested, *, now: datetime) -> RenderedParts:
        """One message (or invitation): the job's top-level fields."""
        sender_name = header_text(job.sender_display_name, limit=MAX_NAME_LENGTH) or "Someone"
        room_name = header_text(job.room_name, limit=MAX_NAME_LENGTH)
        invitation = job.trigger is Trigger.INVITATION
        subject = subject_for(sender_name=sender_name, room_name=room_name, invitation=invitation)
        unsubscribe_url = self._unsubscribe.for_user(job.recipient_id, now=now)
        context = {
            "subject": subject,
            "recipient_name": header_text(job.to_name, limit=MAX_DISPLAY_NAME_LENGTH),
            "sender_name": sender_name,
            "room_name": room_name,
            "invitation": invitation,
            "message_content": body_text(job.message_content),
            "room_url": self.room_url(job.room_id),
            "unsubscribe_url": unsubscribe_url,
        }
        return RenderedParts(
            subject=subject,
            text=self._text.render(context),
            html=self._html.render(context),
            unsubscribe_url=unsubscribe_url,
        )

    def _digest_parts(self, job: EmailRequested, *, now: datetime) -> RenderedParts:
        """Every message of `job.digest`, by room, and a count of those it could not list."""
        rooms = [self._digest_room(entries) for entries in digest_by_room(job.digest)]
        subject = digest_subject(count=len(job.digest) + job.omitted, rooms=rooms)
        unsubscribe_url = self._unsubscribe.for_user(job.recipient_id, now=now)
        context = {
            "subject": subject,
            "recipient_name": header_text(job.to_name, limit=MAX_DISPLAY_NAME_LENGTH),
            "rooms": rooms,
            "more_messages": more_messages(job.omitted),
            "unsubscribe_url": unsubscribe_url,
        }
        return RenderedParts(
            subject=subject,
            text=self._digest_text.render(context),
            html=self._digest_html.render(context),
            unsubscribe_url=unsubscribe_url,
        )

    def _digest_room(self, entries: Sequence[DigestEntry]) -> DigestRoom:
        """A room's part, named as its newest entry names it (a room renamed meanwhile, or a
        sender who changed their name, shows as they are now)."""
        newest = entries[-1]
        room_name = header_text(newest.room_name, limit=MAX_NAME_LENGTH)
        if room_name:
            heading = f"#{room_name.lstrip('#')}"
            subject_place = f"in {heading}"
        else:  # a direct room: named after the other person, who wrote everything in it
            partner = header_text(newest.sender_display_name, limit=MAX_NAME_LENGTH) or "Someone"
            heading = f"Direct messages with {partner}"
            subject_place = f"from {partner}"
        return DigestRoom(
            heading=heading,
            subject_place=subject_place,
            url=self.room_url(newest.room_id),
            lines=tuple(digest_line(entry) for entry in entries),
        )

    def room_url(self, room_id: uuid.UUID) -> str | None:
        """Where the chat shows the room, or None without a ROOM_URL_TEMPLATE."""
        if self._room_url_template is None:
            return None
        return self._room_url_template.replace(ROOM_ID_PLACEHOLDER, str(room_id))

    def render(self, job: EmailRequested, *, now: datetime | None = None) -> RenderedEmail:
        """The complete message, or `UnrenderableEmail` (never with the offending input in it)."""
        address = job.to_address.strip()
        if mime.ADDRESS.fullmatch(address) is None:
            raise UnrenderableEmail("invalid recipient address") from None
        now = now or utc_now()
        try:
            parts = self.parts(job, now=now)
            unsubscribe = f"<{parts.unsubscribe_url}>"
            if not _URL_HEADER_VALUE.fullmatch(unsubscribe):
                raise mime.UnwritableHeader("List-Unsubscribe is not one <URL>")
            to_name = header_text(job.to_name, limit=MAX_DISPLAY_NAME_LENGTH)
            message_id = message_id_for(job.notification_id, self._message_id_domain)
            room_id = thread_room(job)
            thread_id = None if room_id is None else thread_id_for(room_id, self._message_id_domain)
            # Both name the room's thread: `References` for the clients that thread by the chain,
            # `In-Reply-To` for those that look at the parent only (RFC 5322 3.6.4).
            threading = (
                [f"{name}: {thread_id}" for name in THREAD_HEADER_NAMES] if thread_id else []
            )
            headers = [
                self._from_header,
                mime.mailbox("To", to_name, address),
                mime.unstructured("Subject", parts.subject),
                f"Date: {format_datetime(now)}",
                f"Message-ID: {message_id}",
                *threading,
                # RFC 3834: an automatic message; auto-responders should not answer it.
                "Auto-Submitted: auto-generated",
                # Written whole: a URL cut by folding is no link for a mail client.
                f"List-Unsubscribe: {unsubscribe}",
                f"List-Unsubscribe-Post: {ONE_CLICK}",
            ]
            data = mime.multipart_alternative(
                headers, boundary=f"=_herald_{uuid.uuid4().hex}", text=parts.text, html=parts.html
            )
        except (ValueError, UnicodeError):
            raise UnrenderableEmail("message could not be built") from None
        if not headers_as_built(
            data, recipient=address, subject=parts.subject, thread_id=thread_id
        ):
            raise UnrenderableEmail("message headers did not survive serialisation")
        return RenderedEmail(data, self._envelope_sender, address, message_id)


def headers_as_built(data: bytes, *, recipient: str, subject: str, thread_id: str | None) -> bool:
    """Defence in depth against header tricks nobody has thought of yet: what a receiving server
    parses has exactly the headers that were set (the threading headers, naming `thread_id`,
    if and only if it is given), one recipient, and the same subject."""
    received = BytesHeaderParser(policy=policy.compat32).parsebytes(data)
    recipients = getaddresses(received.get_all("To", []))
    raw_subject = received.get("Subject")
    if raw_subject is not None:
        raw_subject = raw_subject.replace("\n", "")  # unfolded
    threaded = thread_id is not None
    thread_ids = [str(received.get(name, "")).strip() for name in THREAD_HEADER_NAMES]
    return (
        tuple(received.keys()) == (*header_names(threaded=threaded), "MIME-Version", "Content-Type")
        and (not threaded or thread_ids == [thread_id] * len(THREAD_HEADER_NAMES))
        and len(recipients) == 1
        and recipients[0][1] == recipient
        and raw_subject is not None
        and str(make_header(decode_header(raw_subject))) == subject
        and not [defect for defect in received.defects if not _headers_only_artefact(defect)]
    )


def _headers_only_artefact(defect: errors.MessageDefect) -> bool:
    """A multipart whose parts were not parsed (headers only, on purpose) has no parts: Python
    3.11.2 (Debian 12's, the container images' base) reports that as a defect, 3.11.7 does not.
    It says nothing about the headers (every e-mail was refused in the images before)."""
    return isinstance(defect, errors.MultipartInvariantViolationDefect)
