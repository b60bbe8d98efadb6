"""Anthropic's streaming events -> OpenAI chat chunks: a pure state machine, no I/O."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from tail_service.errors import ProviderHTTPError, ProviderStreamCut
from tail_service.providers.anthropic_errors import ERROR_STATUS, AnthropicResponseError
from tail_service.providers.anthropic_response import (
    chat_id,
    envelope,
    map_stop_reason,
    openai_usage,
    tool_call,
)


def stream_error(data: Mapping[str, Any]) -> ProviderHTTPError:
    """An SSE ``error`` event -> :class:`ProviderHTTPError` (``overloaded_error`` -> 503, retryable)."""
    err = data.get("error")
    err = err if isinstance(err, Mapping) else {}
    kind = err.get("type")
    status = ERROR_STATUS.get(kind, 500) if isinstance(kind, str) else 500
    message = err.get("message") if isinstance(err.get("message"), str) else None
    return ProviderHTTPError(status, message or f"anthropic stream error {kind!r}", body=dict(data))


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


class StreamTranslator:
    """Anthropic stream events -> OpenAI ``chat.completion.chunk`` dicts; a pure state machine.

    ``message_start`` yields the role chunk (``{"role": "assistant", "content": ""}``);
    text deltas yield ``content``; each ``tool_use`` block gets the next OpenAI tool index
    (0, 1, ... regardless of Anthropic's block index), with ``id``/``type``/``name`` only in
    its first fragment. ``message_stop`` yields the finish chunk (``delta == {}``) and then
    always one usage chunk (``choices == []``), and sets :attr:`done`. Every chunk has the
    same ``id``/``created``/``model``. An ``error`` event raises :class:`ProviderHTTPError`;
    content before ``message_start`` raises :class:`AnthropicResponseError`.
    """

    def __init__(self, public_model: str, created: int | None = None) -> None:
        self._model = public_model
        self._created = int(time.time()) if created is None else created
        self._id: str | None = None
        self._usage: dict[str, Any] = {}
        self._tool_index: dict[int, int] = {}  # Anthropic block index -> OpenAI tool index
        self._tool_has_args: set[int] = set()
        self._stop_reason: Any = None
        #: ``message_stop`` was seen; later events are ignored.
        self.done = False

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> list[dict[str, Any]]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return [envelope("chat.completion.chunk", self._id, self._created, self._model, [choice])]

    def _args(self, k: int, fragment: str) -> list[dict[str, Any]]:
        self._tool_has_args.add(k)
        return self._chunk({"tool_calls": [{"index": k, "function": {"arguments": fragment}}]})

    def feed(self, event_type: str, data: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Translate one event (``event_type`` is the SSE event name, e.g. ``content_block_delta``)."""
        if self.done or event_type == "ping":
            return []
        if event_type == "error":
            raise stream_error(data)
        if event_type == "message_start":
            if self._id is not None:
                return []
            message = _mapping(data.get("message"))
            self._id = chat_id(message.get("id"))
            self._usage = dict(_mapping(message.get("usage")))
            return self._chunk({"role": "assistant", "content": ""})
        if event_type not in _STREAM_EVENTS:
            return []  # unknown events are ignored, as Anthropic asks of clients
        if self._id is None:
            raise AnthropicResponseError(f"{event_type!r} event before message_start")
        index = data.get("index")
        match event_type:
            case "content_block_start":
                return self._block_start(_mapping(data.get("content_block")), index)
            case "content_block_delta":
                return self._block_delta(_mapping(data.get("delta")), index)
            case "content_block_stop":
                k = self._tool_index.get(index) if isinstance(index, int) else None
                if k is not None and k not in self._tool_has_args:
                    return self._args(k, "{}")  # a call without input: keep the arguments valid JSON
                return []
            case "message_delta":
                stop_reason = _mapping(data.get("delta")).get("stop_reason")
                if stop_reason is not None:
                    self._stop_reason = stop_reason
                # usage in message_delta is cumulative: the latest value of each field wins
                self._usage.update({k: v for k, v in _mapping(data.get("usage")).items() if v is not None})
                return []
        self.done = True  # message_stop
        usage = envelope("chat.completion.chunk", self._id, self._created, self._model, [])
        return [
            *self._chunk({}, map_stop_reason(self._stop_reason)),
            usage | {"usage": openai_usage(self._usage)},
        ]

    def _block_start(self, block: Mapping[str, Any], index: Any) -> list[dict[str, Any]]:
        if block.get("type") == "tool_use" and isinstance(index, int):
            k = self._tool_index[index] = len(self._tool_index)
            return self._chunk({"tool_calls": [tool_call(block.get("id"), block.get("name"), "", k)]})
        if block.get("type") == "text" and block.get("text"):
            return self._chunk({"content": block["text"]})
        return []

    def _block_delta(self, delta: Mapping[str, Any], index: Any) -> list[dict[str, Any]]:
        if delta.get("type") == "text_delta" and delta.get("text"):
            return self._chunk({"content": delta["text"]})
        if (
            delta.get("type") == "input_json_delta"
            and delta.get("partial_json")
            and index in self._tool_index
        ):
            return self._args(self._tool_index[index], delta["partial_json"])
        return []  # thinking, signature and citation deltas have no OpenAI chat equivalent

    def finish(self) -> list[dict[str, Any]]:
        """Call at the end of the upstream stream: raise :class:`ProviderStreamCut` unless ``done``."""
        if not self.done:
            raise ProviderStreamCut("anthropic stream ended before message_stop")
        return []


_STREAM_EVENTS = frozenset(
    ("content_block_start", "content_block_delta", "content_block_stop", "message_delta", "message_stop")
)
