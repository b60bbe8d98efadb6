"""Pure translation of Anthropic Messages answers into OpenAI chat and legacy completion bodies.

No I/O here: :mod:`tail_service.providers.anthropic` does transport and calls these;
:mod:`.anthropic_stream` uses the shared pieces (:func:`map_stop_reason`,
:func:`openai_usage`, :func:`chat_id`, :func:`tool_call`, :func:`envelope`) for
streamed events. Thinking and server-tool blocks are dropped; a body that is not an
Anthropic ``message`` raises :class:`AnthropicResponseError`. Chat answers are turned
into ``text_completion`` bodies and chunks for legacy ``/v1/completions``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import orjson

from tail_service.providers.anthropic_errors import AnthropicResponseError

_FINISH_REASONS: Mapping[str, str] = MappingProxyType(
    dict.fromkeys(("end_turn", "stop_sequence", "pause_turn"), "stop")
    | dict.fromkeys(("max_tokens", "model_context_window_exceeded"), "length")
    | {"tool_use": "tool_calls", "refusal": "content_filter"}
)


def map_stop_reason(reason: Any) -> str:
    """Anthropic ``stop_reason`` -> OpenAI ``finish_reason`` (unknown/absent -> ``"stop"``)."""
    return _FINISH_REASONS.get(reason, "stop") if isinstance(reason, str) else "stop"


def openai_usage(usage: Any) -> dict[str, Any]:
    """Anthropic ``usage`` -> OpenAI ``usage``; prompt tokens include cache reads and writes."""
    u = usage if isinstance(usage, Mapping) else {}

    def num(key: str) -> int:
        v = u.get(key)
        return v if isinstance(v, int) and not isinstance(v, bool) else 0

    cached = num("cache_read_input_tokens")
    prompt = num("input_tokens") + cached + num("cache_creation_input_tokens")
    completion = num("output_tokens")
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def chat_id(message_id: Any) -> str:
    """``msg_abc`` -> ``chatcmpl-abc`` (a random suffix when the upstream gave no id)."""
    suffix = message_id.removeprefix("msg_") if isinstance(message_id, str) else ""
    return "chatcmpl-" + (suffix or uuid.uuid4().hex)


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def tool_call(tool_id: Any, name: Any, arguments: str, index: int | None = None) -> dict[str, Any]:
    head = {} if index is None else {"index": index}
    return head | {"id": tool_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def envelope(obj: str, id_: Any, created: int, model: str, choices: list[Any]) -> dict[str, Any]:
    return {"id": id_, "object": obj, "created": created, "model": model, "choices": choices}


def from_messages_response(
    resp: dict[str, Any], public_model: str, created: int | None = None
) -> dict[str, Any]:
    """Anthropic ``message`` -> OpenAI ``chat.completion``. Thinking/server-tool blocks are dropped."""
    content = resp.get("content")
    if resp.get("type", "message") != "message" or not isinstance(content, list):
        raise AnthropicResponseError("upstream answer is not an Anthropic message")
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in (b for b in content if isinstance(b, dict)):
        if block.get("type") == "text":
            texts.append(str(block.get("text") or ""))
        elif block.get("type") == "tool_use":
            if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                raise AnthropicResponseError("tool_use block without id or name")
            calls.append(tool_call(block["id"], block["name"], _dumps(block.get("input") or {})))
    text = "".join(texts)
    message: dict[str, Any] = {
        "role": "assistant",
        "content": text or (None if calls else ""),
        "refusal": None,
    }
    if calls:
        message["tool_calls"] = calls
    finish = map_stop_reason(resp.get("stop_reason"))
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
    ts = int(time.time()) if created is None else created
    out = envelope("chat.completion", chat_id(resp.get("id")), ts, public_model, [choice])
    return out | {"usage": openai_usage(resp.get("usage"))}


def _text_envelope(chat: dict[str, Any], text: str | None, finish: str | None) -> dict[str, Any]:
    choices = [] if text is None else [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]
    cmpl_id = "cmpl-" + str(chat["id"]).removeprefix("chatcmpl-")
    return envelope("text_completion", cmpl_id, chat["created"], chat["model"], choices)


def chat_to_text_completion(chat: dict[str, Any]) -> dict[str, Any]:
    """OpenAI ``chat.completion`` (one choice) -> ``text_completion``."""
    choice = chat["choices"][0]
    text = choice["message"].get("content") or ""
    return _text_envelope(chat, text, choice["finish_reason"]) | {"usage": chat["usage"]}


def chat_chunk_to_text_chunk(chunk: dict[str, Any]) -> dict[str, Any] | None:
    """A chat chunk -> a ``text_completion`` chunk; ``None`` for chunks with nothing to say."""
    if not chunk["choices"]:
        return _text_envelope(chunk, None, None) | {"usage": chunk.get("usage")}
    choice = chunk["choices"][0]
    text = choice["delta"].get("content") or ""
    if not text and choice["finish_reason"] is None:
        return None
    return _text_envelope(chunk, text, choice["finish_reason"])
