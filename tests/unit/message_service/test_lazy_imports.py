"""PyJWT, httpx and redis-py (~33 MB of memory together) are imported only when their feature is
configured: an identity provider (OIDC_ISSUER), shared rate limits (REDIS_URL)."""

from __future__ import annotations

import subprocess
import sys

OPTIONAL = ("jwt", "httpx", "redis")


def test_message_service_imports_none_of_the_optional_libraries_by_itself() -> None:
    script = (
        "import sys, message_service.main, message_service.app; "
        f"print(','.join(name for name in {OPTIONAL!r} if name in sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", script], check=True, capture_output=True, text=True, timeout=120
    ).stdout.strip()

    assert loaded == ""
