"""A local OpenID Connect provider for tests: its discovery document and JWKS on 127.0.0.1, in
its own thread, and access tokens signed with its keys.

```python
idp = FakeOidc()                 # idp.issuer: http://127.0.0.1:<port>
idp.start()
token = idp.access_token("user-1", audience="herald", preferred_username="alice",
                         name="Alice", email="alice@example.test", email_verified=True)
idp.rotate()                     # a new signing key; the JWKS publishes it (and not the old one)
idp.jwks_requests                # how often the JWKS was fetched
idp.stop()
```

It speaks the real protocol: `GET /.well-known/openid-configuration` answers the discovery
document (OpenID Connect Discovery 1.0: `issuer`, `jwks_uri`, …) and `GET /jwks` the JSON Web
Key Set (RFC 7517) of its public RSA keys, each with `kid`, `use: sig` and `alg: RS256`; tokens
are RS256 JWTs with `kid` in their header (RFC 9068's access-token profile).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.fakes.served import ServedApp


class FakeOidc:
    def __init__(self) -> None:
        self.issuer = ""
        self.jwks_requests = 0
        self._lock = threading.Lock()
        self._keys: dict[str, rsa.RSAPrivateKey] = {}
        self._current = ""
        self._served: ServedApp | None = None
        self.rotate()

    def start(self) -> None:
        self._served = ServedApp(self._app(), "fake-oidc")
        self.issuer = self._served.base_url

    def stop(self) -> None:
        if self._served is not None:
            self._served.stop()
            self._served = None

    def rotate(self, *, keep_old: bool = False) -> str:
        """A new signing key (its kid); the old ones leave the JWKS unless `keep_old`."""
        kid = uuid.uuid4().hex[:12]
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        with self._lock:
            self._keys = {**self._keys, kid: key} if keep_old else {kid: key}
            self._current = kid
        return kid

    def access_token(
        self,
        subject: str,
        *,
        audience: str,
        expires_in: float = 300,
        issuer: str | None = None,
        kid: str | None = None,
        key: rsa.RSAPrivateKey | None = None,
        **claims: Any,
    ) -> str:
        now = int(time.time())
        payload = {
            "iss": issuer or self.issuer,
            "sub": subject,
            "aud": audience,
            "iat": now,
            "exp": now + int(expires_in),
            "jti": uuid.uuid4().hex,
            **claims,
        }
        kid = kid or self._current
        signing_key = key or self._keys[kid]
        return jwt.encode(payload, signing_key, algorithm="RS256", headers={"kid": kid})

    def _app(self) -> Starlette:
        async def discovery(request: Request) -> JSONResponse:
            return JSONResponse(
                {
                    "issuer": self.issuer,
                    "jwks_uri": f"{self.issuer}/jwks",
                    "authorization_endpoint": f"{self.issuer}/authorize",
                    "token_endpoint": f"{self.issuer}/token",
                    "response_types_supported": ["code"],
                    "subject_types_supported": ["public"],
                    "id_token_signing_alg_values_supported": ["RS256"],
                }
            )

        async def jwks(request: Request) -> JSONResponse:
            with self._lock:
                self.jwks_requests += 1
                keys = dict(self._keys)
            published = []
            for kid, private in keys.items():
                public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()))
                published.append({**public, "kid": kid, "use": "sig", "alg": "RS256"})
            return JSONResponse({"keys": published})

        return Starlette(
            routes=[
                Route("/.well-known/openid-configuration", discovery),
                Route("/jwks", jwks),
            ]
        )
