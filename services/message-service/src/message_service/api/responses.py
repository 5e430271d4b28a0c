"""Error answers the routes document in the OpenAPI description, beside their own."""

from __future__ import annotations

from typing import Any

NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "Not found (or not yours)"}}
INVALID: dict[int | str, dict[str, Any]] = {422: {"description": "Invalid request"}}
