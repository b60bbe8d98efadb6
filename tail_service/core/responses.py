"""OpenAI's Responses API on the agent engine: the one place requests, response objects
and stream events are translated (no I/O).

A response is an agent run (its id is ``resp_…``). Its input items become the run's
chat-completions messages, its tools the run's tools; the run's steps become the
response's output items, and the run's stream events the Responses semantic events. A
function call the client must answer, or an MCP call waiting for approval, ends the
response ``completed`` with those items last; the client continues with
``previous_response_id`` (the conversation is rebuilt from the store) and
``function_call_output`` / ``mcp_approval_response`` items.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tail_service.errors import InvalidRequestError

#: request fields the translation reads; the rest of the body passes on to the model
#: (as on the other endpoints) unless the Responses API defines it for itself
CONSUMED = frozenset(
    {
        "model",
        "input",
        "instructions",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "max_output_tokens",
        "max_tool_calls",
        "temperature",
        "top_p",
        "text",
        "reasoning",
        "metadata",
        "store",
        "previous_response_id",
        "background",
        "stream",
        "stream_options",
        "include",
        "truncation",
        "service_tier",
        "prompt_cache_key",
        "safety_identifier",
        "user",
        "top_logprobs",
        "conversation",
        "prompt",
    }
)
#: items one request's ``input`` may hold
MAX_INPUT_ITEMS = 10_000
#: request fields a response object echoes as they were given
ECHOED_FIELDS = (
    "instructions",
    "max_output_tokens",
    "max_tool_calls",
    "parallel_tool_calls",
    "temperature",
    "top_p",
    "user",
    "text",
)
#: Responses tool types the gateway cannot run (hosted by OpenAI)
_HOSTED_TOOLS = (
    "web_search",
    "web_search_preview",
    "file_search",
    "code_interpreter",
    "computer_use_preview",
    "image_generation",
    "local_shell",
    "shell",
    "apply_patch",
)


def _bad(message: str, param: str, code: str = "invalid_value") -> InvalidRequestError:
    return InvalidRequestError(message, param=param, code=code)


def _missing(param: str) -> InvalidRequestError:
    return _bad(f"Missing required parameter: '{param}'.", param, "missing_required_parameter")


def _text_of(content: Any, param: str) -> str | list[dict[str, Any]]:
    """A message's content as chat-completions content (a string, or parts)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(
            f"Invalid '{param}': expected a string or an array of content parts.", param, "invalid_type"
        )
    parts: list[dict[str, Any]] = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        where = f"{param}[{i}]"
        if kind in ("input_text", "output_text", "text"):
            text = part.get("text")
            if not isinstance(text, str):
                raise _missing(f"{where}.text")
            parts.append({"type": "text", "text": text})
        elif kind == "input_image":
            url = part.get("image_url")
            if not isinstance(url, str):
                raise _bad(
                    f"Invalid '{where}': only image_url images are supported (not file_id).",
                    f"{where}.image_url",
                )
            image: dict[str, Any] = {"url": url}
            if part.get("detail") in ("low", "high", "auto"):
                image["detail"] = part["detail"]
            parts.append({"type": "image_url", "image_url": image})
        elif kind == "refusal":
            parts.append({"type": "text", "text": str(part.get("refusal") or "")})
        else:
            raise _bad(f"Invalid '{where}.type': {kind!r} is not supported here.", f"{where}.type")
    if parts and all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


@dataclass
class Continuation:
    """What a request's items say about the previous response's pending calls."""

    outputs: dict[str, str] = field(default_factory=dict)
    approvals: dict[str, tuple[bool, str | None]] = field(default_factory=dict)


def check_input_size(raw: Any, param: str = "input") -> None:
    """A 400 for an ``input`` of more than :data:`MAX_INPUT_ITEMS` items."""
    if isinstance(raw, list) and len(raw) > MAX_INPUT_ITEMS:
        raise _bad(
            f"Invalid '{param}': at most {MAX_INPUT_ITEMS} items are allowed.",
            param,
            "array_above_max_length",
        )


def input_messages(raw: Any, param: str = "input") -> tuple[list[dict[str, Any]], Continuation]:
    """The chat-completions messages of a request's ``input`` (a string or items), and the
    ``function_call_output`` / ``mcp_approval_response`` items that answer the previous
    response's pending calls (by call id)."""
    if isinstance(raw, str):
        return [{"role": "user", "content": raw}], Continuation()
    if not isinstance(raw, list):
        raise _bad(f"Invalid '{param}': expected a string or an array of items.", param, "invalid_type")
    if len(raw) > MAX_INPUT_ITEMS:
        raise _bad(
            f"Invalid '{param}': at most {MAX_INPUT_ITEMS} items are allowed.",
            param,
            "array_above_max_length",
        )
    messages: list[dict[str, Any]] = []
    cont = Continuation()
    called: set[str] = set()  # the call ids of this input's function_call items
    for i, item in enumerate(raw):
        where = f"{param}[{i}]"
        if not isinstance(item, dict):
            raise _bad(f"Invalid '{where}': expected an object.", where, "invalid_type")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise _bad(f"Invalid '{where}.role': {role!r}.", f"{where}.role")
            content = _text_of(item.get("content"), f"{where}.content")
            messages.append({"role": "system" if role == "developer" else role, "content": content})
        elif kind == "function_call":
            new_id = _required_str(item, "call_id", where)
            call = {
                "id": new_id,
                "type": "function",
                "function": {
                    "name": _required_str(item, "name", where),
                    "arguments": str(item.get("arguments") or ""),
                },
            }
            last = messages[-1] if messages else None
            if (
                last is not None
                and last["role"] == "assistant"
                and last.get("tool_calls")
                and not last.get("content")
            ):
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            called.add(new_id)
        elif kind == "function_call_output":
            call_id = _required_str(item, "call_id", where)
            output = item.get("output")
            text = output if isinstance(output, str) else _flatten(output)
            if call_id in called:
                messages.append({"role": "tool", "tool_call_id": call_id, "content": text})
            else:
                cont.outputs[call_id] = text
        elif kind == "mcp_approval_response":
            request_id = _required_str(item, "approval_request_id", where)
            approve = item.get("approve")
            if not isinstance(approve, bool):
                raise _missing(f"{where}.approve")
            reason = item.get("reason")
            cont.approvals[request_id] = (approve, reason if isinstance(reason, str) else None)
        elif kind == "item_reference":
            raise _bad(f"Invalid '{where}.id': no stored item has this id.", f"{where}.id")
        elif kind in ("reasoning", "mcp_list_tools", "mcp_approval_request", "mcp_call"):
            continue  # earlier output items a stateless client sends back: the model needs none
        else:
            raise _bad(f"Invalid '{where}.type': {kind!r} is not supported.", f"{where}.type")
    return messages, cont


def input_items(raw: Any) -> list[dict[str, Any]]:
    """A request's ``input`` as the items ``input_items`` lists, each with an id."""
    items = [{"type": "message", "role": "user", "content": raw}] if isinstance(raw, str) else list(raw)
    out = []
    for i, item in enumerate(items):
        entry = dict(item)
        kind = entry.setdefault("type", "message")
        if kind == "message":
            content = entry.get("content")
            if isinstance(content, str):
                part = "output_text" if entry.get("role") == "assistant" else "input_text"
                entry["content"] = [{"type": part, "text": content}]
            entry.setdefault("status", "completed")
        prefix = {"message": "msg", "function_call": "fc", "function_call_output": "fco"}.get(kind, "item")
        entry.setdefault("id", f"{prefix}_{hashlib.sha256(repr((i, item)).encode()).hexdigest()[:40]}")
        out.append(entry)
    return out


def _flatten(output: Any) -> str:
    if isinstance(output, list):
        return "".join(str(p.get("text", "")) for p in output if isinstance(p, dict))
    return "" if output is None else str(output)


def _required_str(item: Mapping[str, Any], name: str, where: str) -> str:
    value = item.get(name)
    if not isinstance(value, str) or not value:
        raise _missing(f"{where}.{name}")
    return value


def agent_tools(raw: Any) -> list[dict[str, Any]]:
    """A request's ``tools`` as agent tools: flat function tools become chat-shaped ones,
    ``mcp`` tools name a configured server by ``server_label`` (never a URL)."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise _bad("Invalid 'tools': expected an array.", "tools", "invalid_type")
    out: list[dict[str, Any]] = []
    for i, tool in enumerate(raw):
        where = f"tools[{i}]"
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind == "function":
            fn = {"name": _required_str(tool, "name", where)}
            for key in ("description", "parameters", "strict"):
                if tool.get(key) is not None:
                    fn[key] = tool[key]
            out.append({"type": "function", "function": fn})
        elif kind == "mcp":
            for name in ("server_url", "connector_id", "headers", "authorization"):
                if name in tool:
                    raise _bad(
                        f"Invalid '{where}.{name}': MCP servers are configured by the operator; name one "
                        "with 'server_label'. A request may not give a URL or credentials.",
                        f"{where}.{name}",
                        "mcp_server_location_not_allowed",
                    )
            mcp: dict[str, Any] = {"type": "mcp", "server": _required_str(tool, "server_label", where)}
            allowed = tool.get("allowed_tools")
            if isinstance(allowed, dict):
                allowed = allowed.get("tool_names")
            if allowed is not None:
                mcp["allowed_tools"] = allowed
            if tool.get("require_approval") is not None:
                mcp["require_approval"] = tool["require_approval"]
            out.append(mcp)
        elif kind == "builtin":
            out.append({"type": "builtin", "name": _required_str(tool, "name", where)})
        elif kind in _HOSTED_TOOLS:
            raise _bad(
                f"Invalid '{where}.type': the hosted tool {kind!r} is not available on this server.",
                f"{where}.type",
                "unsupported_tool",
            )
        else:
            raise _bad(f"Invalid '{where}.type': {kind!r}.", f"{where}.type")
    return out


def tool_choice(raw: Any) -> Any:
    """``tool_choice`` in the chat-completions shape."""
    if raw is None or isinstance(raw, str):
        return raw
    if isinstance(raw, dict) and raw.get("type") == "function" and isinstance(raw.get("name"), str):
        return {"type": "function", "function": {"name": raw["name"]}}
    if isinstance(raw, dict) and raw.get("type") == "mcp":
        return "required" if raw.get("name") else "auto"
    if isinstance(raw, dict) and raw.get("type") == "allowed_tools":
        return raw.get("mode", "auto")
    raise _bad("Invalid 'tool_choice'.", "tool_choice")


def response_format(text: Any) -> dict[str, Any] | None:
    """``text.format`` as chat-completions ``response_format``."""
    if text is None:
        return None
    fmt = text.get("format") if isinstance(text, dict) else None
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        schema = {"name": fmt.get("name") or "response", "schema": fmt.get("schema") or {}}
        if fmt.get("strict") is not None:
            schema["strict"] = fmt["strict"]
        if fmt.get("description") is not None:
            schema["description"] = fmt["description"]
        return {"type": "json_schema", "json_schema": schema}
    raise _bad(f"Invalid 'text.format.type': {kind!r}.", "text.format.type")


def item_id(prefix: str, run_id: str, *parts: object) -> str:
    """A stable id for an output item (the same in the stream and the stored response)."""
    digest = hashlib.sha256(":".join([run_id, *map(str, parts)]).encode()).hexdigest()[:40]
    return f"{prefix}_{digest}"


def message_id(run_id: str, step_no: int) -> str:
    """A message item's id names its response and model call, so an ``item_reference`` to
    it (the Vercel AI SDK sends earlier answers so) is found in the store."""
    return f"msg_{run_id.removeprefix('resp_')}_{step_no}"


def parse_message_id(value: str) -> tuple[str, int] | None:
    """``(response id, step number)`` of an id made by :func:`message_id`."""
    body = value.removeprefix("msg_")
    run, _, step = body.rpartition("_")
    if not value.startswith("msg_") or not run or not step.isdigit():
        return None
    return f"resp_{run}", int(step)


def message_item(run_id: str, step_no: int, text: str, status: str = "completed") -> dict[str, Any]:
    return {
        "id": message_id(run_id, step_no),
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    }


def function_call_item(run_id: str, call: Mapping[str, Any], status: str = "completed") -> dict[str, Any]:
    fn = call.get("function") or {}
    return {
        "id": item_id("fc", run_id, call.get("id")),
        "type": "function_call",
        "call_id": call.get("id"),
        "name": fn.get("name"),
        "arguments": fn.get("arguments") or "",
        "status": status,
    }


def mcp_item(run_id: str, step: Mapping[str, Any]) -> dict[str, Any]:
    """An MCP tool step as its output item: a call, or a request for approval."""
    if step["status"] == "awaiting_approval":
        return {
            "id": approval_id(run_id, step["tool_call_id"]),
            "type": "mcp_approval_request",
            "server_label": step["server"],
            "name": step["name"],
            "arguments": step["arguments"],
        }
    done = step["status"] in ("completed", "failed", "denied")
    return {
        "id": item_id("mcp", run_id, step["tool_call_id"]),
        "type": "mcp_call",
        "server_label": step["server"],
        "name": step["name"],
        "arguments": step["arguments"],
        "output": step.get("output") if done else None,
        "error": step.get("error") if done else None,
        "status": ("failed" if step["status"] != "completed" else "completed") if done else "in_progress",
        "approval_request_id": (step.get("approval_request_id") or approval_id(run_id, step["tool_call_id"]))
        if step.get("approved")
        else None,
    }


def approval_id(run_id: str, call_id: str) -> str:
    return item_id("mcpr", run_id, call_id)


def list_tools_items(run_id: str, catalog: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One ``mcp_list_tools`` item per MCP server the response offers tools of."""
    servers: dict[str, list[dict[str, Any]]] = {}
    for tool in catalog:
        if tool["kind"] == "mcp":
            fn = tool["definition"]["function"]
            servers.setdefault(tool["server"], []).append(
                {
                    "name": fn["name"],
                    "description": fn.get("description"),
                    "input_schema": fn.get("parameters") or {"type": "object"},
                    "annotations": None,
                }
            )
    return [
        {
            "id": item_id("mcpl", run_id, server),
            "type": "mcp_list_tools",
            "server_label": server,
            "tools": tools,
            "error": None,
        }
        for server, tools in servers.items()
    ]


def output_items(
    run_id: str, catalog: Sequence[Mapping[str, Any]], steps: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """The response's output items from the run's steps, in the order the stream gives them."""
    out = list_tools_items(run_id, catalog)
    first_model = next((s["index"] for s in steps if s["type"] == "model_call"), None)
    for step in steps:
        if step["type"] == "tool_call" and step.get("tool") == "mcp":
            if first_model is None or step["index"] < first_model:  # approved in the request
                out.append(mcp_item(run_id, step))
            continue
        if step["type"] != "model_call" or step["status"] != "completed":
            continue
        message = step["output"]["message"]
        if message.get("content"):
            out.append(message_item(run_id, step["index"], message["content"]))
        for call in message.get("tool_calls") or ():
            tool = _step_for(steps, call.get("id"), step["index"])
            if tool is None or tool.get("tool") == "function" or tool.get("tool") is None:
                out.append(function_call_item(run_id, call))
            elif tool.get("tool") == "mcp":
                out.append(mcp_item(run_id, tool))
    return out


def _step_for(steps: Sequence[Mapping[str, Any]], call_id: Any, after: int) -> Mapping[str, Any] | None:
    return next(
        (
            s
            for s in steps
            if s["type"] == "tool_call" and s["index"] > after and s["tool_call_id"] == call_id
        ),
        None,
    )


def usage(prompt: int, completion: int, cached: int = 0, reasoning: int = 0) -> dict[str, Any]:
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": prompt + completion,
    }


#: the run's status as the response's (a run paused for the client ends the response)
_STATUS = {
    "queued": "queued",
    "in_progress": "in_progress",
    "requires_action": "completed",
    "completed": "completed",
    "failed": "failed",
    "cancelled": "cancelled",
    "incomplete": "incomplete",
}
#: the run's reasons the Responses API has a name for
_INCOMPLETE = {
    "max_output_tokens": "max_output_tokens",
    "max_total_tokens": "max_output_tokens",
    "content_filter": "content_filter",
}


def response_status(run_status: str) -> str:
    return _STATUS[run_status]


def as_of(response: Mapping[str, Any], kind: str, run: Mapping[str, Any]) -> dict[str, Any]:
    """``response`` (as stored now) as it stood at the stream event ``kind``
    (``run.created`` or ``run.in_progress``, whose run summary is ``run``): its status then,
    no usage or outcome yet, and only the output that existed then (none; then the MCP tool
    lists). A replay, or a reader that lags behind the worker, then sends what a live
    stream sends: the SDKs build their snapshot from these events."""
    early = [i for i in response.get("output") or () if i.get("type") == "mcp_list_tools"]
    return {
        **response,
        "status": _STATUS.get(str(run.get("status")), "in_progress"),
        "output": early if kind == "run.in_progress" else [],
        "usage": None,
        "error": None,
        "incomplete_details": None,
    }


def incomplete_details(reason: str | None, status: str) -> dict[str, Any] | None:
    if status != "incomplete":
        return None
    return {"reason": _INCOMPLETE.get(reason or "")}


def error_object(error: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A run's error in the Responses API's shape (its ``code`` is one of the spec's)."""
    if not error:
        return None
    if "rate_limit" in str(error.get("code") or ""):
        code = "rate_limit_exceeded"
    elif error.get("type") == "invalid_request_error":  # the model's side refused the request
        code = "invalid_prompt"
    else:
        code = "server_error"
    return {"code": code, "message": str(error.get("message") or "The response failed.")}


def refusal(status: str, model_calls: int, error: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The OpenAI error body of a request the model's side refused outright (its first model
    call was an ``invalid_request_error``), which a waiting client gets as a 400, as from
    OpenAI; ``None`` for any other outcome."""
    if status != "failed" or model_calls or not error or error.get("type") != "invalid_request_error":
        return None
    return {
        "message": str(error.get("message") or "The request was refused."),
        "type": "invalid_request_error",
        "param": error.get("param"),
        "code": error.get("code"),
    }


def iter_text(output: Sequence[Mapping[str, Any]]) -> Iterator[str]:
    for item in output:
        if item.get("type") == "message":
            for part in item.get("content") or ():
                if part.get("type") == "output_text":
                    yield str(part.get("text") or "")


#: the Responses event that ends a stream, per run event that ends an agent stream
END_EVENTS = {
    "run.completed": "response.completed",
    "run.requires_action": "response.completed",
    "run.incomplete": "response.incomplete",
    "run.failed": "response.failed",
    "run.cancelled": "response.failed",
}
#: a translated event: its type and its own fields (``sequence_number`` is added on output)
Event = tuple[str, dict[str, Any]]


class StreamTranslator:
    """Turns a run's stored stream events into the Responses API's semantic events.

    Output indexes follow the order of the stored response's ``output`` (see
    :func:`output_items`): the MCP tool lists, then per model call its message and its
    calls. ``snapshot`` is the response object as stored when the event was written; the
    caller passes it for the events that carry the whole response.
    """

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.catalog: dict[str, Mapping[str, Any]] = {}
        self._next_index = 0
        self._open: tuple[int, int, list[str]] | None = None  # (step, output index, texts)
        self._mcp: dict[str, tuple[int, dict[str, Any]]] = {}  # call id -> (index, item)

    def _index(self) -> int:
        self._next_index += 1
        return self._next_index - 1

    def feed(
        self, kind: str, data: Mapping[str, Any], snapshot: Mapping[str, Any] | None = None
    ) -> list[Event]:
        if kind == "run.created":
            return [("response.created", {"response": snapshot})]
        if kind == "run.in_progress":
            return self._in_progress(data, snapshot)
        if kind == "message.delta":
            return self._delta(int(data["step"]), str(data["delta"]))
        if kind == "step.completed" and data["step"]["type"] == "model_call":
            return self._model_done(data["step"])
        if kind == "tool_call.started":
            return self._tool_started(data["step"])
        if kind == "tool_call.completed":
            return self._tool_done(data["step"])
        if kind in END_EVENTS:
            return [(END_EVENTS[kind], {"response": snapshot})]
        return []

    def _in_progress(self, data: Mapping[str, Any], snapshot: Mapping[str, Any] | None) -> list[Event]:
        out: list[Event] = [("response.in_progress", {"response": snapshot})]
        for item in (snapshot or {}).get("output") or ():
            if item.get("type") == "mcp_list_tools":
                index = self._index()
                out.append(("response.output_item.added", {"output_index": index, "item": item}))
                out.append(("response.output_item.done", {"output_index": index, "item": item}))
        return out

    def _delta(self, step: int, text: str) -> list[Event]:
        out: list[Event] = []
        if self._open is None or self._open[0] != step:
            out.extend(self._open_message(step))
        assert self._open is not None
        self._open[2].append(text)
        item = message_id(self.run_id, step)
        out.append(
            (
                "response.output_text.delta",
                {
                    "item_id": item,
                    "output_index": self._open[1],
                    "content_index": 0,
                    "delta": text,
                    "logprobs": [],
                },
            )
        )
        return out

    def _open_message(self, step: int) -> list[Event]:
        index = self._index()
        self._open = (step, index, [])
        item = message_item(self.run_id, step, "", status="in_progress")
        item["content"] = []
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        return [
            ("response.output_item.added", {"output_index": index, "item": item}),
            (
                "response.content_part.added",
                {"item_id": item["id"], "output_index": index, "content_index": 0, "part": part},
            ),
        ]

    def _model_done(self, step: Mapping[str, Any]) -> list[Event]:
        out: list[Event] = []
        if step.get("status") != "completed":
            self._open = None
            return out
        message = step["output"]["message"]
        text = message.get("content")
        if text:
            if self._open is None or self._open[0] != step["index"]:
                out.extend(self._open_message(step["index"]))
            assert self._open is not None
            index = self._open[1]
            item = message_item(self.run_id, step["index"], text)
            part = item["content"][0]
            where = {"item_id": item["id"], "output_index": index, "content_index": 0}
            out.append(("response.output_text.done", {**where, "text": text, "logprobs": []}))
            out.append(("response.content_part.done", {**where, "part": part}))
            out.append(("response.output_item.done", {"output_index": index, "item": item}))
        self._open = None
        for call in message.get("tool_calls") or ():
            out.extend(self._call(call))
        return out

    def _call(self, call: Mapping[str, Any]) -> list[Event]:
        name = (call.get("function") or {}).get("name")
        tool = self.catalog.get(str(name))
        kind = tool["kind"] if tool is not None else "function"
        if kind == "builtin":
            return []  # run by the server, and not an item of the Responses API
        index = self._index()
        if kind == "mcp":
            assert tool is not None
            step = {
                "tool_call_id": call.get("id"),
                "server": tool["server"],
                "name": name,
                "arguments": (call.get("function") or {}).get("arguments") or "",
                "status": "awaiting_approval" if tool.get("approval") else "pending",
            }
            item = mcp_item(self.run_id, step)
            if item["type"] == "mcp_approval_request":
                return [
                    ("response.output_item.added", {"output_index": index, "item": item}),
                    ("response.output_item.done", {"output_index": index, "item": item}),
                ]
            self._mcp[str(call.get("id"))] = (index, item)
            return [
                ("response.output_item.added", {"output_index": index, "item": item}),
                ("response.mcp_call.in_progress", {"item_id": item["id"], "output_index": index}),
            ]
        added = function_call_item(self.run_id, call, status="in_progress")
        added["arguments"] = ""
        done = function_call_item(self.run_id, call)
        where = {"item_id": done["id"], "output_index": index}
        return [
            ("response.output_item.added", {"output_index": index, "item": added}),
            ("response.function_call_arguments.delta", {**where, "delta": done["arguments"]}),
            (
                "response.function_call_arguments.done",
                {**where, "name": done["name"], "arguments": done["arguments"]},
            ),
            ("response.output_item.done", {"output_index": index, "item": done}),
        ]

    def _tool_started(self, step: Mapping[str, Any]) -> list[Event]:
        """An approved MCP call that a continuation runs first (no model call announced it)."""
        if step.get("tool") != "mcp" or str(step.get("tool_call_id")) in self._mcp:
            return []
        index = self._index()
        item = mcp_item(self.run_id, {**step, "status": "pending"})
        self._mcp[str(step.get("tool_call_id"))] = (index, item)
        return [
            ("response.output_item.added", {"output_index": index, "item": item}),
            ("response.mcp_call.in_progress", {"item_id": item["id"], "output_index": index}),
        ]

    def _tool_done(self, step: Mapping[str, Any]) -> list[Event]:
        found = self._mcp.pop(str(step.get("tool_call_id")), None)
        if found is None:
            return []
        index, _ = found
        item = mcp_item(self.run_id, step)
        outcome = (
            "response.mcp_call.completed" if item["status"] == "completed" else "response.mcp_call.failed"
        )
        return [
            (outcome, {"item_id": item["id"], "output_index": index}),
            ("response.output_item.done", {"output_index": index, "item": item}),
        ]
