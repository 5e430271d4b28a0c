"""A browser's Web Push subscription keys, checked when it registers (RFC 8291): `p256dh` its
P-256 public key, `auth` a 16-byte secret, both base64url. push-sender derives the payload's
encryption key from them; a key that is not on the curve would fail every push."""

from __future__ import annotations

import base64
import binascii
import re

AUTH_SECRET_BYTES = 16

# The NIST P-256 curve y² = x³ - 3x + b over GF(p) (FIPS 186-4, D.1.2.3).
_P256_P = 2**256 - 2**224 + 2**192 + 2**96 - 1
_P256_B = 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+={0,2}")


def decode_base64url(text: str) -> bytes:
    """base64url, padded or not (browsers give it unpadded); ValueError otherwise."""
    if not _BASE64URL.fullmatch(text):
        raise ValueError("is not base64url")
    stripped = text.rstrip("=")
    try:
        return base64.urlsafe_b64decode(stripped + "=" * (-len(stripped) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("is not base64url") from None


def is_p256_public_key(raw: bytes) -> bool:
    """An uncompressed P-256 point (0x04 | x | y) on the curve: what `p256dh` must be."""
    if len(raw) != 65 or raw[0] != 0x04:
        return False
    x, y = int.from_bytes(raw[1:33], "big"), int.from_bytes(raw[33:], "big")
    if x >= _P256_P or y >= _P256_P:
        return False
    return (y * y - (x * x * x - 3 * x + _P256_B)) % _P256_P == 0
