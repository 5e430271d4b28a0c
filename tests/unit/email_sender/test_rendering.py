"""Rendering: golden headers, text and HTML parts, escaping, header injection, Message-ID,
threading per room, room links, List-Unsubscribe (digests: `test_digest.py`).

The golden files in `golden/` are the exact header block (MIME boundary blanked) and the text and
HTML parts for `GOLDEN_JOB`. After an intended change, regenerate them and review the diff:

    HERALD_UPDATE_GOLDEN=1 uv run pytest tests/unit/email_sender/test_rendering.py
"""

from __future__ import annotations

import os
import re
import uuid
from datetime import UTC, datetime, timedelta
from email import policy
from email.parser import BytesParser
from pathlib import Path

import pytest

from email_sender.rendering import (
    EmailRenderer,
    RenderedEmail,
    UnrenderableEmail,
    body_text,
    header_text,
    headers_as_built,
    template_environment,
)
from herald_shared.events import Trigger
from herald_shared.unsubscribe import InvalidUnsubscribeToken
from tests.unit.email_sender import support
from tests.unit.email_sender.support import (
    DIRECT,
    DOMAIN,
    GENERAL,
    RANDOM,
    SENDER,
    UNSUBSCRIBE_URL,
    digest_entry,
    digest_job,
    email_job,
    reparsed,
    text_and_html,
    unsubscribe_tokens,
)

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
    return support.renderer()


@pytest.mark.parametrize(("part", "golden"), [(0, "new_message.txt"), (1, "new_message.html")])
def test_parts_match_the_golden_files(renderer: EmailRenderer, part: int, golden: str) -> None:
    rendered = text_and_html(reparsed(renderer.render(GOLDEN_JOB, now=NOW)))[part]
    path = GOLDEN / golden
    if os.environ.get("HERALD_UPDATE_GOLDEN"):
        path.write_text(rendered, encoding="utf-8")
    assert rendered == path.read_text(encoding="utf-8")


def _header_block(rendered: RenderedEmail) -> str:
    """The headers as a server receives them, the random MIME boundary blanked."""
    head = rendered.data.split(b"\n\n", 1)[0].decode("ascii")
    return re.sub(r'boundary="[^"]*"', 'boundary="BOUNDARY"', head) + "\n"


def test_headers_match_the_golden_file(renderer: EmailRenderer) -> None:
    rendered = _header_block(renderer.render(GOLDEN_JOB, now=NOW))
    path = GOLDEN / "new_message.headers"
    if os.environ.get("HERALD_UPDATE_GOLDEN"):
        path.write_text(rendered, encoding="ascii")
    assert rendered == path.read_text(encoding="ascii")


def test_list_unsubscribe_is_one_click_with_a_signed_link_for_the_recipient(
    renderer: EmailRenderer,
) -> None:
    job = email_job()
    raw = renderer.render(job, now=NOW).data
    message = reparsed(renderer.render(job, now=NOW))

    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    value = message["List-Unsubscribe"]
    assert value.startswith(f"<{UNSUBSCRIBE_URL}?token=")
    assert value.endswith(">")
    # Written as one plain line (no RFC 2047 encoded words, which no client reads as a link).
    assert f"List-Unsubscribe: {value}\n".encode() in raw
    assert b"=?" not in raw.split(b"\n\n", 1)[0]
    token = value[len(f"<{UNSUBSCRIBE_URL}?token=") : -1]
    tokens = unsubscribe_tokens()
    assert tokens.verify(token, now=NOW + timedelta(days=29)) == job.recipient_id
    with pytest.raises(InvalidUnsubscribeToken, match="expired"):
        tokens.verify(token, now=NOW + timedelta(days=30))
    # The token names the user by id only: no address, no name.
    assert job.to_address not in token
    assert "Bob" not in token
    # The same link is in both parts, for readers whose client shows no unsubscribe button.
    text, html = text_and_html(message)
    assert value[1:-1] in text
    assert f'href="{value[1:-1]}"' in html


def test_message_is_multipart_alternative_text_then_html(renderer: EmailRenderer) -> None:
    message = reparsed(renderer.render(GOLDEN_JOB, now=NOW))

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

    assert reparsed(first)["Message-ID"] == f"<{notification_id}@{DOMAIN}>"
    assert reparsed(again)["Message-ID"] == reparsed(first)["Message-ID"]
    assert first.message_id == again.message_id == f"<{notification_id}@{DOMAIN}>"


def test_subject_without_a_room_name(renderer: EmailRenderer) -> None:
    message = reparsed(renderer.render(email_job(room_name="")))
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

    text, html = text_and_html(reparsed(renderer.render(job)))

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
        "invitation": False,
        "message_content": "&",
        "room_url": None,
        "unsubscribe_url": "https://x.test/unsubscribe?token=a&b",
    }
    assert "&lt;b&gt;" in html.render(context)
    assert "&amp;" in html.render(context)
    assert "<b> sent" in text.render(context)
    assert 'href="https://x.test/unsubscribe?token=a&amp;b"' in html.render(context)


ROOM_URL_TEMPLATE = "https://chat.example.test/rooms/{room_id}?from=email&kind=single"


def _room_url(room_id: uuid.UUID) -> str:
    """ROOM_URL_TEMPLATE filled in, as the text part shows it (the HTML escapes its `&`)."""
    return f"https://chat.example.test/rooms/{room_id}?from=email&kind=single"


def _room_link_in_html(room_id: uuid.UUID) -> str:
    href = _room_url(room_id).replace("&", "&amp;")
    return f'<a href="{href}" style="color: #4f46e5;">Open the room</a>'


def test_with_a_room_url_template_the_email_links_to_the_room() -> None:
    job = email_job()

    text, html = text_and_html(
        reparsed(support.renderer(room_url_template=ROOM_URL_TEMPLATE).render(job, now=NOW))
    )

    assert f"\n\nOpen the room: {_room_url(job.room_id)}\n\n--\n" in text
    assert _room_link_in_html(job.room_id) in html


def test_without_a_room_url_template_there_is_no_room_link(renderer: EmailRenderer) -> None:
    text, html = text_and_html(reparsed(renderer.render(email_job(), now=NOW)))

    assert "Open the room" not in text
    assert "Open the room" not in html
    assert "chat.example.test" not in text + html


@pytest.mark.parametrize("trigger", [Trigger.MESSAGE, Trigger.INVITATION])
def test_the_room_link_is_all_a_room_url_template_adds_to_a_single_message_email(
    renderer: EmailRenderer, trigger: Trigger
) -> None:
    job = email_job(trigger=trigger)
    linking = support.renderer(room_url_template=ROOM_URL_TEMPLATE)

    linked_text, linked_html = text_and_html(reparsed(linking.render(job, now=NOW)))
    plain_text, plain_html = text_and_html(reparsed(renderer.render(job, now=NOW)))

    link_in_text = f"\nOpen the room: {_room_url(job.room_id)}\n"
    link_in_html = f"<p>{_room_link_in_html(job.room_id)}</p>\n"
    assert link_in_text in linked_text
    assert link_in_html in linked_html
    assert linked_text.replace(link_in_text, "", 1) == plain_text
    assert linked_html.replace(link_in_html, "", 1) == plain_html


def _thread(room_id: uuid.UUID) -> str:
    return f"<room-{room_id}@{DOMAIN}>"


@pytest.mark.parametrize("trigger", [Trigger.MESSAGE, Trigger.DIRECT, Trigger.INVITATION])
def test_a_single_message_email_joins_its_rooms_thread(
    renderer: EmailRenderer, trigger: Trigger
) -> None:
    job = email_job(trigger=trigger)

    message = reparsed(renderer.render(job, now=NOW))

    assert message["In-Reply-To"] == _thread(job.room_id)
    assert message["References"] == _thread(job.room_id)
    # The thread is the room's, the Message-ID still the notification's own.
    assert message["Message-ID"] == f"<{job.notification_id}@{DOMAIN}>"
    other_message = reparsed(
        renderer.render(email_job(notification_id=uuid.uuid4(), message_id=uuid.uuid4()), now=NOW)
    )
    assert other_message["References"] == message["References"]
    other_room = reparsed(renderer.render(email_job(room_id=uuid.uuid4()), now=NOW))
    assert other_room["References"] != message["References"]


def test_a_digest_of_one_room_joins_its_thread(renderer: EmailRenderer) -> None:
    job = digest_job(digest_entry(RANDOM, 1, "first"), digest_entry(RANDOM, 2, "second"), omitted=4)

    message = reparsed(renderer.render(job, now=NOW))

    assert message["In-Reply-To"] == _thread(RANDOM)
    assert message["References"] == _thread(RANDOM)
    assert message["Message-ID"] == f"<{job.notification_id}@{DOMAIN}>"


def test_a_digest_of_several_rooms_is_in_no_rooms_thread(renderer: EmailRenderer) -> None:
    job = digest_job(digest_entry(GENERAL, 1, "first"), digest_entry(DIRECT, 2, "second"))

    message = reparsed(renderer.render(job, now=NOW))

    assert "In-Reply-To" not in message
    assert "References" not in message
    assert message["Message-ID"] == f"<{job.notification_id}@{DOMAIN}>"
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


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
    pytest.param(
        {"room_name": "=?utf-8?q?x=0D=0ABcc=3A_eve=40evil=2Etest?="},
        {
            "To": "Bob <bob@example.test>",
            # An encoded word typed by a user stays literal text; it never decodes into a header.
            "Subject": "New message from Alice in = ?utf-8?q?x=0D=0ABcc=3A_eve=40evil=2Etest?=",
        },
        id="encoded-word-in-room-name",
    ),
    pytest.param(
        {"to_name": "=?utf-8?b?Qm9iDQpCY2M6IGV2ZUBldmlsLnRlc3Q=?="},
        {
            "To": "= ?utf-8?b?Qm9iDQpCY2M6IGV2ZUBldmlsLnRlc3Q= ?= <bob@example.test>",
            "Subject": "New message from Alice in general",
        },
        id="encoded-word-in-recipient-name",
    ),
    pytest.param(
        {"room_name": "r" * 5000 + "\r\nBcc: eve@evil.test", "to_name": "B " * 3000},
        {
            "To": f"{'B ' * 49}B… <bob@example.test>",
            "Subject": f"New message from Alice in {'r' * 63}…",
        },
        id="very-long-names",
    ),
    pytest.param(
        {"room_name": "Zoë's 👩‍👩‍👧 café", "to_name": "Ærøskøbing Δ", "sender_display_name": "李"},
        {
            "To": "Ærøskøbing Δ <bob@example.test>",
            "Subject": "New message from 李 in Zoë's 👩‍👩‍👧 café",
        },
        id="unicode-names",
    ),
]


@pytest.mark.parametrize(("overrides", "expected"), INJECTIONS)
def test_user_text_cannot_add_a_header(
    renderer: EmailRenderer, overrides: dict[str, str], expected: dict[str, str]
) -> None:
    message = reparsed(renderer.render(email_job(**overrides), now=NOW))

    assert list(message.keys()) == [
        "From",
        "To",
        "Subject",
        "Date",
        "Message-ID",
        "In-Reply-To",
        "References",
        "Auto-Submitted",
        "List-Unsubscribe",
        "List-Unsubscribe-Post",
        "MIME-Version",
        "Content-Type",
    ]
    assert message["To"] == expected["To"]
    # (Python's folder may break a long subject right after "Subject:"; the parser keeps that.)
    assert message["Subject"].strip() == expected["Subject"]
    assert [address.addr_spec for address in message["To"].addresses] == ["bob@example.test"]
    assert message.defects == []
    # RFC 5322: every serialised header line stays within 78 columns, however long the names
    # (the unsubscribe link is the one exception, written whole and well under 998).
    head = renderer.render(email_job(**overrides), now=NOW).data.split(b"\n\n", 1)[0]
    assert all(
        len(line) <= 78 for line in head.split(b"\n") if not line.startswith(b"List-Unsubscribe:")
    )


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
    rendered = renderer.render(email_job(message_content="bad \ud800 surrogate\x00 and\r\nCRLF"))
    text, _ = text_and_html(reparsed(rendered))
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
        ("=?utf-8?q?=0D=0A?=", "= ?utf-8?q?=0D=0A?="),  # never an encoded word
    ],
)
def test_header_text(value: str, expected: str) -> None:
    assert header_text(value, limit=64) == expected


def test_body_text_keeps_lines_and_tabs() -> None:
    assert body_text("a\r\nb\rc\n\td\x07") == "a\nb\nc\n\td"


def test_a_message_whose_serialised_headers_differ_from_those_set_is_refused(
    renderer: EmailRenderer,
) -> None:
    """The last guard, for tricks the cleaning above does not know: it compares what a server
    would parse with what was set."""
    job = email_job()
    serialised = renderer.render(job, now=NOW).data
    subject = "New message from Alice in general"
    thread = f"<room-{job.room_id}@{DOMAIN}>"

    def as_built(data: bytes, *, thread_id: str | None = thread) -> bool:
        return headers_as_built(
            data, recipient=job.to_address, subject=subject, thread_id=thread_id
        )

    assert as_built(serialised)
    smuggled = serialised.replace(b"Subject:", b"Bcc: eve@evil.test\nSubject:", 1)
    assert not as_built(smuggled)
    second_recipient = serialised.replace(b"<bob@example.test>", b"<bob@example.test>, e@x.y", 1)
    assert not as_built(second_recipient)
    other_subject = serialised.replace(b"in general", b"in generic", 1)
    assert not as_built(other_subject)
    # The threading headers: exactly where they were set, naming exactly the room's thread.
    assert not as_built(serialised, thread_id=None)
    assert not as_built(serialised, thread_id=f"<room-{uuid.uuid4()}@{DOMAIN}>")
    other_thread = serialised.replace(
        f"References: {thread}".encode(), f"References: <room-{uuid.uuid4()}@{DOMAIN}>".encode()
    )
    assert other_thread != serialised
    assert not as_built(other_thread)
    second_reference = serialised.replace(
        b"Auto-Submitted:", f"References: {thread}\nAuto-Submitted:".encode(), 1
    )
    assert not as_built(second_reference)
    unthreaded = serialised.replace(f"In-Reply-To: {thread}\nReferences: {thread}\n".encode(), b"")
    assert unthreaded != serialised
    assert as_built(unthreaded, thread_id=None)
    assert not as_built(unthreaded)


def test_an_invitation_says_who_invited_whom_where_and_quotes_nothing(
    renderer: EmailRenderer,
) -> None:
    job = email_job(
        trigger=Trigger.INVITATION,
        room_name="Design & Research",
        sender_display_name="Alice",
        message_content="",
    )

    rendered = renderer.render(job, now=NOW)

    message = BytesParser(policy=policy.default).parsebytes(rendered.data)
    assert message["Subject"] == "Alice invited you to #Design & Research"
    text, html = text_and_html(message)
    assert "Alice invited you to #Design & Research. Join the room" in text
    assert "sent a new message" not in text
    assert "invited you to <strong>#Design &amp; Research</strong>" in html
    assert "<blockquote" not in html
