"""The hand-written MIME writer: whatever the text, every header line is 7-bit and at most 78
columns, and what a parser reads back is the text that was written (RFC 2047 decoding, and
Python's own parser)."""

from __future__ import annotations

import random
from email import policy
from email.header import decode_header, make_header
from email.parser import BytesParser

import pytest

from email_sender import mime

ALPHABET = "aZ09 .,-'\"()<>@:;é李👋\u200d🏳️‍🌈Δ=?_\\"


def samples() -> list[str]:
    rng = random.Random(20261202)  # a fixed corpus, the same on every run
    texts = ["", "plain words only", "=?utf-8?b?abc?=", "x" * 200, "é" * 120, "a" * 74 + "é"]
    for _ in range(300):
        length = rng.randint(1, 120)
        texts.append(" ".join("".join(rng.choices(ALPHABET, k=length)).split()))
    return texts


def parse(header: str) -> str:
    message = BytesParser(policy=policy.default).parsebytes(header.encode("ascii") + b"\n\n")
    name = header.split(":", 1)[0]
    return str(message[name])


@pytest.mark.parametrize("text", samples())
def test_a_subject_reads_back_as_written(text: str) -> None:
    header = mime.unstructured("Subject", text)

    assert all(len(line) <= mime.LINE_LIMIT for line in header.split("\n"))
    raw = header.split(":", 1)[1].removeprefix(" ").replace("\n", "")
    assert str(make_header(decode_header(raw))) == " ".join(text.split())
    assert parse(header) == " ".join(text.split())


@pytest.mark.parametrize("name", samples())
def test_a_display_name_never_changes_the_address(name: str) -> None:
    header = mime.mailbox("To", name, "bob@example.test")

    assert all(len(line) <= mime.LINE_LIMIT for line in header.split("\n"))
    message = BytesParser(policy=policy.default).parsebytes(header.encode("ascii") + b"\n\n")
    addresses = message["To"].addresses
    assert [address.addr_spec for address in addresses] == ["bob@example.test"]
    phrase = header.removeprefix("To: ").removesuffix("<bob@example.test>").replace("\n", "")
    if "=?" in phrase:  # encoded: an RFC 2047 decoder reads exactly the name
        assert str(make_header(decode_header(phrase.strip()))) == " ".join(name.split())
    # Python's phrase parser keeps the space between two encoded words (RFC 2047 drops it), so
    # where a long name was cut it reads one space more, and never a character less.
    assert "".join(addresses[0].display_name.split()) == "".join(name.split())


@pytest.mark.parametrize(
    "address",
    ["bob@example.test", "a.b+c@sub.example.co", "x_y@a-b.example"],
)
def test_addresses_that_are_one_addr_spec(address: str) -> None:
    assert mime.mailbox("To", "", address) == f"To: <{address}>"


@pytest.mark.parametrize(
    "address",
    [
        "bob@example.test\nBcc: eve@evil.test",
        "bob@example.test, eve@evil.test",
        "Bob <bob@example.test>",
        '"quoted"@example.test',
        "bob@localhost",
        "bob..x@example.test",
        ".bob@example.test",
        "bob@-example.test",
        "bøb@example.test",
        "",
    ],
)
def test_anything_else_is_refused(address: str) -> None:
    with pytest.raises(mime.UnwritableHeader):
        mime.mailbox("To", "Bob", address)


def test_a_line_break_never_reaches_a_header() -> None:
    with pytest.raises(mime.UnwritableHeader):
        mime.unstructured("Subject", "a\nBcc: eve@evil.test")
    with pytest.raises(mime.UnwritableHeader):
        mime.mailbox("To", "Bob\rBcc: x", "bob@example.test")


def test_bodies_are_quoted_printable_lines_within_76_columns() -> None:
    text = ("Zoë said: " + "é" * 90 + " = done\n") * 3 + "trailing space \n.\nend"
    data = mime.multipart_alternative(
        ["Subject: x"], boundary="=_herald_0123", text=text, html=f"<p>{text}</p>"
    )

    assert max(data) < 0x80
    assert all(len(line) <= 76 for line in data.split(b"\n"))
    message = BytesParser(policy=policy.default).parsebytes(data)
    plain, html = (part.get_content() for part in message.iter_parts())
    assert plain == text
    assert html == f"<p>{text}</p>"


def test_a_boundary_must_be_a_boundary() -> None:
    with pytest.raises(mime.UnwritableHeader):
        mime.multipart_alternative([], boundary='a"b', text="", html="")
