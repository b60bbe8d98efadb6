"""Pure translation of OpenAI chat (and legacy completion) requests into Anthropic Messages requests.

No I/O here: :mod:`tail_service.providers.anthropic` does transport and calls these;
answers go back through :mod:`.anthropic_response` and :mod:`.anthropic_stream`.

Request mapping (:func:`to_messages_request`), the lossy parts:

* ``system``/``developer`` messages, wherever they appear, are hoisted into the top-level
  ``system`` string (joined with blank lines). Consecutive same-role turns are merged,
  since Anthropic requires user/assistant alternation; ``tool`` messages become
  ``tool_result`` blocks in a user turn, placed before any text of that turn.
* ``max_tokens`` is required by Anthropic: ``max_completion_tokens`` wins over
  ``max_tokens``, and :data:`DEFAULT_MAX_TOKENS` is used when both are absent.
* ``temperature`` is clamped from OpenAI's 0..2 to Anthropic's 0..1 (not rescaled).
* ``response_format`` ``json_object``/``json_schema`` has no native equivalent; it adds a
  system instruction asking for JSON only (with the schema, if any). Best effort.
* ``n > 1``, non-text/image content parts and non-function tools raise
  :class:`AnthropicRequestError` (the adapter answers 400). OpenAI-only knobs
  (penalties, ``logit_bias``, ``logprobs``, ``seed``, ``metadata`` ...) are dropped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson

from tail_service.providers.anthropic_errors import AnthropicRequestError

#: ``max_tokens`` sent when the client gave none (Anthropic requires one).
DEFAULT_MAX_TOKENS = 4096
#: OpenAI's documented default for legacy ``/v1/completions``.
LEGACY_DEFAULT_MAX_TOKENS = 16
JSON_INSTRUCTION = (
    "Respond with a single valid JSON value only: no prose, no explanations, no Markdown code fences."
)

_BAD_TOOL_ID_CHARS = re.compile(r"[^A-Za-z0-9_-]")
_LEGACY_ONLY = frozenset({"prompt", "echo", "suffix", "best_of", "logprobs"})


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def _tool_id(value: Any, param: str) -> str:
    """Tool call ids as Anthropic accepts them (``^[A-Za-z0-9_-]+$``), mapped consistently."""
    if not isinstance(value, str) or not value:
        raise AnthropicRequestError(f"'{param}' must be a non-empty string", param=param)
    return _BAD_TOOL_ID_CHARS.sub("_", value)


def _text_of(content: Any, param: str) -> str:
    """Text of a string or text-parts content (system, developer, tool messages)."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        return "".join(
            p.get("text") or "" for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    raise AnthropicRequestError(f"'{param}' must be a string or an array of text parts", param=param)


def _image_block(part: dict[str, Any], param: str) -> dict[str, Any]:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str):
        raise AnthropicRequestError(f"'{param}.image_url.url' must be a string", param=param)
    if url.startswith("data:"):
        header, sep, data = url[5:].partition(",")
        media_type, _, params = header.partition(";")
        if not sep or "base64" not in params.split(";") or not media_type:
            raise AnthropicRequestError(f"'{param}': only base64 data URLs are supported", param=param)
        source: dict[str, Any] = {"type": "base64", "media_type": media_type, "data": data}
    elif url.startswith(("http://", "https://")):
        source = {"type": "url", "url": url}
    else:
        raise AnthropicRequestError(f"'{param}': image URL must be http(s) or a data URL", param=param)
    return {"type": "image", "source": source}


def _content_blocks(content: Any, param: str, *, images: bool) -> list[dict[str, Any]]:
    """String or parts -> Anthropic blocks. Empty text is dropped (Anthropic rejects it)."""
    if content is None or isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise AnthropicRequestError(f"'{param}' must be a string or an array of parts", param=param)
    blocks: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("text", "refusal"):
            text = part.get(kind) if isinstance(part, dict) else None
            block = {"type": "text", "text": text} if isinstance(text, str) and text else None
        elif kind == "image_url" and images and isinstance(part, dict):
            block = _image_block(part, f"{param}[{j}]")
        else:
            raise AnthropicRequestError(
                f"content part type {kind!r} is not supported by anthropic deployments", param=f"{param}[{j}]"
            )
        if block is not None:
            if isinstance(part, dict) and isinstance(part.get("cache_control"), dict):
                block["cache_control"] = part["cache_control"]
            blocks.append(block)
    return blocks


def _tool_use_blocks(tool_calls: Any, param: str) -> list[dict[str, Any]]:
    if tool_calls is None:
        return []
    if not isinstance(tool_calls, list):
        raise AnthropicRequestError(f"'{param}' must be an array", param=param)
    blocks: list[dict[str, Any]] = []
    for j, call in enumerate(tool_calls):
        p = f"{param}[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise AnthropicRequestError(f"'{p}.function.name' is required", param=p)
        args = fn.get("arguments") or ""
        try:
            parsed = orjson.loads(args) if isinstance(args, str) and args.strip() else args or {}
        except orjson.JSONDecodeError:
            raise AnthropicRequestError(f"'{p}.function.arguments' is not valid JSON", param=p) from None
        if not isinstance(parsed, dict):
            raise AnthropicRequestError(f"'{p}.function.arguments' must be a JSON object", param=p)
        tool_id = _tool_id(call.get("id") if isinstance(call, dict) else None, f"{p}.id")
        blocks.append({"type": "tool_use", "id": tool_id, "name": fn["name"], "input": parsed})
    return blocks


def _tool_result(msg: dict[str, Any], param: str) -> dict[str, Any]:
    block: dict[str, Any] = {
        "type": "tool_result",
        "tool_use_id": _tool_id(msg.get("tool_call_id"), f"{param}.tool_call_id"),
    }
    content = msg.get("content")
    if isinstance(content, list):
        parts = _content_blocks(content, f"{param}.content", images=True)
        if parts:
            block["content"] = parts
    elif content:
        block["content"] = _text_of(content, f"{param}.content")
    return block


def _append(turns: list[dict[str, Any]], role: str, blocks: list[dict[str, Any]]) -> None:
    if not blocks:
        return
    if turns and turns[-1]["role"] == role:
        turns[-1]["content"].extend(blocks)
    else:
        turns.append({"role": role, "content": blocks})


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise AnthropicRequestError("'tools' must be an array", param="tools")
    out: list[dict[str, Any]] = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise AnthropicRequestError(
                "only function tools with a name are supported by anthropic deployments", param=f"tools[{i}]"
            )
        schema = fn.get("parameters")
        item: dict[str, Any] = {
            "name": fn["name"],
            "input_schema": schema if isinstance(schema, dict) else {"type": "object", "properties": {}},
        }
        if fn.get("description"):
            item["description"] = fn["description"]
        out.append(item)
    return out


def _tool_choice(choice: Any, parallel: Any) -> dict[str, Any] | None:
    result: dict[str, Any] | None
    if choice is None:
        result = None
    elif choice in ("auto", "none"):
        result = {"type": choice}
    elif choice == "required":
        result = {"type": "any"}
    elif (
        isinstance(choice, dict)
        and choice.get("type") == "function"
        and isinstance(choice.get("function"), dict)
        and isinstance(choice["function"].get("name"), str)
    ):
        result = {"type": "tool", "name": choice["function"]["name"]}
    else:
        raise AnthropicRequestError(
            "unsupported 'tool_choice' for anthropic deployments", param="tool_choice"
        )
    if parallel is False and (result is None or result["type"] != "none"):
        result = result or {"type": "auto"}
        result["disable_parallel_tool_use"] = True
    return result


def _json_instruction(fmt: Any) -> str | None:
    kind = fmt.get("type") if isinstance(fmt, dict) else fmt
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return JSON_INSTRUCTION
    if kind == "json_schema" and isinstance(fmt, dict):
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if isinstance(schema, dict):
            return f"{JSON_INSTRUCTION} The JSON must conform to this JSON Schema: {_dumps(schema)}"
        return JSON_INSTRUCTION
    raise AnthropicRequestError("unsupported 'response_format'", param="response_format")


def _max_tokens(body: Mapping[str, Any]) -> int:
    value = body.get("max_completion_tokens")
    if value is None:
        value = body.get("max_tokens")
    if value is None:
        return DEFAULT_MAX_TOKENS
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise AnthropicRequestError("'max_tokens' must be a positive integer", param="max_tokens")
    return value


def to_messages_request(body: dict[str, Any], upstream_model: str) -> dict[str, Any]:
    """OpenAI chat request body -> Anthropic Messages request body (see module notes)."""
    if body.get("n") not in (None, 1):
        raise AnthropicRequestError("n>1 is not supported by anthropic deployments", param="n")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise AnthropicRequestError("'messages' must be a non-empty array", param="messages")
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        param = f"messages[{i}]"
        role = msg.get("role") if isinstance(msg, dict) else None
        if not isinstance(msg, dict):
            raise AnthropicRequestError(f"'{param}' must be an object", param=param)
        if role in ("system", "developer"):
            text = _text_of(msg.get("content"), f"{param}.content")
            if text:
                system.append(text)
        elif role == "user":
            _append(turns, "user", _content_blocks(msg.get("content"), f"{param}.content", images=True))
        elif role == "assistant":
            blocks = _content_blocks(msg.get("content"), f"{param}.content", images=False)
            _append(
                turns, "assistant", blocks + _tool_use_blocks(msg.get("tool_calls"), f"{param}.tool_calls")
            )
        elif role == "tool":
            _append(turns, "user", [_tool_result(msg, param)])
        else:
            raise AnthropicRequestError(f"message role {role!r} is not supported", param=f"{param}.role")
    if not turns:
        raise AnthropicRequestError("'messages' needs at least one non-empty user message", param="messages")
    for turn in turns:  # Anthropic wants tool_result blocks first in their user turn
        turn["content"].sort(key=lambda b: b["type"] != "tool_result")

    out: dict[str, Any] = {"model": upstream_model, "messages": turns, "max_tokens": _max_tokens(body)}
    instruction = _json_instruction(body.get("response_format"))
    if instruction:
        system.append(instruction)
    if system:
        out["system"] = "\n\n".join(system)
    if body.get("tools"):
        out["tools"] = _tools(body["tools"])
        choice = _tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
        if choice is not None:
            out["tool_choice"] = choice
    temperature = body.get("temperature")
    if isinstance(temperature, int | float) and not isinstance(temperature, bool):
        out["temperature"] = min(1.0, max(0.0, float(temperature)))
    for key in ("top_p", "top_k"):
        if isinstance(body.get(key), int | float):
            out[key] = body[key]
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    if any(s for s in stops if isinstance(s, str)):
        out["stop_sequences"] = [s for s in stops if isinstance(s, str) and s]
    user = body.get("user") or body.get("safety_identifier")
    if isinstance(user, str) and user:
        out["metadata"] = {"user_id": user}
    if body.get("stream"):
        out["stream"] = True
    return out


def completion_to_chat_body(body: dict[str, Any]) -> dict[str, Any]:
    """Legacy completion body -> chat body with one user message (string ``prompt`` only)."""
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise AnthropicRequestError("anthropic deployments accept only a string 'prompt'", param="prompt")
    unsupported = [k for k in ("echo", "suffix") if body.get(k)]
    unsupported += ["best_of"] if body.get("best_of") not in (None, 1) else []
    if unsupported:
        key = unsupported[0]
        raise AnthropicRequestError(f"'{key}' is not supported by anthropic deployments", param=key)
    chat = {k: v for k, v in body.items() if k not in _LEGACY_ONLY}
    chat["messages"] = [{"role": "user", "content": prompt}]
    if chat.get("max_tokens") is None:
        chat["max_tokens"] = LEGACY_DEFAULT_MAX_TOKENS
    return chat
