"""The agent loop's logic, without I/O: limits, the tool catalogue, the model-call body,
run objects and stream events.

A run alternates model calls and tool calls until the model answers without asking for
a tool, or a limit is reached. Steps are numbered in the order they are planned (a model
call, then its tool calls in the order the model gave them), so the numbers are the same
however often a crashed run is resumed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from tail_service.core.tools import ToolSpec
from tail_service.errors import InvalidRequestError

#: the Redis channel the HTTP service publishes on when a run waits to start
AGENT_WAKE_CHANNEL = "tail:agent:wake"
#: the Redis channel a worker publishes a run's id on when it stored new events of the run
RUN_EVENTS_CHANNEL = "tail:agent:events"
#: statuses after which nothing changes any more
TERMINAL = frozenset({"completed", "failed", "cancelled", "incomplete"})
#: statuses a waiting client returns on
RESTING = TERMINAL | {"requires_action"}
#: the event that ends a stream, per resting status
END_EVENTS = {
    "completed": "run.completed",
    "failed": "run.failed",
    "cancelled": "run.cancelled",
    "incomplete": "run.incomplete",
    "requires_action": "run.requires_action",
}


@dataclass(frozen=True, slots=True)
class Limits:
    """What one run may use; each is at most the server's cap."""

    max_steps: int
    max_tool_calls: int
    max_time_s: int
    max_total_tokens: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Limits:
        return cls(
            **{k: int(data[k]) for k in ("max_steps", "max_tool_calls", "max_time_s", "max_total_tokens")}
        )


def resolve_limits(asked: Mapping[str, int | None], policy: Mapping[str, tuple[int, int]]) -> Limits:
    """The run's limits: what it asked for (or the default), never above the cap (a 400)."""
    values: dict[str, int] = {}
    for name, (default, cap) in policy.items():
        value = asked.get(name)
        if value is None:
            value = default
        elif value > cap:
            raise InvalidRequestError(
                f"Invalid '{name}': {value} is above this server's maximum of {cap}.",
                param=name,
                code="invalid_value",
            )
        values[name] = value
    return Limits(**values)


@dataclass(frozen=True, slots=True)
class CatalogTool:
    """A tool the model is offered in a run, and who runs it."""

    name: str
    #: ``function`` (the client runs it), ``builtin`` or ``mcp`` (the server does)
    kind: str
    #: the chat-completions tool definition sent to the model
    definition: dict[str, Any]
    server: str | None = None
    #: a call waits for the client's approval first
    approval: bool = False

    @property
    def parameters(self) -> dict[str, Any]:
        params = self.definition["function"].get("parameters")
        return params if isinstance(params, dict) else {"type": "object", "properties": {}}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CatalogTool:
        return cls(**data)


class CatalogError(Exception):
    """The tools of a run cannot be offered together (the run fails with this message)."""


def function_definition(spec: ToolSpec) -> dict[str, Any]:
    return spec.to_openai()


def build_catalog(
    requested: Sequence[Mapping[str, Any]],
    builtins: Mapping[str, ToolSpec],
    listed: Mapping[str, Sequence[ToolSpec]],
    max_tools: int,
) -> list[CatalogTool]:
    """The run's tools in request order; MCP servers contribute the tools they listed
    (``listed[server]``), filtered by ``allowed_tools``. Two tools of one name fail it."""
    out: list[CatalogTool] = []
    for tool in requested:
        kind = tool["type"]
        if kind == "function":
            fn = dict(tool["function"])
            out.append(CatalogTool(fn["name"], "function", {"type": "function", "function": fn}))
        elif kind == "builtin":
            out.append(CatalogTool(tool["name"], "builtin", function_definition(builtins[tool["name"]])))
        else:
            allowed = tool.get("allowed_tools")
            for spec in listed.get(tool["server"], ()):
                if allowed is not None and spec.name not in allowed:
                    continue
                approval = needs_approval(tool.get("require_approval", "always"), spec.name)
                out.append(CatalogTool(spec.name, "mcp", function_definition(spec), tool["server"], approval))
    names: dict[str, CatalogTool] = {}
    for entry in out:
        other = names.setdefault(entry.name, entry)
        if other is not entry:
            raise CatalogError(
                f"Two tools are named '{entry.name}' ({_origin(other)} and {_origin(entry)}); "
                "limit one with allowed_tools."
            )
    if len(out) > max_tools:
        raise CatalogError(f"The run offers {len(out)} tools; at most {max_tools} are allowed.")
    return out


def _origin(tool: CatalogTool) -> str:
    return f"MCP server '{tool.server}'" if tool.kind == "mcp" else f"a {tool.kind} tool"


def needs_approval(policy: Any, tool: str) -> bool:
    """OpenAI's ``require_approval``: ``"always"``, ``"never"``, or a filter whose ``never``
    list exempts tools (any other tool needs approval)."""
    if isinstance(policy, str):
        return policy == "always"
    never = (policy.get("never") or {}).get("tool_names") or ()
    return tool not in never


def model_body(
    request: Mapping[str, Any],
    model: str,
    messages: Sequence[Mapping[str, Any]],
    catalog: Sequence[CatalogTool],
    *,
    first_call: bool,
    tokens_left: int,
    default_max_tokens: int,
) -> dict[str, Any]:
    """The chat-completions body of one model call. ``tool_choice`` applies to the first
    call only (afterwards ``auto``: a forced tool every turn would never end). The
    completion is capped to the tokens the run has left."""
    body: dict[str, Any] = {
        "model": model,
        "messages": list(messages),
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    body.update(request.get("sampling") or {})
    if catalog:
        body["tools"] = [t.definition for t in catalog]
        choice = request.get("tool_choice")
        if first_call and choice is not None:
            body["tool_choice"] = choice
    else:
        body.pop("parallel_tool_calls", None)
    asked = body.get("max_completion_tokens", body.get("max_tokens"))
    if isinstance(asked, int) and asked > tokens_left:
        body.pop("max_tokens", None)
        body["max_completion_tokens"] = tokens_left
    elif asked is None and tokens_left < default_max_tokens:
        body["max_completion_tokens"] = tokens_left
    return body


def tool_message(call_id: str, content: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": content}


def error_output(message: str) -> str:
    """A tool failure as the model sees it."""
    return f"Error: {message}"


def usage_object(prompt: int, completion: int, cached: int = 0, reasoning: int = 0) -> dict[str, Any]:
    """Usage with the chat-completions field names (the details when there are any)."""
    out: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if cached:
        out["prompt_tokens_details"] = {"cached_tokens": cached}
    if reasoning:
        out["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return out


def event(run_id: str, seq: int, kind: str, **data: Any) -> dict[str, Any]:
    """A stream event: ``type``, ``sequence_number``, ``run_id``, then its own fields."""
    return {"type": kind, "sequence_number": seq, "run_id": run_id, **data}
