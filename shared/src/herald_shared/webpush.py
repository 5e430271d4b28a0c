"""Where Web Push may send: the endpoint allowlist both message-service (when a browser registers
a subscription) and push-sender (before every POST) apply.

A subscription's endpoint is a URL a client chose, and push-sender POSTs to it: unchecked, it would
let anyone make Herald call an arbitrary URL (a cloud metadata service, an internal host). The two
services must agree on which endpoints pass, so the rule is written once, with one URL parser;
anything that parser could read differently from the HTTP client (backslashes, control
characters, spaces, non-ASCII) is refused before parsing.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import BeforeValidator
from pydantic_settings import NoDecode

# Push services whose subscription endpoints are allowed: a host as written, or "*.<domain>" for
# any host under that domain. Chrome, legacy Edge (WNS), Firefox, Safari.
DEFAULT_ALLOWED_HOSTS: tuple[str, ...] = (
    "fcm.googleapis.com",
    "android.googleapis.com",
    "updates.push.services.mozilla.com",
    "*.notify.windows.com",
    "web.push.apple.com",
)


def is_loopback(host: str) -> bool:
    """`localhost` or a loopback address (IPv6 with or without its brackets): this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_allowed(host: str, patterns: Iterable[str]) -> bool:
    """Whether `host` (lower case) matches a pattern: the host itself, or `*.<domain>` for any
    host under that domain (never the domain alone, never a host that merely ends like it)."""
    for pattern in patterns:
        if pattern.startswith("*."):
            suffix = pattern[1:]
            if host.endswith(suffix) and len(host) > len(suffix):
                return True
        elif host == pattern:
            return True
    return False


def endpoint_problem(endpoint: str, allowed_hosts: Iterable[str]) -> str | None:
    """Why `endpoint` is refused, or None when Herald may POST to it: https (plain http only to a
    loopback host, for local test servers) to a host of `allowed_hosts`, without credentials.
    The reason never quotes the endpoint (it is a capability: whoever has it can push to that
    browser), so it is safe to show to the client and to log."""
    if "\\" in endpoint or any(ord(char) <= 0x20 or ord(char) >= 0x7F for char in endpoint):
        return "endpoint must be a plain https URL"
    try:
        parts = urlsplit(endpoint)
        host = parts.hostname or ""
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError:
        return "endpoint must be a plain https URL"
    if parts.scheme not in {"http", "https"} or not host:
        return "endpoint must be an https URL"
    if parts.scheme == "http" and not is_loopback(host):
        return "endpoint must be an https URL"
    if parts.username is not None or parts.password is not None:
        return "endpoint must not carry credentials"
    if not host_allowed(host, allowed_hosts):
        return "endpoint is not on a known push service"
    return None


def _split_hosts(value: object) -> object:
    if isinstance(value, str):
        value = value.split(",")
    if isinstance(value, list | tuple):
        return tuple(str(host).strip().lower() for host in value if str(host).strip())
    return value


# A settings field holding the allowlist: comma-separated in the environment
# (`WEBPUSH_ALLOWED_HOSTS=fcm.googleapis.com,*.notify.windows.com`), lower-cased, blanks dropped.
AllowedHosts = Annotated[tuple[str, ...], NoDecode, BeforeValidator(_split_hosts)]
