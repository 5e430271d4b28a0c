"""Rendering: golden text and HTML parts, escaping, header injection, Message-ID.

The golden files in `golden/` are the exact text and HTML parts for `email_job()`. After an
intended template change, regenerate them and review the diff:

    HERALD_UPDATE_GOLDEN=1 uv run pytest tests/unit/email_sender/test_rendering.py
"""

from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path

import pytest

from email_sender.rendering import (
    EmailRenderer,
    UnrenderableEmail,
    body_text,
    header_text,
    template_environment,
)
from tests.unit.email_sender.support import DOMAIN, SENDER, email_job

GOLDEN = Path(__file__).parent / "golden"
NOW = datetime(2026, 3, 14, 9, 27, 0, tzinfo=UTC)
GOLDEN_JOB = email_job(
    room_name="Design & Research",
    sender_display_name="Alice Liddell",
    to_name="Bob",
    message_content="Hello everyone! 👋\nThe review moved to 15:00 — see you <there> & then.",
)


@pytest.fixture
def renderer() -> EmailRenderer:
    return EmailRenderer(sender=SENDER, message_id_domain=DOMAIN)


def _parts(message: EmailMessage) -> tuple[str, str]:
    text = message.get_body(preferencelist=("plain",))
    html = message.get_body(preferencelist=("html",))
    assert text is not None
    assert html is not None
    return str(text.get_content()), str(html.get_content())


def _reparsed(message: EmailMessage) -> EmailMessage:
    """What a receiving server sees: the serialised bytes parsed again."""
    parsed = BytesParser(policy=policy.default).parsebytes(message.as_bytes())
    assert isinstance(parsed, EmailMessage)
    return parsed


@pytest.mark.parametrize(("part", "golden"), [(0, "new_message.txt"), (1, "new_message.html")])
def test_parts_match_the_golden_files(renderer: EmailRenderer, part: int, golden: str) -> None:
    rendered = _parts(_reparsed(renderer.render(GOLDEN_JOB, now=NOW)))[part]
    path = GOLDEN / golden
    if os.environ.get("HERALD_UPDATE_GOLDEN"):
        path.write_text(rendered, encoding="utf-8")
    assert rendered == path.read_text(encoding="utf-8")


def test_message_is_multipart_alternative_text_then_html(renderer: EmailRenderer) -> None:
    message = _reparsed(renderer.render(GOLDEN_JOB, now=NOW))

    assert message.get_content_type() == "multipart/alternative"
    assert [part.get_content_type() for part in message.iter_parts()] == [
        "text/plain",
        "text/html",
    ]
    assert message["Subject"] == "New message from Alice Liddell in Design & Research"
    assert message["From"] == SENDER
    assert message["To"] == "Bob <bob@example.test>"
    assert message["Date"] == "Sat, 14 Mar 2026 09:27:00 +0000"
    assert message["Auto-Submitted"] == "auto-generated"


def test_message_id_comes_from_the_notification_id(renderer: EmailRenderer) -> None:
    notification_id = uuid.uuid4()
    first = renderer.render(email_job(notification_id=notification_id))
    again = renderer.render(email_job(notification_id=notification_id, message_content="x"))

    assert first["Message-ID"] == f"<{notification_id}@{DOMAIN}>"
    assert again["Message-ID"] == first["Message-ID"]


def test_subject_without_a_room_name(renderer: EmailRenderer) -> None:
    message = renderer.render(email_job(room_name=""))
    assert message["Subject"] == "New message from Alice"


def test_script_in_content_and_names_is_escaped_in_html_and_kept_as_text(
    renderer: EmailRenderer,
) -> None:
    script = "<script>alert('x')</script>"
    job = email_job(
        message_content=f"look {script}",
        sender_display_name=f"Mallory {script}",
        room_name=f"room {script}",
        to_name=f"Bob {script}",
    )

    text, html = _parts(_reparsed(renderer.render(job)))

    assert "<script" not in html.lower()
    # <title> (sender and room), greeting, sender, room, content.
    assert html.count("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;") == 6
    assert f"look {script}" in text
    assert f"Mallory {script} sent a new message in room {script}:" in text


def test_html_template_autoescapes_and_text_template_does_not() -> None:
    environment = template_environment()
    html = environment.get_template("new_message.html.j2")
    text = environment.get_template("new_message.txt.j2")
    context = {
        "subject": "s",
        "recipient_name": "",
        "sender_name": "<b>",
        "room_name": "",
        "message_content": "&",
    }
    assert "&lt;b&gt;" in html.render(context)
    assert "&amp;" in html.render(context)
    assert "<b> sent" in text.render(context)


# Each attempt to smuggle a header (or a second recipient) in through user text, and the
# exact headers that must come out: the text stays inside the one header it belongs to.
INJECTIONS = [
    pytest.param(
        {"to_name": "Bob\r\nBcc: eve@evil.test"},
        {
            "To": '"Bob Bcc: eve@evil.test" <bob@example.test>',
            "Subject": "New message from Alice in general",
        },
        id="crlf-in-recipient-name",
    ),
    pytest.param(
        {"room_name": "general\r\nBcc: eve@evil.test\r\n\r\n<html>"},
        {
            "To": "Bob <bob@example.test>",
            "Subject": "New message from Alice in general Bcc: eve@evil.test <html>",
        },
        id="crlf-in-room-name",
    ),
    pytest.param(
        {"sender_display_name": "Alice\nSubject: you won\rX-Spam: no"},
        {
            "To": "Bob <bob@example.test>",
            "Subject": "New message from Alice Subject: you won X-Spam: no in general",
        },
        id="lf-and-cr-in-sender-name",
    ),
    pytest.param(
        {
            "to_name": "Bob\x00\x85\u2028\u2029\t\x1b[31m",
            "sender_display_name": "Al\u202eice",
        },
        {"To": '"Bob [31m" <bob@example.test>', "Subject": "New message from Alice in general"},
        id="other-control-and-separator-characters",
    ),
    pytest.param(
        {"to_name": 'Bob "the builder", Eve <eve@evil.test>'},
        {
            "To": '"Bob \\"the builder\\", Eve <eve@evil.test>" <bob@example.test>',
            "Subject": "New message from Alice in general",
        },
        id="address-syntax-in-display-name",
    ),
]


@pytest.mark.parametrize(("overrides", "expected"), INJECTIONS)
def test_user_text_cannot_add_a_header(
    renderer: EmailRenderer, overrides: dict[str, str], expected: dict[str, str]
) -> None:
    message = _reparsed(renderer.render(email_job(**overrides), now=NOW))

    assert list(message.keys()) == [
        "From",
        "To",
        "Subject",
        "Date",
        "Message-ID",
        "Auto-Submitted",
        "MIME-Version",
        "Content-Type",
    ]
    assert message["To"] == expected["To"]
    assert message["Subject"] == expected["Subject"]
    assert [address.addr_spec for address in message["To"].addresses] == ["bob@example.test"]
    assert message.defects == []


@pytest.mark.parametrize(
    "address",
    [
        "bob@example.test\r\nBcc: eve@evil.test",
        "bob@example.test, eve@evil.test",
        "Bob <bob@example.test>",
        "not-an-address",
        "",
        "@example.test",
    ],
)
def test_an_address_that_is_not_one_addr_spec_is_unrenderable(
    renderer: EmailRenderer, address: str
) -> None:
    with pytest.raises(UnrenderableEmail) as raised:
        renderer.render(email_job(to_address=address))

    assert raised.value.reason == "invalid recipient address"
    assert "example.test" not in str(raised.value)
    assert raised.value.__suppress_context__


def test_undecodable_content_still_renders(renderer: EmailRenderer) -> None:
    message = renderer.render(email_job(message_content="bad \ud800 surrogate\x00 and\r\nCRLF"))
    text, _ = _parts(message)
    assert "bad \ufffd surrogate and\nCRLF" in text


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Alice", "Alice"),
        ("  Alice \t Liddell  ", "Alice Liddell"),
        ("a\r\nb", "a b"),
        ("a\u2028b\u2029c\x85d", "a b c d"),
        ("\u202eevil\u202c", "evil"),
        ("Zoë 👩‍👩‍👧", "Zoë 👩‍👩‍👧"),  # keeps non-ASCII and zero-width joiners
        ("x" * 70, "x" * 63 + "…"),
    ],
)
def test_header_text(value: str, expected: str) -> None:
    assert header_text(value, limit=64) == expected


def test_body_text_keeps_lines_and_tabs() -> None:
    assert body_text("a\r\nb\rc\n\td\x07") == "a\nb\nc\n\td"
