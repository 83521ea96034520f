"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}`` with a 4xx/5xx status."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

INVALID_REQUEST = "invalid_request_error"
NOT_FOUND = "NotFoundError"
SERVER_ERROR = "server_error"


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def param_path(loc: tuple[Any, ...]) -> str:
    """("messages", 0, "content") -> "messages[0].content"."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def from_validation_error(exc: ValidationError) -> APIError:
    """The first problem, naming its field (the others are counted, so the client fixes one at a time)."""
    errors = exc.errors()
    first = errors[0]
    param = param_path(tuple(first["loc"])) or None
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "missing":
        message = f"'{param}' is a required field"
    elif first["type"] == "model_type":
        message = "the request body must be a JSON object"
        param = None
    elif not param:  # a rule across fields (a model validator): its message says what to fix
        message = msg
        param = None
    else:
        got = first.get("input")
        shown = "" if isinstance(got, dict | list) else f" (got {got!r})"
        message = f"'{param}': {msg}{shown}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return APIError(
        400, message, param=param, code="invalid_value" if first["type"] != "missing" else "missing"
    )
