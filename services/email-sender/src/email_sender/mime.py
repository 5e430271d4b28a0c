"""An RFC 5322 / MIME message written directly as bytes, from values that cannot break it.

Python's `email` package with its default policy costs several milliseconds of CPU per message
(its header registry parses and refolds every header): more than the rest of an e-mail's work
together. Herald's e-mails all have one shape, so they are written here instead, with every rule
that keeps user text inside the header it belongs to enforced by construction:

* a header value is either printable ASCII without `=?` (written as words, folded at spaces), or
  it is written entirely as RFC 2047 encoded words (UTF-8, base64): no byte of user text ever
  reaches a header unencoded unless it is a printable ASCII character that is not a line break;
* a display name is a quoted string (with `\\` and `"` escaped) or encoded words; the address
  must be one dot-atom addr-spec (`ADDRESS`), so it cannot carry a second recipient;
* header lines are folded at 78 columns (the unsubscribe link, one `<URL>` of printable ASCII,
  is written whole, well under the 998 limit);
* both bodies are UTF-8 in quoted-printable: 7-bit lines of at most 76 characters, which every
  server relays unchanged.

`email_sender.rendering` checks every message once more by parsing its header block back.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Sequence

LINE_LIMIT = 78
# An encoded word is at most 75 characters (RFC 2047): "=?utf-8?b?" + base64 + "?=".
_WORD_PREFIX, _WORD_SUFFIX = "=?utf-8?b?", "?="
_MAX_WORD = 75
# One dot-atom addr-spec with a dotted domain of LDH labels: no quoting, no comments, no list.
ADDRESS = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+"
)
_PRINTABLE = re.compile(r"[\x20-\x7e]*")
# RFC 5322 specials: a display name with any of them must be a quoted string.
_SPECIALS = re.compile(r'[()<>\[\]:;@\\,."]')


class UnwritableHeader(ValueError):
    """A value that no header may hold (a caller's bug: user text is cleaned before)."""


def _plain(text: str) -> bool:
    """Printable ASCII that cannot be read as an encoded word: written as it is."""
    return _PRINTABLE.fullmatch(text) is not None and "=?" not in text


def encoded_words(text: str, limit: int = _MAX_WORD) -> list[str]:
    """`text` as RFC 2047 B-encoded words of at most `limit` (and 75) characters.

    Decoders differ on the white space between two encoded words (RFC 2047 drops it; Python's
    phrase parser keeps it), so where the text must be cut it is cut after one of its own
    spaces, which stays inside the first word: both kinds then read the same words (Python with
    one more space there), and a word is cut inside only if it alone is too long."""
    words: list[str] = []
    piece = ""
    limit = min(limit, _MAX_WORD)
    for part in _spaced(text):
        if piece and _fits(piece + part, limit):
            piece += part
            continue
        if piece:
            words.append(_word(piece))
        piece = ""
        for char in part:  # a part too long alone is cut between characters
            if piece and not _fits(piece + char, limit):
                words.append(_word(piece))
                piece = ""
            piece += char
    words.append(_word(piece))
    return words


def _spaced(text: str) -> list[str]:
    """The words of `text`, each but the last with the space that follows it."""
    parts = text.split(" ")
    return [f"{part} " for part in parts[:-1]] + parts[-1:]


def _fits(text: str, limit: int) -> bool:
    encoded = 4 * ((len(text.encode()) + 2) // 3)
    return len(_WORD_PREFIX) + encoded + len(_WORD_SUFFIX) <= limit


def _word(text: str) -> str:
    return _WORD_PREFIX + base64.b64encode(text.encode()).decode("ascii") + _WORD_SUFFIX


def text_tokens(text: str, limit: int) -> list[str]:
    """Free text as header tokens of at most `limit` characters: its plain words as they are,
    each run of other words (or of words too long for a line) as encoded words (the spaces
    inside a run encoded with it, those around it kept as they are)."""
    tokens: list[str] = []
    run: list[str] = []
    for word in text.split():
        if _plain(word) and len(word) <= limit:
            if run:
                tokens.extend(encoded_words(" ".join(run), limit))
                run = []
            tokens.append(word)
        else:
            run.append(word)
    if run:
        tokens.extend(encoded_words(" ".join(run), limit))
    return tokens


def _token_limit(name: str) -> int:
    """The longest token that fits on the header's first line ("Name: token")."""
    return LINE_LIMIT - len(name) - 2


def fold(name: str, tokens: Sequence[str]) -> str:
    """`Name: token token …`, broken before a token where a line would pass 78 columns (a
    token longer than a line stays whole)."""
    lines = [f"{name}:"]
    for token in tokens:
        if len(lines[-1]) + 1 + len(token) > LINE_LIMIT and lines[-1] != f"{name}:":
            lines.append(f" {token}")
        else:
            lines[-1] += f" {token}"
    return "\n".join(lines)


def unstructured(name: str, text: str) -> str:
    """A header of free text (the subject)."""
    if any(char in text for char in "\r\n"):
        raise UnwritableHeader(f"{name} holds a line break")
    return fold(name, text_tokens(text, _token_limit(name)))


def mailbox(name: str, display_name: str, address: str) -> str:
    """`Name: display name <address>` for one address."""
    if ADDRESS.fullmatch(address) is None:
        raise UnwritableHeader(f"{name} is not one address")
    if any(char in display_name for char in "\r\n"):
        raise UnwritableHeader(f"{name}'s display name holds a line break")
    angle = f"<{address}>"
    if not display_name:
        return fold(name, [angle])
    limit = _token_limit(name)
    if not _SPECIALS.search(display_name):
        return fold(name, [*text_tokens(display_name, limit), angle])
    quoted = '"' + display_name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if _plain(display_name) and all(len(part) <= limit for part in quoted.split(" ")):
        return fold(name, [*quoted.split(" "), angle])
    # Specials and other text: wholly encoded (no special may stand bare beside an encoded word).
    return fold(name, [*encoded_words(" ".join(display_name.split()), limit), angle])


def quoted_printable(text: str) -> str:
    """UTF-8 quoted-printable with LF line ends: 7-bit, at most 76 characters a line."""
    encoded = binascii.b2a_qp(text.encode("utf-8"), quotetabs=False, istext=True, header=False)
    return encoded.decode("ascii")


def multipart_alternative(headers: Iterable[str], *, boundary: str, text: str, html: str) -> bytes:
    """The message: `headers` (each one folded header), then a text and an HTML part."""
    if not re.fullmatch(r"[A-Za-z0-9'()+_,./:=?-]{1,69}", boundary):
        raise UnwritableHeader("not a MIME boundary")
    parts = []
    for subtype, body in (("plain", text), ("html", html)):
        parts.append(
            f"--{boundary}\n"
            f'Content-Type: text/{subtype}; charset="utf-8"\n'
            "Content-Transfer-Encoding: quoted-printable\n"
            "\n"
            f"{quoted_printable(body)}\n"
        )
    head = "\n".join(
        [
            *headers,
            "MIME-Version: 1.0",
            f'Content-Type: multipart/alternative;\n boundary="{boundary}"',
        ]
    )
    return f"{head}\n\n{''.join(parts)}--{boundary}--\n".encode("ascii")
