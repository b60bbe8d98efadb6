"""Pure, deterministic payload builders for the fake OpenAI upstream (no I/O).

Wire shapes follow shared/docs/openai-contract.md §2, §4, §5, §6. A "token" is a whitespace-separated
word that keeps its leading whitespace, so ``"".join(split_tokens(s)) == s``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import re
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

SSE_DONE = b"data: [DONE]\n\n"
_TOKEN_RE = re.compile(r"\s*\S+")
_SAMPLE_ARGS = {"city": "Paris", "location": "Paris", "ticker": "AAPL", "symbol": "AAPL"}
_EMBEDDING_FIELDS = {"model", "input", "encoding_format", "dimensions", "user"}


class BadRequest(Exception):
    """A request the fake rejects (HTTP 400 unless told) with an invalid_request_error envelope."""

    def __init__(
        self, message: str, param: str | None = None, code: str | None = None, status: int = 400
    ) -> None:
        super().__init__(message)
        self.status, self.body = status, error_body(message, "invalid_request_error", code, param)


def sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def default_error(status: int) -> dict[str, Any]:
    if status == 429:
        return error_body("Rate limit reached for requests (fake).", "requests", "rate_limit_exceeded")
    if status == 401:
        return error_body("Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
    if status == 404:
        return error_body("The model does not exist (fake).", "invalid_request_error", "model_not_found")
    if status == 503:
        return error_body("The engine is currently overloaded, please try again later", "server_error")
    if status >= 500:
        return error_body(
            "The server had an error processing your request. Sorry about that!", "server_error"
        )
    return error_body(f"Fake upstream error {status}.", "invalid_request_error")


def split_tokens(text: str) -> list[str]:
    tokens: list[str] = _TOKEN_RE.findall(text)
    if not tokens:
        return [text] if text else []
    tokens[-1] += text[sum(map(len, tokens)) :]
    return tokens


def count_words(text: str) -> int:
    return len(text.split())


def text_of(content: Any) -> str:
    """Text of a message `content`: a string or a list of parts (only text parts count)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _logprob(i: int) -> float:
    return -round(0.01 * (1 + i % 7), 4)


def token_logprob(token: str, i: int, top: int) -> dict[str, Any]:
    lp = _logprob(i)
    alts = [(token, lp)] + [(f"alt{j}", round(lp - j, 4)) for j in range(1, top)]
    tops = [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in alts[:top]]
    return {"token": token, "logprob": lp, "bytes": list(token.encode()), "top_logprobs": tops}


# --------------------------------------------------------------------------------------------- chat


@dataclass
class ChoicePlan:
    """What one choice answers: content tokens or tool calls."""

    tokens: list[str] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str = "stop"

    @property
    def content(self) -> str | None:
        return None if self.tool_calls else "".join(self.tokens)

    @property
    def completion_tokens(self) -> int:
        calls = self.tool_calls
        return sum(1 + count_words(c["function"]["arguments"]) for c in calls) if calls else len(self.tokens)


def _fake_value(key: str, schema: dict[str, Any]) -> Any:
    if schema.get("enum"):
        return schema["enum"][0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    defaults = {"integer": 1, "number": 1.5, "boolean": True, "array": [], "object": {}}
    return defaults.get(str(kind), _SAMPLE_ARGS.get(key, "test"))


def fake_arguments(function: dict[str, Any]) -> str:
    """Arguments JSON string that fits the tool's JSON Schema (``{"city": "Paris"}`` if none)."""
    props = (function.get("parameters") or {}).get("properties") or {}
    args = {k: _fake_value(k, v or {}) for k, v in props.items()} if props else {"city": "Paris"}
    return json.dumps(args)


def _pick_tools(body: dict[str, Any], text: str, last_role: str) -> list[dict[str, Any]]:
    tools = [t["function"] for t in body.get("tools") or [] if t.get("type") == "function"]
    choice = body.get("tool_choice")
    if not tools or choice == "none":
        return []
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        return [next((t for t in tools if t.get("name") == name), tools[0])]
    lower = text.lower()
    if choice != "required" and (last_role == "tool" or "weather" not in lower):
        return []

    def find(word: str, default: int) -> dict[str, Any]:
        return next((t for t in tools if word in t.get("name", "")), tools[min(default, len(tools) - 1)])

    first = find("weather", 0)
    if (
        "weather" in lower
        and "stock" in lower
        and len(tools) > 1
        and body.get("parallel_tool_calls") is not False
    ):
        second = find("stock", 1)
        return [first, second if second is not first else next(t for t in tools if t is not first)]
    return [first]


def plan_chat(body: dict[str, Any], name: str, call_ids: Iterator[int]) -> list[ChoicePlan]:
    """Deterministic answer: ``"[<name>] " + last user text`` (or the tool results after a tool turn)."""
    messages: list[dict[str, Any]] = body["messages"]
    last_role = str(messages[-1].get("role"))
    user_text = next((text_of(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
    if last_role == "tool":  # answer with the trailing tool results, so agent loops terminate
        start = len(messages)
        while start > 0 and messages[start - 1].get("role") == "tool":
            start -= 1
        user_text = " ".join(text_of(m.get("content")) for m in messages[start:])
    raw_limit = body.get("max_completion_tokens")
    raw_limit = body.get("max_tokens") if raw_limit is None else raw_limit
    limit = None if raw_limit is None else int(raw_limit)
    functions = _pick_tools(body, user_text, last_role)
    plans: list[ChoicePlan] = []
    for i in range(int(body.get("n") or 1)):
        if functions:
            calls = [
                {
                    "id": f"call_{next(call_ids)}",
                    "type": "function",
                    "function": {"name": f["name"], "arguments": fake_arguments(f)},
                }
                for f in functions
            ]
            plans.append(ChoicePlan(tool_calls=calls, finish_reason="tool_calls"))
            continue
        tokens = split_tokens(f"[{name}] {user_text}".rstrip() + (f" #{i}" if i else ""))
        truncated = limit is not None and len(tokens) > limit
        plans.append(ChoicePlan(tokens[:limit], [], "length" if truncated else "stop"))
    return plans


def chat_usage(body: dict[str, Any], plans: Sequence[ChoicePlan]) -> dict[str, int]:
    prompt = max(1, sum(count_words(text_of(m.get("content"))) for m in body["messages"]))
    completion = sum(p.completion_tokens for p in plans)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chat_response(body: dict[str, Any], plans: Sequence[ChoicePlan], base: dict[str, Any]) -> dict[str, Any]:
    top = int(body.get("top_logprobs") or 0)
    choices = []
    for i, p in enumerate(plans):
        message: dict[str, Any] = {"role": "assistant", "content": p.content, "refusal": None}
        if p.tool_calls:
            message["tool_calls"] = p.tool_calls
        logprobs = None
        if body.get("logprobs"):
            content = None if p.tool_calls else [token_logprob(t, j, top) for j, t in enumerate(p.tokens)]
            logprobs = {"content": content, "refusal": None}
        choices.append(
            {"index": i, "message": message, "logprobs": logprobs, "finish_reason": p.finish_reason}
        )
    return {**base, "object": "chat.completion", "choices": choices, "usage": chat_usage(body, plans)}


def _split_arguments(args: str) -> list[str]:
    size = max(1, len(args) // 4)
    return [args[i : i + size] for i in range(0, len(args), size)] or [""]


def interleave(per_choice: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Round-robin the per-choice events: first appearances are in ascending index order."""
    out: list[dict[str, Any]] = []
    for step in range(max((len(evs) for evs in per_choice), default=0)):
        out.extend(evs[step] for evs in per_choice if step < len(evs))
    return out


def chat_stream_chunks(
    body: dict[str, Any], plans: Sequence[ChoicePlan], base: dict[str, Any]
) -> list[dict[str, Any]]:
    """Chunks per contract §4.3 (role, content/tool fragments, finish); the usage chunk is separate."""
    want_lp, top = bool(body.get("logprobs")), int(body.get("top_logprobs") or 0)

    def ch(i: int, delta: dict[str, Any], lp: Any = None, finish: str | None = None) -> dict[str, Any]:
        return {"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}

    per_choice = []
    for i, p in enumerate(plans):
        role = {"role": "assistant", "content": None if p.tool_calls else "", "refusal": None}
        evs = [ch(i, role, {"content": [], "refusal": None} if want_lp and not p.tool_calls else None)]
        for j, tok in enumerate(p.tokens):
            lp = {"content": [token_logprob(tok, j, top)], "refusal": None} if want_lp else None
            evs.append(ch(i, {"content": tok}, lp))
        for k, call in enumerate(p.tool_calls):
            fn = call["function"]
            first = {"index": k, "id": call["id"], "type": "function"}
            evs.append(ch(i, {"tool_calls": [{**first, "function": {"name": fn["name"], "arguments": ""}}]}))
            for frag in _split_arguments(fn["arguments"]):
                evs.append(ch(i, {"tool_calls": [{"index": k, "function": {"arguments": frag}}]}))
        evs.append(ch(i, {}, None, p.finish_reason))
        per_choice.append(evs)
    chunk_base = {**base, "object": "chat.completion.chunk"}
    return [{**chunk_base, "choices": [c]} for c in interleave(per_choice)]


# -------------------------------------------------------------------------------- legacy completions


def prompts_of(prompt: Any) -> list[tuple[str, int]]:
    """(text, prompt token count) per prompt: string | string[] | int[] | int[][]."""
    if prompt is None:
        prompt = "<|endoftext|>"
    if isinstance(prompt, str):
        return [(prompt, count_words(prompt))]
    if prompt and all(isinstance(t, int) for t in prompt):
        return [(" ".join(map(str, prompt)), len(prompt))]
    out = []
    for p in prompt:
        out.append((p, count_words(p)) if isinstance(p, str) else (" ".join(map(str, p)), len(p)))
    return out


def completion_choices(
    body: dict[str, Any], name: str
) -> tuple[list[dict[str, Any]], list[list[str]], dict[str, int]]:
    """Choices (index = prompt*n + i), per-choice emitted tokens (echo included), usage."""
    n, limit = int(body.get("n") or 1), body.get("max_tokens")
    limit = 16 if limit is None else int(limit)
    lp_n, echo = body.get("logprobs"), bool(body.get("echo"))
    choices, streams, completion = [], [], 0
    for p_idx, (ptext, _) in enumerate(prompts_of(body.get("prompt"))):
        for i in range(n):
            tokens = split_tokens(f"[{name}] {ptext}".rstrip() + (f" #{i}" if i else ""))
            finish = "length" if len(tokens) > limit else "stop"
            tokens = tokens[:limit]
            completion += len(tokens)
            emitted = (split_tokens(ptext) if echo else []) + tokens
            logprobs = None
            if lp_n is not None:
                logprobs = legacy_logprobs(emitted, int(lp_n), 0 if echo else len(ptext))
            text = "".join(emitted)
            choices.append(
                {"text": text, "index": p_idx * n + i, "logprobs": logprobs, "finish_reason": finish}
            )
            streams.append(emitted)
    prompt = max(1, sum(count for _, count in prompts_of(body.get("prompt"))))
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    return choices, streams, usage


def legacy_logprobs(tokens: Sequence[str], top: int, offset: int) -> dict[str, Any]:
    offsets, lps, tops = [], [], []
    for j, tok in enumerate(tokens):
        offsets.append(offset)
        offset += len(tok)
        lp = _logprob(j)
        lps.append(lp)
        alts = {tok: lp} | {f"alt{k}": round(lp - k, 4) for k in range(1, top)}
        tops.append(alts)
    return {"tokens": list(tokens), "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def completion_stream_chunks(
    body: dict[str, Any],
    choices: Sequence[dict[str, Any]],
    streams: Sequence[list[str]],
    base: dict[str, Any],
) -> list[dict[str, Any]]:
    lp_n = body.get("logprobs")
    per_choice = []
    for c, tokens in zip(choices, streams, strict=True):
        evs: list[dict[str, Any]] = []
        for j, tok in enumerate(tokens):
            lp = None if lp_n is None else {k: [v[j]] for k, v in c["logprobs"].items()}
            evs.append({"text": tok, "index": c["index"], "logprobs": lp, "finish_reason": None})
        evs.append({"text": "", "index": c["index"], "logprobs": None, "finish_reason": c["finish_reason"]})
        per_choice.append(evs)
    return [{**base, "object": "text_completion", "choices": [c]} for c in interleave(per_choice)]


# ---------------------------------------------------------------------------------------- embeddings


def fake_embedding(item: str | Sequence[int], dim: int) -> list[float]:
    """Deterministic unit vector (float32-exact values) derived from a hash of one input."""
    key = item if isinstance(item, str) else "tokens:" + ",".join(map(str, item))
    rng = random.Random(hashlib.sha256(key.encode()).digest())
    raw = [rng.uniform(-1.0, 1.0) for _ in range(dim)]
    norm = sum(v * v for v in raw) ** 0.5 or 1.0
    return list(struct.unpack(f"<{dim}f", struct.pack(f"<{dim}f", *(v / norm for v in raw))))


def embedding_b64(vector: Sequence[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


def embedding_items(body: dict[str, Any], dim: int) -> tuple[list[str | list[int]], int, str]:
    """Validate an embeddings request: (input items, dimensions, encoding_format) or BadRequest."""
    if unknown := sorted(set(body) - _EMBEDDING_FIELDS):
        raise BadRequest(f"Unrecognized request argument supplied: {unknown[0]}")
    inp = body.get("input")
    single = isinstance(inp, str) or (isinstance(inp, list) and all(isinstance(t, int) for t in inp))
    items: list[Any] = [inp] if single else inp if isinstance(inp, list) else []
    for it in items:
        if not it or not (
            isinstance(it, str) or (isinstance(it, list) and all(isinstance(t, int) for t in it))
        ):
            raise BadRequest("'input' items must be non-empty strings or token arrays", "input")
    if not items:
        raise BadRequest("'input' must be a non-empty string or array", "input")
    dims = body.get("dimensions") or dim
    if not isinstance(dims, int) or not 1 <= dims <= dim:
        raise BadRequest(f"Invalid 'dimensions': must be 1..{dim}.", "dimensions")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise BadRequest("Invalid 'encoding_format': expected 'float' or 'base64'.", "encoding_format")
    return items, dims, fmt


def embeddings_response(
    body: dict[str, Any], items: Sequence[str | list[int]], dim: int, dims: int, fmt: str
) -> dict[str, Any]:
    data = []
    for i, item in enumerate(items):
        vec = fake_embedding(item, dim)[:dims]
        data.append(
            {"object": "embedding", "index": i, "embedding": embedding_b64(vec) if fmt == "base64" else vec}
        )
    tokens = sum(len(it) if isinstance(it, list) else max(1, count_words(it)) for it in items)
    return {
        "object": "list",
        "data": data,
        "model": body["model"],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
