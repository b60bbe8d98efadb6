"""Shared pieces of the wire schemas, and the translation of validation errors.

The schemas validate what the service needs and what the OpenAI spec bounds, and
allow every other field (``extra="allow"``) so vendor parameters pass through. They
are used only to validate: the API forwards the parsed dict, not a re-dump of the
model, so nothing the client sent is reshaped on the way.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from tail_service.errors import InvalidRequestError


class OpenAIModel(BaseModel):
    """Base for request schemas: unknown fields are allowed and kept."""

    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True)


#: union-member tags pydantic puts into error locations; not part of the JSON path
_TAGS = frozenset(
    {"system", "developer", "user", "assistant", "tool", "function", "str", "int", "list", "dict"}
)


def _param(loc: tuple[int | str, ...]) -> str | None:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _TAGS or "[" in part or part.startswith(("function-", "json-or-python")):
            continue
        else:
            out += f".{part}" if out else part
    return out or None


def to_request_error(exc: ValidationError) -> InvalidRequestError:
    """The first validation failure as an OpenAI 400 with ``param`` set."""
    errors = exc.errors(include_url=False)
    # Prefer the most specific error (the deepest location) of the first field.
    err = max(errors, key=lambda e: len(e["loc"])) if errors else None
    if err is None:
        return InvalidRequestError("Invalid request body.")
    param = _param(tuple(err["loc"]))
    if err["type"] == "missing":
        return InvalidRequestError(
            f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
        )
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    return InvalidRequestError(
        f"Invalid value for '{param}': {msg}." if param else f"{msg}.",
        param=param,
        code="invalid_value" if err["type"] != "extra_forbidden" else "unknown_parameter",
    )


def validate_body(schema: type[BaseModel], body: Any) -> None:
    """Validate ``body`` against ``schema``, raising the OpenAI-style 400 on failure."""
    if not isinstance(body, dict):
        raise InvalidRequestError("The request body must be a JSON object.")
    try:
        schema.model_validate(body)
    except ValidationError as exc:
        raise to_request_error(exc) from None
