"""Cutting user text to a limit without breaking a character a reader sees.

Shared by the router (texts cut to a number of characters: `truncate`) and push-sender (payloads
cut to a provider's byte limit: `truncate_to_size`, `fit_title_and_body`). 200 emoji are 200
characters, 800 bytes of UTF-8 and more once escaped in JSON, so each limit is measured in its
own unit, and every cut lands on a boundary between user-visible characters (`is_boundary`).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable

ELLIPSIS = "…"
_ZERO_WIDTH_JOINER = "\u200d"


def _extends_previous(char: str) -> bool:
    """Characters that belong to the character before them (combining marks, emoji modifiers,
    variation selectors, joiners, tag characters)."""
    code = ord(char)
    return (
        unicodedata.category(char) in {"Mn", "Me", "Mc"}
        or char == _ZERO_WIDTH_JOINER
        or 0xFE00 <= code <= 0xFE0F  # variation selectors (emoji / text presentation)
        or 0x1F3FB <= code <= 0x1F3FF  # skin-tone modifiers
        or 0xE0020 <= code <= 0xE007F  # tag characters (subdivision flags)
        or 0xE0100 <= code <= 0xE01EF  # variation selectors supplement
    )


def _is_regional_indicator(char: str) -> bool:
    return 0x1F1E6 <= ord(char) <= 0x1F1FF


def is_boundary(text: str, index: int) -> bool:
    """Whether cutting `text` at `index` keeps every user-visible character whole: no emoji
    loses its skin tone or its joined parts, no flag is split in halves, no letter its accent.
    A close approximation of Unicode's extended grapheme cluster rules, without a dependency."""
    if index <= 0 or index >= len(text):
        return True
    before, after = text[index - 1], text[index]
    if _extends_previous(after) or before == _ZERO_WIDTH_JOINER:
        return False
    if before == "\r" and after == "\n":
        return False
    if _is_regional_indicator(before) and _is_regional_indicator(after):
        run = 0
        while index - run - 1 >= 0 and _is_regional_indicator(text[index - run - 1]):
            run += 1
        return run % 2 == 0  # flags are pairs: cut only after a complete one
    return True


def truncate(text: str, max_chars: int) -> str:
    """At most `max_chars` characters; a cut text ends with "…" and never splits a character."""
    if len(text) <= max_chars:
        return text
    cut = max(0, max_chars - len(ELLIPSIS))
    while cut > 0 and not is_boundary(text, cut):
        cut -= 1
    return text[:cut].rstrip() + ELLIPSIS


def utf8_size(text: str) -> int:
    return len(text.encode("utf-8"))


def truncate_to_size(text: str, max_size: int, *, size: Callable[[str], int] = utf8_size) -> str:
    """The longest start of `text` (ending in "…" if cut) whose `size` is at most `max_size`,
    cut at a character boundary; "" when not even the ellipsis fits."""
    if size(text) <= max_size:
        return text
    if size(ELLIPSIS) > max_size:
        return ""
    # Binary search on the cut, then back to a boundary: sizes grow with the prefix.
    low, high = 0, len(text)
    while low < high:
        middle = (low + high + 1) // 2
        if size(text[:middle] + ELLIPSIS) <= max_size:
            low = middle
        else:
            high = middle - 1
    cut = low
    while cut > 0 and not is_boundary(text, cut):
        cut -= 1
    return text[:cut].rstrip() + ELLIPSIS


def fit_title_and_body(
    title: str, body: str, *, budget: int, size: Callable[[str], int] = utf8_size
) -> tuple[str, str]:
    """Title and body whose sizes add up to at most `budget`: the body gives way first (the
    title says who and where), then the title."""
    if size(title) + size(body) <= budget:
        return title, body
    body = truncate_to_size(body, max(budget - size(title), 0), size=size)
    if size(title) + size(body) <= budget:
        return title, body
    title = truncate_to_size(title, max(budget - size(body), 0), size=size)
    return title, body
