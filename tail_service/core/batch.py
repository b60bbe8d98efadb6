"""Batch logic without I/O: input lines, one line's execution, and the output line format.

A batch input line is ``{"custom_id", "method": "POST", "url", "body"}``. :class:`InputChecker`
validates lines one at a time (as the input file streams by) and collects OpenAI's
line-numbered errors; :func:`execute_line` runs one line's body through the
:class:`~tail_service.core.inference.InferenceService`, exactly as the endpoint would, and
turns the outcome into a :class:`LineResult`; :func:`output_line` renders the line of the
output or error file (OpenAI's ``BatchRequestOutput``).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from tail_service.core.inference import InferenceService
from tail_service.core.ratelimit import Priority
from tail_service.core.types import Endpoint, Principal, ProxyRequest, Source
from tail_service.errors import (
    InvalidRequestError,
    QuotaExceededError,
    RateLimitError,
    TailError,
    UpstreamConnectionError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from tail_service.schemas.chat import ChatCompletionRequest
from tail_service.schemas.common import RequestSchema, parse_body
from tail_service.schemas.completions import CompletionRequest
from tail_service.schemas.embeddings import EmbeddingRequest

#: batch ``endpoint`` / line ``url`` -> (endpoint, request schema)
BATCH_ENDPOINTS: dict[str, tuple[Endpoint, type[RequestSchema]]] = {
    "/v1/chat/completions": (Endpoint.CHAT, ChatCompletionRequest),
    "/v1/completions": (Endpoint.COMPLETION, CompletionRequest),
    "/v1/embeddings": (Endpoint.EMBEDDING, EmbeddingRequest),
}

#: longest ``custom_id`` accepted (it is stored and echoed on every output line)
MAX_CUSTOM_ID = 512
#: line-numbered errors kept for one invalid input file; the rest are counted, not listed
MAX_REPORTED_ERRORS = 1000


@dataclass(frozen=True, slots=True)
class LineError:
    """One problem with an input line (OpenAI's ``errors.data[]`` item; ``line`` is 1-based)."""

    code: str
    message: str
    line: int | None = None
    param: str | None = None

    def to_openai(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "param": self.param, "line": self.line}


@dataclass(frozen=True, slots=True)
class InputLine:
    """A valid input line: its 1-based number in the file, ``custom_id`` and request body."""

    line_no: int
    custom_id: str
    body: dict[str, Any]


def check_envelope(obj: Any, endpoint: str, line_no: int) -> InputLine | LineError:
    """Validate one decoded line against the batch's ``endpoint``.

    The body itself is checked when the line runs: a bad body is that line's 400, as it
    would be on the endpoint, and the other lines still run.
    """
    if not isinstance(obj, dict):
        return LineError("invalid_json_line", "This line is not a JSON object.", line_no)
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return LineError(
            "missing_required_parameter",
            "The request is missing the `custom_id` parameter (a non-empty string).",
            line_no,
            "custom_id",
        )
    if len(custom_id) > MAX_CUSTOM_ID:
        return LineError(
            "invalid_value",
            f"The `custom_id` is longer than {MAX_CUSTOM_ID} characters.",
            line_no,
            "custom_id",
        )
    if obj.get("method") != "POST":
        return LineError("invalid_value", "The `method` of every request must be `POST`.", line_no, "method")
    url = obj.get("url")
    if url != endpoint:
        return LineError(
            "invalid_url",
            f"The URL provided for this request ({url!r}) does not match the batch endpoint ({endpoint}).",
            line_no,
            "url",
        )
    body = obj.get("body")
    if not isinstance(body, dict):
        return LineError(
            "missing_required_parameter",
            "The request is missing the `body` parameter (a JSON object).",
            line_no,
            "body",
        )
    return InputLine(line_no, custom_id, body)


@dataclass(slots=True)
class InputChecker:
    """Validates a batch input file line by line; keeps errors, counts and the single model."""

    endpoint: str
    max_lines: int
    errors: list[LineError] = field(default_factory=list)
    error_count: int = 0
    lines: int = 0
    models: set[str] = field(default_factory=set)
    _seen: set[str] = field(default_factory=set)

    def _fail(self, error: LineError) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append(error)

    def feed(self, line_no: int, raw: bytes) -> InputLine | None:
        """Check line ``line_no``; the valid line, or ``None`` (blank, or an error recorded)."""
        if not raw.strip():
            return None
        self.lines += 1
        if self.lines > self.max_lines:
            if self.lines == self.max_lines + 1:
                self._fail(
                    LineError(
                        "too_many_requests",
                        f"The input file has more than {self.max_lines} requests; "
                        "split it into several batches.",
                        line_no,
                    )
                )
            return None
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            self._fail(LineError("invalid_json_line", "This line is not parseable as valid JSON.", line_no))
            return None
        checked = check_envelope(obj, self.endpoint, line_no)
        if isinstance(checked, LineError):
            self._fail(checked)
            return None
        if checked.custom_id in self._seen:
            self._fail(
                LineError(
                    "duplicate_custom_id",
                    "The custom_id for this request is a duplicate of another request. "
                    "The custom_id parameter must be unique for each request in a batch.",
                    line_no,
                    "custom_id",
                )
            )
            return None
        self._seen.add(checked.custom_id)
        model = checked.body.get("model")
        if isinstance(model, str):
            self.models.add(model)
        return checked

    def finish(self) -> None:
        """After the last line: an empty file is an error too."""
        if self.lines == 0 and not self.errors:
            self._fail(LineError("empty_file", "The input file has no requests."))


@dataclass(frozen=True, slots=True)
class LineResult:
    """The outcome of one line: an HTTP status and body, plus its usage."""

    status_code: int
    body: dict[str, Any]
    request_id: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    #: set when the failure may heal (no spare rate-limit capacity, an overloaded
    #: upstream): seconds to wait before running the line again
    retry_after: float | None = None

    @property
    def ok(self) -> bool:
        return self.status_code == 200


#: failures worth running a batch line again for (the rest are the line's answer)
TRANSIENT = (RateLimitError, UpstreamUnavailableError, UpstreamConnectionError, UpstreamTimeoutError)


def usage_details(usage: Any) -> tuple[int, int]:
    """``(cached prompt tokens, reasoning tokens)`` from an OpenAI usage object."""
    if not isinstance(usage, dict):
        return 0, 0
    prompt = usage.get("prompt_tokens_details")
    completion = usage.get("completion_tokens_details")
    cached = prompt.get("cached_tokens") if isinstance(prompt, dict) else 0
    reasoning = completion.get("reasoning_tokens") if isinstance(completion, dict) else 0
    return (cached if isinstance(cached, int) else 0), (reasoning if isinstance(reasoning, int) else 0)


async def execute_line(
    inference: InferenceService,
    endpoint: str,
    body: dict[str, Any],
    principal: Principal,
    request_id: str,
    priority: Priority = Priority.BATCH,
) -> LineResult:
    """Run one request body as ``endpoint`` would, through admission and the model proxy."""
    kind, schema = BATCH_ENDPOINTS[endpoint]
    try:
        if body.get("stream") is True:
            raise InvalidRequestError(
                "Streaming is not supported for batch requests.", param="stream", code="unsupported_parameter"
            )
        params = parse_body(schema, body)
        req = ProxyRequest(
            endpoint=kind,
            model=body["model"],
            body=body,
            params=params,
            request_id=request_id,
            principal=principal,
            priority=priority,
            source=Source.BATCH,
        )
        answer = await (inference.embed(req) if kind is Endpoint.EMBEDDING else inference.complete(req))
    except TailError as exc:
        retry = None
        if isinstance(exc, TRANSIENT) and not isinstance(exc, QuotaExceededError):
            retry = exc.retry_after if exc.retry_after is not None else 1.0
        return LineResult(exc.http_status, exc.body(), request_id, retry_after=retry)
    cached, reasoning = usage_details(answer.body.get("usage"))
    return LineResult(
        200,
        answer.body,
        request_id,
        answer.usage.prompt_tokens,
        answer.usage.completion_tokens,
        cached,
        reasoning,
    )


#: transient upstream failures a line is run again for (rate limits: until it must stop)
TRANSIENT_RETRIES = 3


async def run_line(
    inference: InferenceService,
    endpoint: str,
    body: bytes,
    principal: Principal,
    *,
    stopped: Callable[[], bool],
    max_backoff: float,
) -> LineResult | None:
    """Run one line, again while it fails in a way that heals: while the key's limits have
    no spare capacity for batch traffic (as long as it takes), or the upstream is overloaded
    or unreachable (a few times). ``None`` when ``stopped()`` before the line got a final answer.
    """
    transient = 0
    while True:
        if stopped():
            return None
        request_id = "req_" + os.urandom(12).hex()
        result = await execute_line(inference, endpoint, orjson.loads(body), principal, request_id)
        if result.retry_after is None:
            return result
        if result.status_code != RateLimitError.status:
            transient += 1
            if transient > TRANSIENT_RETRIES:
                return result
        delay = min(max(result.retry_after, 0.05), max_backoff)
        await asyncio.sleep(delay * (0.5 + random.random()))  # jitter: lines do not retry in step


def line_record_id(batch_id: str, line_no: int) -> str:
    """The stable ``batch_req_…`` id of a line's output record."""
    digest = hashlib.sha256(f"{batch_id}:{line_no}".encode()).hexdigest()
    return f"batch_req_{digest[:32]}"


def output_line(record_id: str, custom_id: str, result: LineResult) -> dict[str, Any]:
    """The output (or error) file line of an executed request."""
    return {
        "id": record_id,
        "custom_id": custom_id,
        "response": {"status_code": result.status_code, "request_id": result.request_id, "body": result.body},
        "error": None,
    }


#: why a line never ran -> (code, message) of its error-file line
NOT_RUN = {
    "expired": ("batch_expired", "This request could not be executed before the completion window expired."),
    "cancelled": ("batch_cancelled", "This request was not executed because the batch was cancelled."),
    "revoked": (
        "key_revoked",
        "This request was not executed because the API key that created the batch was revoked or expired.",
    ),
}


def not_run_line(record_id: str, custom_id: str, reason: str) -> dict[str, Any]:
    """The error file line of a request that was never executed (``expired`` or ``cancelled``)."""
    code, message = NOT_RUN[reason]
    return {
        "id": record_id,
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message},
    }


def batch_usage(prompt: int, completion: int, cached: int, reasoning: int) -> dict[str, Any]:
    """The batch object's ``usage`` in the Responses-style shape OpenAI gives batches."""
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": prompt + completion,
    }
