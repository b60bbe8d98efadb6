"""The nesting check of request bodies leans on orjson.dumps' own depth limit: pin it."""

from __future__ import annotations

import orjson
import pytest

from tail_service.api.body import DUMPS_DEPTH, MAX_DEPTH, too_deep


def nested(levels: int) -> bytes:
    """``levels`` arrays and objects, alternating, one inside the other."""
    opening = [b"[" if i % 2 else b'{"k": ' for i in range(levels)]
    closing = [b"]" if i % 2 else b"}" for i in range(levels)]
    return b"".join(reversed(opening)) + b"1" + b"".join(closing)


def test_orjson_dumps_writes_exactly_dumps_depth_levels() -> None:
    assert MAX_DEPTH < DUMPS_DEPTH
    orjson.dumps(orjson.loads(nested(DUMPS_DEPTH)))
    with pytest.raises(orjson.JSONEncodeError):
        orjson.dumps(orjson.loads(nested(DUMPS_DEPTH + 1)))


@pytest.mark.parametrize(
    ("levels", "deep"),
    [
        (1, False),
        (MAX_DEPTH - 1, False),
        (MAX_DEPTH, False),
        (MAX_DEPTH + 1, True),
        (DUMPS_DEPTH + 1, True),
        (1024, True),
    ],
)
def test_too_deep_at_the_edges(levels: int, deep: bool) -> None:
    value = orjson.loads(nested(levels))
    assert too_deep(value, MAX_DEPTH) is deep
    # the same value two levels down, among wide siblings, against a limit two levels higher
    assert too_deep({"a": [value, [1, 2, {"b": "c"}]], "z": list(range(100))}, MAX_DEPTH + 2) is deep
