"""Digest e-mails: the messages of a user's waiting window in one e-mail, grouped by room, with
a subject that counts them, room links, escaping and header safety."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest

from email_sender.rendering import EmailRenderer
from herald_shared.events import DigestEntry, Trigger
from tests.unit.email_sender import support
from tests.unit.email_sender.support import (
    DIRECT,
    GENERAL,
    RANDOM,
    digest_entry,
    digest_job,
    reparsed,
    text_and_html,
)

NOW = datetime(2026, 3, 14, 14, 10, 0, tzinfo=UTC)
ROOM_URL_TEMPLATE = "https://chat.example.test/rooms/{room_id}"
# Alice and Carol in #general, Dave in his direct room with the recipient, Erin in #random.
MIXED = digest_job(
    digest_entry(GENERAL, 1, "Standup in five", sender="Alice"),
    digest_entry(DIRECT, 2, "Are you around?\nCall me", sender="Dave"),
    digest_entry(GENERAL, 3, "Moved to room 2", sender="Carol"),
    digest_entry(RANDOM, 4, "Lunch?", sender="Erin"),
    digest_entry(DIRECT, 5, "Never mind", sender="Dave"),
)


@pytest.fixture
def renderer() -> EmailRenderer:
    return support.renderer()


def _outline(text: str) -> list[str]:
    """The text part's headings and sender lines, in order: every line not indented (message
    text is) between the greeting's paragraph and the signature."""
    body = text.split("\n\n", 2)[2].split("\n--\n", 1)[0]
    return [line for line in body.split("\n") if line and not line.startswith(" ")]


def test_a_digest_groups_the_messages_by_room_oldest_first(renderer: EmailRenderer) -> None:
    text, html = text_and_html(reparsed(renderer.render(MIXED, now=NOW)))

    # Rooms in the order of their first message; inside a room, oldest first.
    assert _outline(text) == [
        "#general",
        "Alice, 14:01:",
        "Carol, 14:03:",
        "Direct messages with Dave",
        "Dave, 14:02:",
        "Dave, 14:05:",
        "#random",
        "Erin, 14:04:",
    ]
    # Each message's text below its sender, indented (a message cannot pass for a heading).
    assert "Dave, 14:02:\n    Are you around?\n    Call me\n" in text
    assert "Carol, 14:03:\n    Moved to room 2\n" in text
    positions = [
        html.index(fragment)
        for fragment in (
            ">#general</h2>",
            '<strong>Alice</strong> <span style="color: #6b7280;">14:01</span>',
            ">Standup in five</blockquote>",
            "<strong>Carol</strong>",
            ">Moved to room 2</blockquote>",
            ">Direct messages with Dave</h2>",
            ">Are you around?\nCall me</blockquote>",
            ">Never mind</blockquote>",
            ">#random</h2>",
            ">Lunch?</blockquote>",
        )
    ]
    assert positions == sorted(positions)
    assert "more message" not in text + html


def test_times_are_shown_in_utc() -> None:
    paris = timezone(timedelta(hours=1))
    job = digest_job(
        digest_entry(GENERAL, 0, "late", sent_at=datetime(2026, 3, 14, 15, 3, tzinfo=paris))
    )

    text, html = text_and_html(reparsed(support.renderer().render(job, now=NOW)))

    assert "Alice, 14:03:\n" in text
    assert '<span style="color: #6b7280;">14:03</span>' in html
    assert "(times in UTC)" in text


@pytest.mark.parametrize(
    ("entries", "omitted", "subject"),
    [
        pytest.param(
            [digest_entry(GENERAL, 1, "a"), digest_entry(GENERAL, 2, "b", sender="Carol")],
            1,
            "3 new messages in #general",
            id="one-room",
        ),
        pytest.param(
            [digest_entry(GENERAL, 1, "a")], 0, "1 new message in #general", id="one-message"
        ),
        pytest.param(
            [
                digest_entry(DIRECT, 1, "a", sender="Dave"),
                digest_entry(DIRECT, 2, "b", sender="Dave"),
            ],
            0,
            "2 new messages from Dave",
            id="direct-room",
        ),
        pytest.param(
            [
                digest_entry(GENERAL, 1, "a"),
                digest_entry(DIRECT, 2, "b"),
                digest_entry(RANDOM, 3, "c"),
            ],
            9,
            "12 new messages in 3 conversations",
            id="several-rooms",
        ),
        pytest.param(
            [digest_entry(GENERAL, 1, "a", room_name="#general")],
            0,
            "1 new message in #general",
            id="room-name-with-its-own-hash",
        ),
    ],
)
def test_the_subject_counts_every_message_of_the_window(
    renderer: EmailRenderer, entries: list[DigestEntry], omitted: int, subject: str
) -> None:
    message = reparsed(renderer.render(digest_job(*entries, omitted=omitted), now=NOW))

    assert message["Subject"] == subject
    _, html = text_and_html(message)
    assert f"<title>{subject}</title>" in html


@pytest.mark.parametrize(
    ("omitted", "line"), [(1, "and 1 more message."), (37, "and 37 more messages.")]
)
def test_messages_past_the_listed_ones_are_counted_at_the_end(
    renderer: EmailRenderer, omitted: int, line: str
) -> None:
    text, html = text_and_html(reparsed(renderer.render(MIXED, now=NOW)))
    counted_text, counted_html = text_and_html(
        reparsed(renderer.render(MIXED.model_copy(update={"omitted": omitted}), now=NOW))
    )

    assert f"    Lunch?\n\n{line}\n\n--\n" in counted_text
    assert f'<p>{line}</p>\n<p style="color: #6b7280; font-size: 12px;">' in counted_html
    # Nothing else changes.
    assert counted_text.replace(f"\n{line}\n", "", 1) == text
    assert (
        counted_html.replace(f"<p>{line}</p>\n", "", 1).replace(
            f"{len(MIXED.digest) + omitted} new messages", f"{len(MIXED.digest)} new messages"
        )
        == html
    )


def test_with_a_room_url_template_each_room_links_to_itself_after_its_messages() -> None:
    renderer = support.renderer(room_url_template=ROOM_URL_TEMPLATE)

    text, html = text_and_html(reparsed(renderer.render(MIXED, now=NOW)))

    links = [
        f"Open the room: https://chat.example.test/rooms/{room_id}"
        for room_id in (GENERAL, DIRECT, RANDOM)
    ]
    assert _outline(text) == [
        "#general",
        "Alice, 14:01:",
        "Carol, 14:03:",
        links[0],
        "Direct messages with Dave",
        "Dave, 14:02:",
        "Dave, 14:05:",
        links[1],
        "#random",
        "Erin, 14:04:",
        links[2],
    ]
    hrefs = [
        html.index(f'<a href="https://chat.example.test/rooms/{room_id}"')
        for room_id in (GENERAL, DIRECT, RANDOM)
    ]
    headings = [
        html.index(f">{heading}</h2>")
        for heading in ("#general", "Direct messages with Dave", "#random")
    ]
    assert headings[0] < hrefs[0] < headings[1] < hrefs[1] < headings[2] < hrefs[2]


def test_without_a_room_url_template_a_digest_has_no_room_links(renderer: EmailRenderer) -> None:
    text, html = text_and_html(reparsed(renderer.render(MIXED, now=NOW)))

    assert "Open the room" not in text + html
    assert "chat.example.test" not in text + html


def test_a_hostile_message_sender_and_room_are_escaped_in_html_and_kept_as_text(
    renderer: EmailRenderer,
) -> None:
    script = "<script>alert('x')</script>"
    escaped = "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;"
    job = digest_job(
        digest_entry(GENERAL, 1, f"look {script}", sender=f"Mallory {script}"),
        digest_entry(RANDOM, 2, f'<img src=x onerror="{script}">', room_name=f"room {script}"),
        digest_entry(DIRECT, 3, "hi", sender=f"Dave {script}"),
        to_name=f"Bob {script}",
    )

    text, html = text_and_html(reparsed(renderer.render(job, now=NOW)))

    assert "<script" not in html.lower()
    assert "<img" not in html.lower()
    # Greeting, sender, content; room heading; content; direct room's heading and its sender.
    assert html.count(escaped) == 7
    assert f'<h2 style="margin: 24px 0 8px; font-size: 16px;">#room {escaped}</h2>' in html
    assert f"Mallory {script}, 14:01:\n    look {script}\n" in text
    assert f"Direct messages with Dave {script}\n" in text


# Attempts to smuggle a header in through the names of a digest's entries, and the subject that
# must come out: the names stay inside it, or (several rooms) do not reach it at all.
DIGEST_INJECTIONS = [
    pytest.param(
        [digest_entry(GENERAL, 1, "a", room_name="general\r\nBcc: eve@evil.test\r\n\r\n<html>")],
        "1 new message in #general Bcc: eve@evil.test <html>",
        id="crlf-in-room-name",
    ),
    pytest.param(
        [
            digest_entry(DIRECT, 1, "a", sender="Dave"),
            digest_entry(DIRECT, 2, "b", sender="Dave\nSubject: you won\rX-Spam: no"),
        ],
        "2 new messages from Dave Subject: you won X-Spam: no",
        id="lf-and-cr-in-sender-name-of-a-direct-room",
    ),
    pytest.param(
        [digest_entry(GENERAL, 1, "a", room_name="=?utf-8?q?x=0D=0ABcc=3A_eve=40evil=2Etest?=")],
        # An encoded word typed by a user stays literal text; it never decodes into a header.
        "1 new message in #= ?utf-8?q?x=0D=0ABcc=3A_eve=40evil=2Etest?=",
        id="encoded-word-in-room-name",
    ),
    pytest.param(
        [digest_entry(DIRECT, 1, "a", sender="=?utf-8?b?RGF2ZQ0KQmNjOiBldmVAZXZpbC50ZXN0?=")],
        "1 new message from = ?utf-8?b?RGF2ZQ0KQmNjOiBldmVAZXZpbC50ZXN0?=",
        id="encoded-word-in-sender-name",
    ),
    pytest.param(
        [
            digest_entry(GENERAL, 1, "a", room_name="g\r\nBcc: eve@evil.test"),
            digest_entry(DIRECT, 2, "b", sender="=?utf-8?q?=0D=0ABcc:_eve@evil.test?="),
        ],
        "2 new messages in 2 conversations",
        id="several-rooms",
    ),
]


@pytest.mark.parametrize(("entries", "subject"), DIGEST_INJECTIONS)
def test_names_in_a_digest_cannot_add_a_header(
    renderer: EmailRenderer, entries: list[DigestEntry], subject: str
) -> None:
    job = digest_job(*entries)
    threaded = len({entry.room_id for entry in job.digest}) == 1

    message = reparsed(renderer.render(job, now=NOW))

    threading = ["In-Reply-To", "References"] if threaded else []
    assert list(message.keys()) == [
        "From",
        "To",
        "Subject",
        "Date",
        "Message-ID",
        *threading,
        "Auto-Submitted",
        "List-Unsubscribe",
        "List-Unsubscribe-Post",
        "MIME-Version",
        "Content-Type",
    ]
    assert message["Subject"].strip() == subject
    assert [address.addr_spec for address in message["To"].addresses] == ["bob@example.test"]
    assert "eve@evil.test" not in str(message["To"])
    assert message.defects == []


def test_a_digest_keeps_the_single_emails_other_headers(renderer: EmailRenderer) -> None:
    message = reparsed(renderer.render(MIXED, now=NOW))

    assert message["Message-ID"] == f"<{MIXED.notification_id}@{support.DOMAIN}>"
    assert message["From"] == support.SENDER
    assert message["To"] == "Bob <bob@example.test>"
    assert message["Auto-Submitted"] == "auto-generated"
    assert message["List-Unsubscribe"].startswith(f"<{support.UNSUBSCRIBE_URL}?token=")
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert [part.get_content_type() for part in message.iter_parts()] == [
        "text/plain",
        "text/html",
    ]


def test_an_invitation_among_a_digests_entries_quotes_nothing(renderer: EmailRenderer) -> None:
    job = digest_job(
        digest_entry(GENERAL, 1, "hello"),
        digest_entry(RANDOM, 2, "", sender="Erin", trigger=Trigger.INVITATION),
    )

    text, html = text_and_html(reparsed(renderer.render(job, now=NOW)))

    assert "Erin, 14:02:\n    (invited you to this room; join it to see its messages)\n" in text
    assert html.count("<blockquote") == 1
    assert "invited you to this room; join it to see its messages</p>" in html


def test_the_largest_digest_renders(renderer: EmailRenderer) -> None:
    entries = [
        digest_entry(
            uuid.uuid5(GENERAL, str(number % 7)),
            number,
            f"message {number}",
            room_name=f"room {number % 7}",
        )
        for number in range(50)
    ]

    message = reparsed(renderer.render(digest_job(*entries, omitted=1000), now=NOW))

    assert message["Subject"] == "1050 new messages in 7 conversations"
    text, _ = text_and_html(message)
    assert all(f"    message {number}\n" in text for number in range(50))
