"""Batch input checking and line splitting (no I/O)."""

from __future__ import annotations

import orjson
import pytest

from tail_service.batch.engine import split_lines
from tail_service.core.batch import MAX_REPORTED_ERRORS, InputChecker, LineError, check_envelope

URL = "/v1/chat/completions"


def line(custom_id: str = "a", **kw: object) -> bytes:
    obj = {"custom_id": custom_id, "method": "POST", "url": URL, "body": {"model": "m", "messages": []}, **kw}
    return orjson.dumps(obj)


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        ([b"a\nb\n"], [(1, b"a"), (2, b"b")]),
        ([b"a\nb"], [(1, b"a"), (2, b"b")]),
        ([b"a", b"b\n", b"\nc"], [(1, b"ab"), (2, b""), (3, b"c")]),
        ([b"", b"x\n"], [(1, b"x")]),
        ([], []),
    ],
)
def test_split_lines_across_chunk_boundaries(chunks: list[bytes], expected: list[tuple[int, bytes]]) -> None:
    assert list(split_lines(iter(chunks))) == expected


def test_checker_numbers_lines_from_one_and_keeps_going_after_errors() -> None:
    checker = InputChecker(URL, max_lines=100)
    raw = [
        line("a"),
        b"",
        b"{bad",
        line("b", url="/v1/embeddings"),
        line("a"),
        line("c", method="PUT"),
        line("d"),
    ]
    valid = [checker.feed(i + 1, r) for i, r in enumerate(raw)]
    checker.finish()
    assert [v.custom_id for v in valid if v is not None] == ["a", "d"]
    assert [(e.line, e.code, e.param) for e in checker.errors] == [
        (3, "invalid_json_line", None),
        (4, "invalid_url", "url"),
        (5, "duplicate_custom_id", "custom_id"),
        (6, "invalid_value", "method"),
    ]
    assert checker.lines == 6  # the blank line is not a request
    assert checker.models == {"m"}


def test_checker_limits() -> None:
    checker = InputChecker(URL, max_lines=2)
    for i in range(5):
        checker.feed(i + 1, line(str(i)))
    assert [(e.line, e.code) for e in checker.errors] == [(3, "too_many_requests")]
    many = InputChecker(URL, max_lines=10**6)
    for i in range(MAX_REPORTED_ERRORS + 50):
        many.feed(i + 1, b"[")
    assert len(many.errors) == MAX_REPORTED_ERRORS and many.error_count == MAX_REPORTED_ERRORS + 50
    empty = InputChecker(URL, max_lines=5)
    empty.finish()
    assert [e.code for e in empty.errors] == ["empty_file"]


@pytest.mark.parametrize(
    ("obj", "param"),
    [
        ([], None),
        ({"method": "POST", "url": URL, "body": {}}, "custom_id"),
        ({"custom_id": "", "method": "POST", "url": URL, "body": {}}, "custom_id"),
        ({"custom_id": "x" * 513, "method": "POST", "url": URL, "body": {}}, "custom_id"),
        ({"custom_id": "a", "url": URL, "body": {}}, "method"),
        ({"custom_id": "a", "method": "POST", "body": {}}, "url"),
        ({"custom_id": "a", "method": "POST", "url": URL, "body": []}, "body"),
    ],
)
def test_envelope_errors_name_the_field(obj: object, param: str | None) -> None:
    error = check_envelope(obj, URL, 7)
    assert isinstance(error, LineError)
    assert error.param == param and error.line == 7
