"""The access log: one line per request, in JSON or ``key=value`` form, written when the
response is complete (a stream: when it ends, with its final status)."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Callable, Iterator

import openai
import orjson
import pytest

from tail_service.logging import log_handler
from tests.conftest import RunningApp, model_entry
from tests.fakes.openai_upstream import FakeOpenAI

PROMPT = "capybara-secret-prompt-3e1f"


@pytest.fixture
def access_lines() -> Iterator[Callable[[bool], io.StringIO]]:
    """``capture(json)``: the access log's lines from now on, in that form."""
    logger = logging.getLogger("tail_service.access")
    level = logger.level
    handlers: list[logging.Handler] = []

    def capture(json: bool) -> io.StringIO:
        buf = io.StringIO()
        handlers.append(log_handler(buf, json=json))
        logger.addHandler(handlers[-1])
        logger.setLevel(logging.INFO)
        return buf

    yield capture
    for h in handlers:
        logger.removeHandler(h)
    logger.setLevel(level)


def by_request_id(buf: io.StringIO) -> dict[str, dict[str, object]]:
    lines = [orjson.loads(line) for line in buf.getvalue().splitlines()]
    out = {line["request_id"]: line for line in lines}
    assert len(out) == len(lines), "one line per request"
    return out


def test_json_lines_for_plain_and_streamed_requests(
    make_app: Callable[..., RunningApp], upstream: FakeOpenAI, access_lines: Callable[[bool], io.StringIO]
) -> None:
    app = make_app([model_entry("gpt-test", upstream)])
    buf = access_lines(True)
    client = app.client()
    msgs = [{"role": "user", "content": PROMPT}]
    plain = client.chat.completions.with_raw_response.create(model="gpt-test", messages=msgs)  # type: ignore[arg-type]
    upstream.chunk_delay = 0.05
    stream = client.chat.completions.with_raw_response.create(model="gpt-test", messages=msgs, stream=True)  # type: ignore[arg-type]
    answer = "".join(c.choices[0].delta.content or "" for c in stream.parse() if c.choices)
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-model-" + PROMPT, messages=msgs)  # type: ignore[arg-type]
    lines = by_request_id(buf)

    line = lines[plain.headers["x-request-id"]]
    assert line["logger"] == "tail_service.access" and line["msg"] == "access"
    assert {k: line[k] for k in ("method", "route", "status", "key_id", "model", "deployment")} == {
        "method": "POST",
        "route": "/v1/chat/completions",
        "status": 200,
        "key_id": "anonymous",
        "model": "gpt-test",
        "deployment": "gpt-test#0",
    }
    assert line["prompt_tokens"] > 0 and line["completion_tokens"] > 0  # type: ignore[operator]
    assert "ttft_ms" not in line

    streamed = lines[stream.headers["x-request-id"]]
    assert streamed["status"] == 200 and streamed["completion_tokens"] > 0  # type: ignore[operator]
    # logged when the stream ended: the whole stream (several chunk delays) is in ``ms``
    assert 0 < streamed["ttft_ms"] < streamed["ms"]  # type: ignore[operator]
    assert streamed["ms"] >= 100  # type: ignore[operator]

    unknown = lines[missing.value.response.headers["x-request-id"]]
    assert (unknown["status"], unknown["model"]) == (404, "unknown")
    text = buf.getvalue()
    assert PROMPT not in text and answer.strip() and answer not in text


def test_text_lines_are_key_value(
    make_app: Callable[..., RunningApp], upstream: FakeOpenAI, access_lines: Callable[[bool], io.StringIO]
) -> None:
    app = make_app([model_entry("gpt-test", upstream)])
    buf = access_lines(False)
    raw = app.client().chat.completions.with_raw_response.create(
        model="gpt-test",
        messages=[{"role": "user", "content": PROMPT}],  # type: ignore[list-item]
    )
    [line] = [ln for ln in buf.getvalue().splitlines() if raw.headers["x-request-id"] in ln]
    assert " INFO tail_service.access " in line
    fields = dict(re.findall(r" (\w+)=(\S+)", line))
    assert fields["method"] == "POST" and fields["route"] == "/v1/chat/completions"
    assert fields["status"] == "200" and fields["key_id"] == "anonymous" and fields["model"] == "gpt-test"
    assert int(fields["prompt_tokens"]) > 0 and float(fields["ms"]) > 0
    assert PROMPT not in buf.getvalue()


def test_a_stream_that_fails_after_its_first_byte_logs_and_counts_its_final_status(
    make_app: Callable[..., RunningApp], upstream: FakeOpenAI, access_lines: Callable[[bool], io.StringIO]
) -> None:
    app = make_app([model_entry("gpt-test", upstream)])
    buf = access_lines(True)
    upstream.error_event_next(after_chunks=2)
    stream = app.client().chat.completions.with_raw_response.create(
        model="gpt-test",
        messages=[{"role": "user", "content": "a b c d"}],  # type: ignore[list-item]
        stream=True,
    )
    assert stream.http_response.status_code == 200
    with pytest.raises(openai.APIError):
        for _ in stream.parse():
            pass
    line = by_request_id(buf)[stream.headers["x-request-id"]]
    assert line["status"] == 502
    with app.http() as http:
        metrics = http.get("/metrics").text
    series = 'deployment="gpt-test#0",model="gpt-test",route="/v1/chat/completions",status="502"'
    assert "tail_requests_total{" + series + "} 1.0" in metrics


def test_access_log_off(
    make_app: Callable[..., RunningApp], upstream: FakeOpenAI, access_lines: Callable[[bool], io.StringIO]
) -> None:
    app = make_app([model_entry("gpt-test", upstream)], server={"access_log": False})
    buf = access_lines(True)
    app.client().models.list()
    assert buf.getvalue() == ""
