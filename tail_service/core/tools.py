"""Server-side tools for the agent loop: the built-in ones, and argument checking.

A tool is a :class:`ToolSpec` (the name, description and JSON Schema the model sees) and
an async ``run(arguments) -> str``. Arguments arrive from the model as a JSON string; they
are parsed and validated against the tool's schema (:func:`parse_arguments`) before the
tool runs. A :class:`ToolError` is the tool's answer to the model ("the expression has an
unknown name `x`"), never a crash of the run.

Built-in tools are safe by construction: :class:`Calculator` parses arithmetic with its
own bounded parser (never ``eval``), :class:`CurrentTime` reads the clock. To add one,
write a class with ``spec`` and ``run`` and list it in :func:`builtin_tools`.
"""

from __future__ import annotations

import datetime as dt
import functools
import math
import re
import zoneinfo
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import jsonschema
import jsonschema_rs
import orjson

#: longest arguments string accepted from the model for one call
MAX_ARGUMENTS_BYTES = 64 * 1024


def cut_text(text: str, max_bytes: int) -> str:
    """``text`` in at most ``max_bytes`` UTF-8 bytes (never splitting a character), with a
    marker saying how much was cut."""
    data = text.encode()
    if len(data) <= max_bytes:
        return text
    kept = data[:max_bytes].decode(errors="ignore")
    return f"{kept}\n[output truncated: {len(data) - len(kept.encode())} bytes omitted]"


class ToolError(Exception):
    """A tool's failure, reported to the model as the tool's result (the run goes on)."""


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """What the model is told about a tool (the chat-completions ``function`` shape)."""

    name: str
    description: str
    parameters: Mapping[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})

    def to_openai(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": dict(self.parameters),
            },
        }


class Tool(Protocol):
    """A tool the server runs."""

    spec: ToolSpec

    async def run(self, arguments: dict[str, Any]) -> str: ...


def parse_arguments(schema: Mapping[str, Any], raw: str) -> dict[str, Any]:
    """The model's ``arguments`` string as an object valid against ``schema``, or a
    :class:`ToolError` saying what is wrong (the model can correct itself)."""
    if len(raw.encode()) > MAX_ARGUMENTS_BYTES:
        raise ToolError(f"The arguments are larger than {MAX_ARGUMENTS_BYTES} bytes.")
    try:
        arguments = orjson.loads(raw or "{}")
    except orjson.JSONDecodeError:
        raise ToolError("The arguments are not valid JSON.") from None
    if not isinstance(arguments, dict):
        raise ToolError("The arguments must be a JSON object.")
    validator = jsonschema.Draft202012Validator(schema)
    try:
        error = jsonschema.exceptions.best_match(validator.iter_errors(arguments))
    except Exception as exc:  # a schema the validator cannot use (an unresolvable $ref, ...)
        raise ToolError(f"The tool's JSON Schema cannot be applied ({type(exc).__name__}).") from None
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(the arguments)"
        raise ToolError(f"Invalid arguments at {where}: {error.message}")
    return arguments


#: largest JSON Schema a request may give for one tool's parameters
MAX_SCHEMA_BYTES = 64 * 1024


def check_schema(schema: Any) -> None:
    """Raise ``ValueError`` unless ``schema`` is a valid JSON Schema for a tool's arguments
    (and at most :data:`MAX_SCHEMA_BYTES` as JSON)."""
    if not isinstance(schema, dict):
        raise ValueError("a tool's parameters must be a JSON Schema object")
    if len(orjson.dumps(schema)) > MAX_SCHEMA_BYTES:
        raise ValueError(f"a tool's parameters may be at most {MAX_SCHEMA_BYTES} bytes of JSON")
    try:
        _meta_schema().validate(schema)
    except jsonschema_rs.ValidationError as exc:
        raise ValueError(f"invalid JSON Schema: {exc.message}") from None


@functools.cache
def _meta_schema() -> jsonschema_rs.Draft202012Validator:
    """The JSON Schema 2020-12 meta-schema, compiled (in Rust: ~300x faster than jsonschema's
    ``check_schema``, which costs ~0.2 ms of event loop per property). A client's schema is
    validated against it as data, so nothing in it is ever fetched (``jsonschema_rs.meta``
    would fetch a ``$schema`` URL it does not know: a request could make us call any URL)."""
    return jsonschema_rs.Draft202012Validator(jsonschema.Draft202012Validator.META_SCHEMA)


# -- calculator ----------------------------------------------------------------------------

#: bounds of one expression: its length, its nesting, the size of a number it may make
MAX_EXPRESSION = 1000
MAX_DEPTH = 50
MAX_INT_DIGITS = 1000
MAX_EXPONENT = 10_000

MAX_INT_BITS = int(MAX_INT_DIGITS * 3.33)

#: a number, an operator or parenthesis or comma, or a name (each token is one group)
_TOKEN = re.compile(
    r"\s*(?:(\d+\.?\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)|(\*\*|//|[-+*/%^(),])|([A-Za-z_]\w*))"
)

_FUNCTIONS: dict[str, Callable[..., float | int]] = {
    "abs": abs,
    "round": round,
    "min": min,
    "max": max,
    "sqrt": math.sqrt,
    "exp": math.exp,
    "log": math.log,
    "log10": math.log10,
    "log2": math.log2,
    "sin": math.sin,
    "cos": math.cos,
    "tan": math.tan,
    "asin": math.asin,
    "acos": math.acos,
    "atan": math.atan,
    "floor": math.floor,
    "ceil": math.ceil,
}
_CONSTANTS = {"pi": math.pi, "e": math.e, "tau": math.tau}
#: binary operators: symbol -> (left binding power, right binding power)
_BINARY = {"+": (10, 11), "-": (10, 11), "*": (20, 21), "/": (20, 21), "//": (20, 21), "%": (20, 21)}
_POWER = (31, 30)  # right-associative, above unary minus: -2**2 == -4
_UNARY = 25

Number = int | float


def _tokens(expression: str) -> list[str]:
    out: list[str] = []
    pos = 0
    text = expression.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise ToolError(f"Unexpected character {text[pos:].lstrip()[:1]!r} in the expression.")
        out.append(next(g for g in m.groups() if g is not None))
        pos = m.end()
    return out


def _check(value: Number) -> Number:
    if isinstance(value, bool):
        raise ToolError("Booleans are not numbers here.")
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise ToolError(f"The result has more than {MAX_INT_DIGITS} digits.")
    if isinstance(value, float) and not math.isfinite(value):
        raise ToolError("The result is not a finite number.")
    return value


def _power(base: Number, exponent: Number) -> Number:
    if abs(exponent) > MAX_EXPONENT:
        raise ToolError(f"Exponents are limited to ±{MAX_EXPONENT}.")
    exact = isinstance(base, int) and isinstance(exponent, int) and exponent >= 0
    if exact and base not in (0, 1, -1) and exponent * math.log10(abs(base)) > MAX_INT_DIGITS:
        raise ToolError(f"The result has more than {MAX_INT_DIGITS} digits.")
    try:
        result = base**exponent
    except OverflowError:
        raise ToolError("The result is too large.") from None
    if isinstance(result, complex):
        raise ToolError("The result is not a real number.")
    return result


def _binary(op: str, left: Number, right: Number) -> Number:
    try:
        if op == "+":
            return left + right
        if op == "-":
            return left - right
        if op == "*":
            exact = isinstance(left, int) and isinstance(right, int)
            if exact and int(left).bit_length() + int(right).bit_length() > MAX_INT_BITS + 1:
                raise ToolError(f"The result has more than {MAX_INT_DIGITS} digits.")
            return left * right
        if op == "/":
            return left / right
        if op == "//":
            return left // right
        return left % right
    except ZeroDivisionError:
        raise ToolError("Division by zero.") from None


class _Parser:
    """Pratt parser and evaluator of one arithmetic expression (bounded depth)."""

    def __init__(self, tokens: list[str]) -> None:
        self._tokens = tokens
        self._pos = 0
        self._depth = 0

    def _peek(self) -> str | None:
        return self._tokens[self._pos] if self._pos < len(self._tokens) else None

    def _next(self) -> str:
        token = self._peek()
        if token is None:
            raise ToolError("The expression ends too early.")
        self._pos += 1
        return token

    def parse(self) -> Number:
        value = self._expression(0)
        if self._peek() is not None:
            raise ToolError(f"Unexpected {self._peek()!r} in the expression.")
        return value

    def _expression(self, min_power: int) -> Number:
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise ToolError(f"The expression is nested more than {MAX_DEPTH} levels deep.")
        left = self._prefix()
        while (op := self._peek()) is not None:
            if op in ("**", "^"):
                left_power, right_power = _POWER
                if left_power < min_power:
                    break
                self._pos += 1
                left = _check(_power(left, self._expression(right_power)))
                continue
            if op not in _BINARY or _BINARY[op][0] < min_power:
                break
            self._pos += 1
            left = _check(_binary(op, left, self._expression(_BINARY[op][1])))
        self._depth -= 1
        return left

    def _prefix(self) -> Number:
        token = self._next()
        if token in ("-", "+"):
            value = self._expression(_UNARY)
            return -value if token == "-" else value
        if token == "(":
            value = self._expression(0)
            if self._next() != ")":
                raise ToolError("A parenthesis is not closed.")
            return value
        if token[0].isdigit() or token[0] == ".":
            is_int = token.isdigit()
            if is_int and len(token) > MAX_INT_DIGITS:
                raise ToolError(f"Numbers are limited to {MAX_INT_DIGITS} digits.")
            return _check(int(token) if is_int else float(token))
        if token in _CONSTANTS:
            return _CONSTANTS[token]
        if token in _FUNCTIONS:
            return self._call(token)
        if not (token[0].isalpha() or token[0] == "_"):
            raise ToolError(f"Unexpected {token!r} in the expression.")
        raise ToolError(f"Unknown name `{token}` in the expression.")

    def _call(self, name: str) -> Number:
        if self._peek() != "(":
            raise ToolError(f"`{name}` is a function: write {name}(...).")
        self._pos += 1
        args = [] if self._peek() == ")" else [self._expression(0)]
        while self._peek() == ",":
            self._pos += 1
            args.append(self._expression(0))
        if self._next() != ")":
            raise ToolError(f"The call of `{name}` is not closed.")
        try:
            return _check(_FUNCTIONS[name](*args))
        except (TypeError, ValueError, OverflowError) as exc:
            raise ToolError(f"`{name}` cannot take these arguments: {exc}.") from None


def evaluate(expression: str) -> Number:
    """The value of an arithmetic expression, or a :class:`ToolError` saying why not."""
    if len(expression) > MAX_EXPRESSION:
        raise ToolError(f"The expression is longer than {MAX_EXPRESSION} characters.")
    tokens = _tokens(expression)
    if not tokens:
        raise ToolError("The expression is empty.")
    return _Parser(tokens).parse()


class Calculator:
    """``calculator``: arithmetic with + - * / // % ** (or ^), parentheses, and common functions."""

    spec = ToolSpec(
        name="calculator",
        description=(
            "Evaluate an arithmetic expression exactly: + - * / // % ** (or ^), parentheses, "
            "pi, e, and the functions " + ", ".join(sorted(_FUNCTIONS)) + ". Example: 2+3*4"
        ),
        parameters={
            "type": "object",
            "properties": {"expression": {"type": "string", "maxLength": MAX_EXPRESSION}},
            "required": ["expression"],
            "additionalProperties": False,
        },
    )

    async def run(self, arguments: dict[str, Any]) -> str:
        value = evaluate(arguments["expression"])
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            return str(int(value))
        return repr(value) if isinstance(value, float) else str(value)


class CurrentTime:
    """``current_time``: the date and time now, in UTC or a given IANA time zone."""

    spec = ToolSpec(
        name="current_time",
        description=(
            "The current date and time (ISO 8601), in UTC or in an IANA time zone such as Europe/Paris."
        ),
        parameters={
            "type": "object",
            "properties": {"timezone": {"type": "string", "maxLength": 64}},
            "additionalProperties": False,
        },
    )

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock

    async def run(self, arguments: dict[str, Any]) -> str:
        name = arguments.get("timezone") or "UTC"
        try:
            zone = zoneinfo.ZoneInfo(name)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ToolError(f"Unknown time zone {name!r}; use an IANA name such as Europe/Paris.") from None
        return dt.datetime.fromtimestamp(self._clock(), tz=zone).isoformat(timespec="seconds")


def builtin_tools(clock: Callable[[], float]) -> dict[str, Tool]:
    """The built-in tools by name (``{"type": "builtin", "name": ...}`` in a request)."""
    tools: list[Tool] = [Calculator(), CurrentTime(clock)]
    return {tool.spec.name: tool for tool in tools}
