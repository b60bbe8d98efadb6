"""Shared pieces of the wire schemas, and the translation of validation errors.

The schemas validate what the service needs and what the OpenAI spec bounds, and
allow every other field (``extra="allow"``) so vendor parameters pass through.
Validation is strict (JSON types as the spec gives them: ``"stream": "true"``,
``"n": 2.0`` or ``"seed": false`` are 400s, never coerced), so the dict that goes
upstream holds exactly what was validated. The API forwards that dict, not a re-dump
of the model, so nothing the client sent is reshaped on the way; the fields the gateway
acts on are read once from the validated model (``params()``).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tail_service.core.types import RequestParams
from tail_service.errors import InvalidRequestError


class OpenAIModel(BaseModel):
    """Base for request schemas: unknown fields are allowed and kept."""

    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True, strict=True)


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


class RequestSchema(OpenAIModel):
    """A request body the gateway acts on: it names a model and gives typed parameters."""

    model: str = Field(min_length=1)

    @abstractmethod
    def params(self) -> RequestParams:
        """The fields the gateway acts on, typed (the rest passes through)."""


def parse_body(schema: type[RequestSchema], body: Any) -> RequestParams:
    """Validate ``body`` against ``schema`` (strictly) and return its typed parameters.

    Raises the OpenAI-style 400 with ``param`` set on the first failure.
    """
    if not isinstance(body, dict):
        raise InvalidRequestError("The request body must be a JSON object.")
    try:
        return schema.model_validate(body).params()
    except ValidationError as exc:
        raise to_request_error(exc) from None
