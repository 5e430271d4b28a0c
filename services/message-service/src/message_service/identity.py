"""What message-service knows of an identity provider's access tokens without a JOSE library:
who a token speaks for (`Identity`), why one is refused, the algorithms accepted and the issuer
URLs allowed. The verifier (`message_service.oidc`, PyJWT and httpx) is imported only when
`OIDC_ISSUER` is set: those two libraries cost ~16 MB of every process's memory otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

# Asymmetric algorithms only: a JWKS holds public keys, and a MAC "signed" with one would be a
# forgery anyone can make.
SUPPORTED_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA"})


class InvalidAccessToken(Exception):
    """`reason` is safe to log and to answer (it never quotes the token)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Identity:
    """Who an access token speaks for, and what it says of them."""

    issuer: str
    subject: str
    username: str | None  # `preferred_username`
    name: str | None
    email: str | None  # only when the provider says it verified it (`email_verified`)
    session: str | None  # the provider's session (`sid`), when the token names one


def looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2 and token.startswith("ey")


def check_issuer_url(issuer: str) -> str:
    """https, or http to a loopback address (a provider on this machine, for local runs)."""
    parts = urlsplit(issuer)
    loopback = parts.hostname in {"127.0.0.1", "::1", "localhost"}
    if parts.scheme != "https" and not (parts.scheme == "http" and loopback):
        raise ValueError(f"an issuer must be an https URL: {issuer!r}")
    return issuer
