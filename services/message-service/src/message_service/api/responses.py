"""The error answers of the HTTP API, for the OpenAPI description: their bodies, the `responses=`
dicts a route adds for the answers particular to it (403, 404, 409, 422), and `with_common_answers`,
which documents on every operation the answers that come from no route of its own (401 from the
bearer token, 400 and 413 from reading the body, 429 from the rate limits)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

# At most this many characters of what the caller sent come back in an error answer.
ECHO_MAX = 200

Responses = dict[int | str, dict[str, Any]]


class ErrorOut(BaseModel):
    """An error: what went wrong, in a sentence."""

    detail: str = Field(examples=["room not found"])


class ValidationIssue(BaseModel):
    """One part of the request that is not valid: where (`loc`) and why; never its value."""

    type: str = Field(examples=["string_too_long"])
    loc: list[str | int] = Field(examples=[["body", "display_name"]])
    msg: str = Field(examples=["String should have at most 100 characters"])


class InvalidOut(BaseModel):
    """A request the server refuses: a list of issues when the request does not match the
    schema, a sentence when it breaks a rule the schema cannot state (a user id that names no
    one, a room you cannot leave)."""

    detail: str | list[ValidationIssue]


def _answer(description: str, model: type[BaseModel] = ErrorOut) -> dict[str, Any]:
    return {"description": description, "model": model}


FORBIDDEN: Responses = {403: _answer("Someone else's: you may see it, not change it")}
NOT_FOUND: Responses = {404: _answer("Not found (or not yours)")}
FORBIDDEN_BUILTIN: Responses = {
    403: _answer("Accounts are the identity provider's here (`BUILTIN_ACCOUNTS=false`)")
}
CONFLICT: Responses = {409: _answer("Conflicts with the current state")}
INVALID: Responses = {422: _answer("Invalid request", InvalidOut)}

# --- answers every operation may give ----------------------------------------------------------

_SCHEMAS = "#/components/schemas/"


def _json_answer(description: str, model: str = "ErrorOut", **extra: Any) -> dict[str, Any]:
    content = {"application/json": {"schema": {"$ref": f"{_SCHEMAS}{model}"}}}
    return {"description": description, "content": content, **extra}


def _is_fastapi_default(answer: dict[str, Any]) -> bool:
    """Whether a 422 is the one FastAPI documents by itself (its own body, not ours)."""
    schema = answer.get("content", {}).get("application/json", {}).get("schema", {})
    return bool(schema.get("$ref") == f"{_SCHEMAS}HTTPValidationError")


UNAUTHORIZED_ANSWER = _json_answer(
    "Missing, malformed or unknown bearer token",
    headers={
        "WWW-Authenticate": {
            "description": '`Bearer`, or `Bearer error="invalid_token"` for a token not known',
            "schema": {"type": "string"},
        }
    },
)
MALFORMED_BODY_ANSWER = _json_answer("A body that cannot be parsed (most answer 422)")
TOO_LARGE_ANSWER = _json_answer("The body is larger than `MAX_BODY_BYTES`")
INVALID_ANSWER = _json_answer("Invalid request", "InvalidOut")
_HEADER = {"schema": {"type": "string"}}
RATE_LIMITED_ANSWER = _json_answer(
    "A rate limit reached: the caller's budget for this (per IP, user or token) is spent",
    headers={
        "Retry-After": {
            "description": "Seconds until the budget has room again",
            "schema": {"type": "integer", "minimum": 1},
        },
        "RateLimit-Policy": {
            "description": 'The budget (IETF draft field): `"posting";q=120;w=60` = 120 per 60 s',
            **_HEADER,
        },
        "RateLimit": {
            "description": 'What is left of it (IETF draft field): `"posting";r=0;t=12`',
            **_HEADER,
        },
    },
)


def with_common_answers(document: dict[str, Any]) -> dict[str, Any]:
    """`document` (an OpenAPI document FastAPI generated) with the answers that the bearer token
    dependency and the body's parsing give documented on each operation they apply to: 401 where
    a token is required, 400 and 413 where a body is read, 429 everywhere (each operation spends
    a rate-limit budget); and the 422 FastAPI documents by
    itself replaced by the body this service answers (`InvalidOut`)."""
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for model in (ErrorOut, InvalidOut):
        schema = model.model_json_schema(ref_template=f"{_SCHEMAS}{{model}}")
        for name, definition in schema.pop("$defs", {}).items():
            schemas.setdefault(name, definition)
        schemas.setdefault(model.__name__, schema)
    for path_item in document.get("paths", {}).values():
        for operation in path_item.values():
            answers = operation.setdefault("responses", {})
            answers.setdefault("429", RATE_LIMITED_ANSWER)
            if operation.get("security"):
                answers.setdefault("401", UNAUTHORIZED_ANSWER)
            if "requestBody" in operation:
                answers.setdefault("400", MALFORMED_BODY_ANSWER)
                answers.setdefault("413", TOO_LARGE_ANSWER)
            if "422" in answers and _is_fastapi_default(answers["422"]):
                answers["422"] = INVALID_ANSWER
    # FastAPI's own 422 body, now referenced by no operation.
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    return document


def clipped(text: str) -> str:
    """`text`, cut to `ECHO_MAX` characters: an error answer may quote what the caller sent (a
    field's name, a list of ids), but never much of it."""
    return text if len(text) <= ECHO_MAX else f"{text[: ECHO_MAX - 1]}…"


# --- links: how one answer leads to the next request (OpenAPI links) ---------------------------


def link(path: str, method: str, **parameters: str) -> dict[str, Any]:
    """An OpenAPI link to the operation `method path`, its parameters taken from this answer
    (runtime expressions such as `$response.body#/id`)."""
    pointer = path.replace("~", "~0").replace("/", "~1").replace("{", "%7B").replace("}", "%7D")
    return {"operationRef": f"#/paths/{pointer}/{method.lower()}", "parameters": parameters}


_ROOM_ID = "$response.body#/id"
# No link to leaving: a room you left is no longer yours to read (404), which a fuzzer following
# links would take for a room lost right after it was created.
ROOM_LINKS = {
    "ReadRoom": link("/rooms/{room_id}", "GET", room_id=_ROOM_ID),
    "PostMessage": link("/rooms/{room_id}/messages", "POST", room_id=_ROOM_ID),
    "ListMessages": link("/rooms/{room_id}/messages", "GET", room_id=_ROOM_ID),
    "AddMember": link("/rooms/{room_id}/members", "POST", room_id=_ROOM_ID),
    "ReadRoomNotifications": link("/rooms/{room_id}/notifications", "GET", room_id=_ROOM_ID),
    "ReplaceRoomNotifications": link("/rooms/{room_id}/notifications", "PUT", room_id=_ROOM_ID),
}
