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
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tail_service.core.types import RequestParams
from tail_service.errors import InvalidRequestError


class OpenAIModel(BaseModel):
    """Base for request schemas: unknown fields are allowed and kept."""

    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True, strict=True)


M = TypeVar("M", bound=BaseModel)


def _param(loc: tuple[int | str, ...], body: Any, *, missing: bool) -> str | None:
    """The JSON path of an error location, e.g. ``messages[0].content``.

    Pydantic puts union-member tags (``user``, ``function``, ``list[str]``...) into its
    locations; they are not part of the path. They are told apart by walking the body: a
    part that is not a key (or index) of the value reached so far is a tag, except the
    last part of a "missing" error, which names the absent field.
    """
    out = ""
    node = body
    for i, part in enumerate(loc):
        if isinstance(part, int):
            if isinstance(node, list) and 0 <= part < len(node):
                node = node[part]
                out += f"[{part}]"
            continue
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif not (missing and i == len(loc) - 1):
            continue
        out += f".{part}" if out else part
    return out or None


#: pydantic's type errors -> what the field takes, in OpenAI's words
_EXPECTED = {
    "int_type": "an integer",
    "int_from_float": "an integer",
    "bool_type": "a boolean",
    "string_type": "a string",
    "float_type": "a number",
    "list_type": "an array",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
}


def _json_kind(value: Any) -> str:
    """How OpenAI names the JSON type of ``value`` in its messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def to_request_error(exc: ValidationError, body: Any) -> InvalidRequestError:
    """The first validation failure as an OpenAI 400 with ``param`` set."""
    errors = exc.errors(include_url=False)
    # Prefer the most specific error (the deepest location) of the first field.
    err = max(errors, key=lambda e: len(e["loc"])) if errors else None
    if err is None:
        return InvalidRequestError("Invalid request body.")
    param = _param(tuple(err["loc"]), body, missing=err["type"] == "missing")
    if err["type"] == "missing":
        return InvalidRequestError(
            f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
        )
    expected = _EXPECTED.get(err["type"])
    if expected is not None and param:
        return InvalidRequestError(
            f"Invalid type for '{param}': expected {expected}, "
            f"but got {_json_kind(err.get('input'))} instead.",
            param=param,
            code="invalid_type",
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


def parse_as(schema: type[M], body: Any) -> M:
    """Validate ``body`` against ``schema`` (strictly); the OpenAI-style 400 with ``param``
    set on the first failure."""
    if not isinstance(body, dict):
        raise InvalidRequestError("The request body must be a JSON object.")
    try:
        return schema.model_validate(body)
    except ValidationError as exc:
        raise to_request_error(exc, body) from None


def parse_body(schema: type[RequestSchema], body: Any) -> RequestParams:
    """Validate ``body`` against ``schema`` (strictly) and return its typed parameters."""
    return parse_as(schema, body).params()
