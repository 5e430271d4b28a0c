"""OpenID Connect access tokens: for teams whose users sign in at their own identity provider.

With `OIDC_ISSUER` set, a bearer token that is a JWT is checked as an access token of that
issuer (RFC 9068's profile): its signature with a key of the issuer's JWKS document, `iss`,
`aud` (`OIDC_AUDIENCE`), `exp` and `nbf` (30 s of leeway), `sub`, and an algorithm from
`OIDC_ALGORITHMS` that matches the key (never `none`, never a MAC: the keys are public). The
JWKS document's address comes from the issuer's discovery document unless `OIDC_JWKS_URL` says
it; it is fetched on first use, again every `OIDC_JWKS_CACHE_SECONDS`, and at once when a token
names a key it does not hold (the provider rotated its keys), at most every
`MIN_REFRESH_INTERVAL_S` so that tokens with made-up key ids cannot make us hammer the provider.
A refresh that fails keeps the keys held (a provider outage does not sign everyone out).

PyJWT does the JOSE part (parsing keys, checking signatures and claims).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import httpx
import jwt

from herald_shared.retry import describe_error
from message_service.identity import (
    SUPPORTED_ALGORITHMS,
    Identity,
    InvalidAccessToken,
    check_issuer_url,
)

logger = logging.getLogger("message_service.oidc")

LEEWAY_S = 30
MIN_REFRESH_INTERVAL_S = 30.0
FETCH_TIMEOUT_S = 5.0


class OidcVerifier:
    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        algorithms: frozenset[str] = frozenset({"RS256", "ES256"}),
        jwks_url: str | None = None,
        cache_seconds: float = 300.0,
        http: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        unsupported = algorithms - SUPPORTED_ALGORITHMS
        if unsupported:
            raise ValueError(f"not an asymmetric signature algorithm: {sorted(unsupported)}")
        self.issuer = check_issuer_url(issuer)
        self.audience = audience
        self.algorithms = algorithms
        self._jwks_url = jwks_url
        self._clock = clock
        self._cache_seconds = cache_seconds
        self._http = http or httpx.AsyncClient(timeout=FETCH_TIMEOUT_S, follow_redirects=False)
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = float("-inf")  # self._clock() of the last fetch that succeeded
        self._tried_at = float("-inf")  # of the last fetch tried
        self._lock = asyncio.Lock()
        self.fetches = 0

    async def close(self) -> None:
        await self._http.aclose()

    async def verify(self, token: str) -> Identity:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidAccessToken("not a JWT") from None
        algorithm = header.get("alg")
        if algorithm not in self.algorithms:
            raise InvalidAccessToken(f"algorithm not accepted: {str(algorithm)[:20]}")
        key = await self._key(header.get("kid"))
        declared = key._jwk_data.get("alg")  # a key that names its algorithm is for that one only
        if declared is not None and declared != algorithm:
            raise InvalidAccessToken("the key is for another algorithm")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key.key,
                algorithms=[algorithm],
                audience=self.audience,
                issuer=self.issuer,
                leeway=LEEWAY_S,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise InvalidAccessToken("expired") from None
        except jwt.PyJWTError as exc:
            raise InvalidAccessToken(type(exc).__name__) from None
        return _identity(self.issuer, claims)

    async def _key(self, kid: object) -> jwt.PyJWK:
        stale = self._clock() - self._fetched_at > self._cache_seconds
        key = self._pick(kid)
        if key is not None and not stale:
            return key
        async with self._lock:
            key = self._pick(kid)
            stale = self._clock() - self._fetched_at > self._cache_seconds
            if key is None or stale:
                if self._clock() - self._tried_at >= MIN_REFRESH_INTERVAL_S or stale:
                    await self._refresh()
                key = self._pick(kid)
        if key is None:
            raise InvalidAccessToken("signed with a key the issuer does not publish")
        return key

    def _pick(self, kid: object) -> jwt.PyJWK | None:
        if isinstance(kid, str) and kid:
            return self._keys.get(kid)
        if kid is None and len(self._keys) == 1:  # one key and no id: that one
            return next(iter(self._keys.values()))
        return None

    async def _refresh(self) -> None:
        self._tried_at = self._clock()
        try:
            url = self._jwks_url or await self._discover()
            response = await self._http.get(url)
            response.raise_for_status()
            keys = jwt.PyJWKSet.from_dict(response.json()).keys
        except Exception as exc:
            logger.warning(
                "message_service.oidc.jwks_fetch_failed error=%s (keeping %d keys)",
                describe_error(exc),
                len(self._keys),
            )
            return
        self.fetches += 1
        self._keys = {key.key_id or "": key for key in keys if _signs(key)}
        self._fetched_at = self._clock()

    async def _discover(self) -> str:
        discovery = f"{self.issuer.rstrip('/')}/.well-known/openid-configuration"
        response = await self._http.get(discovery)
        response.raise_for_status()
        document = response.json()
        if document.get("issuer") != self.issuer:
            raise ValueError("the discovery document names another issuer")
        self._jwks_url = str(document["jwks_uri"])
        return self._jwks_url


def _signs(key: jwt.PyJWK) -> bool:
    use = key._jwk_data.get("use")
    return use in (None, "sig")


def _identity(issuer: str, claims: dict[str, Any]) -> Identity:
    def text(name: str) -> str | None:
        value = claims.get(name)
        return value if isinstance(value, str) and value else None

    subject = text("sub")
    if subject is None or len(subject) > 255:
        raise InvalidAccessToken("no usable subject")
    return Identity(
        issuer=issuer,
        subject=subject,
        username=text("preferred_username"),
        name=text("name"),
        email=text("email") if claims.get("email_verified") is True else None,
        session=text("sid"),
    )
