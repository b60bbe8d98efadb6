"""The built-in tools and argument checking: exact answers, and hostile input bounded."""

from __future__ import annotations

import http.server
import math
import threading
import time

import pytest

from tail_service.core.tools import (
    MAX_DEPTH,
    MAX_EXPRESSION,
    ToolError,
    builtin_tools,
    check_schema,
    evaluate,
    parse_arguments,
)


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("2+3*4", 14),
        ("(2+3)*4", 20),
        ("2**10", 1024),
        ("2^10", 1024),
        ("2**3**2", 512),  # right-associative
        ("-2**2", -4),  # power binds tighter than unary minus
        ("10/4", 2.5),
        ("10//4", 2),
        ("10 % 4", 2),
        ("--3", 3),
        (" 1.5e3 + .5 ", 1500.5),
        ("sqrt(16) + abs(-2)", 6.0),
        ("max(1, 7, 3) - min(4, 2)", 5),
        ("round(2.567, 2)", 2.57),
        ("floor(pi)", 3),
        ("2**-1", 0.5),
        ("123456789 * 987654321", 121932631112635269),
    ],
)
def test_calculator_values(expression: str, value: float) -> None:
    assert evaluate(expression) == value


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("", "empty"),
        ("2+", "ends too early"),
        ("(2+3", "ends too early"),
        ("(2+3,", "not closed"),
        ("2*)", r"Unexpected '\)'"),
        ("2 3", "Unexpected"),
        ("1/0", "Division by zero"),
        ("__import__('os')", "Unexpected character"),
        ("x + 1", "Unknown name `x`"),
        ("os.system", "Unexpected character"),
        ("sqrt", "is a function"),
        ("sqrt(-1)", "cannot take"),
        ("log(0)", "cannot take"),
        ("exp(1000)", "cannot take"),
        ("9**9**9", "Exponents are limited"),
        ("10**1001", "more than 1000 digits"),
        ("(10**900)*(10**900)", "more than 1000 digits"),
        ("1" * 1001, "longer than"),
        ("(" * (MAX_DEPTH + 1) + "1" + ")" * (MAX_DEPTH + 1), "nested more than"),
        ("-" * 60 + "1", "nested more than"),
        ("1e308*10", "not a finite number"),
        ("(-8)**0.5", "not a real number"),
        ("min()", "cannot take"),
    ],
)
def test_calculator_refuses_with_a_reason(expression: str, message: str) -> None:
    with pytest.raises(ToolError, match=message):
        evaluate(expression)


def test_hostile_expressions_are_refused_before_they_are_computed() -> None:
    """Each is refused by a bound checked first: computed, ``9**9**9`` alone would take
    minutes and gigabytes (the suite's timeout would catch it)."""
    for expression in ["9**9**9", "10**10000", "(2**3000)*(2**3000)", "1" * (MAX_EXPRESSION + 1), "((" * 500]:
        with pytest.raises(ToolError):
            evaluate(expression)


async def test_builtin_tools_run_with_validated_arguments() -> None:
    tools = builtin_tools(lambda: 0.0)
    calc = tools["calculator"]
    assert await calc.run(parse_arguments(calc.spec.parameters, '{"expression": "2+3*4"}')) == "14"
    assert await calc.run({"expression": "1/3"}) == repr(1 / 3)
    assert await calc.run({"expression": "2**100"}) == str(2**100)
    clock = tools["current_time"]
    assert await clock.run({}) == "1970-01-01T00:00:00+00:00"
    assert await clock.run({"timezone": "Asia/Tokyo"}) == "1970-01-01T09:00:00+09:00"
    with pytest.raises(ToolError, match="Unknown time zone"):
        await clock.run({"timezone": "Mars/Olympus"})
    with pytest.raises(ToolError, match="Unknown time zone"):
        await clock.run({"timezone": "../../etc/passwd"})
    assert {name: t.spec.to_openai()["function"]["name"] for name, t in tools.items()} == {
        "calculator": "calculator",
        "current_time": "current_time",
    }
    for tool in tools.values():
        check_schema(dict(tool.spec.parameters))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ("{}", "'expression' is a required property"),
        ('{"expression": 5}', "Invalid arguments at expression: 5 is not of type 'string'"),
        ('{"expression": "1", "extra": true}', "Additional properties are not allowed"),
        ('{"expression": "' + "1" * (64 * 1024) + '"}', "larger than"),
    ],
)
def test_arguments_are_checked_against_the_schema(raw: str, message: str) -> None:
    schema = builtin_tools(time.time)["calculator"].spec.parameters
    with pytest.raises(ToolError, match=message):
        parse_arguments(schema, raw)


def test_tool_schemas_are_checked() -> None:
    check_schema({"type": "object", "properties": {"q": {"type": "string"}}})
    for bad in [[], "object", {"type": "no-such-type"}, {"properties": {"q": {"minLength": -1}}}]:
        with pytest.raises(ValueError):
            check_schema(bad)


def test_check_schema_fetches_nothing_a_schema_names() -> None:
    """A client's schema is checked as data: a ``$schema`` or ``$ref`` URL in it (here a
    server on loopback that counts its hits) is never fetched."""
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'{"type": "object"}')

        def log_message(self, *args: object) -> None:
            return None

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        check_schema({"$schema": f"{base}/meta", "type": "object"})
        check_schema({"$defs": {"x": {"$id": f"{base}/id", "$schema": f"{base}/meta2"}}})
        check_schema({"properties": {"a": {"$ref": f"{base}/ref"}}})
        with pytest.raises(ValueError, match="invalid JSON Schema"):
            check_schema({"$schema": f"{base}/meta", "type": 5})
    finally:
        server.shutdown()
        server.server_close()
    assert hits == []


def test_check_schema_takes_big_schemas_up_to_the_cap() -> None:
    """Near the 64 KB cap, a schema with a thousand properties is checked (in Rust, under a
    millisecond: Python's check_schema took 220 ms of event loop for it); over the cap, refused."""
    props = {f"p{i}": {"type": "string", "pattern": "^x+$", "description": "d"} for i in range(1000)}
    check_schema({"type": "object", "properties": props})
    with pytest.raises(ValueError, match="at most"):
        check_schema({"type": "object", "properties": {**props, **{f"q{i}": {} for i in range(2000)}}})


def test_constants() -> None:
    assert evaluate("pi") == math.pi and evaluate("2*e") == 2 * math.e
