"""``/v1/agentic``: server-side agent runs (create, retrieve, cancel, submit, events).

A created run is a row in the store plus its first stream event; a worker runs it (see
:mod:`tail_service.agent.workflows`). This module only validates, stores, and watches:
``background`` runs return at once, others wait until the run rests (ends, or pauses for
the client), and ``stream`` runs tail the run's stored events as SSE. Because events are
stored, ``GET /v1/agentic/{id}/events?after=N`` replays a stream after a disconnect.

Every route is scoped to the caller's tenant: another tenant's run is a 404.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from tail_service.api.body import read_json
from tail_service.api.deps import authenticate, get_services, json_response, query_param, request_id
from tail_service.api.sse import SSEResponse, race_disconnect
from tail_service.core.agent import END_EVENTS, RESTING, TERMINAL, resolve_limits
from tail_service.core.auth import check_model_access, principal_to_json
from tail_service.core.tools import check_schema, cut_text
from tail_service.core.types import Endpoint, Principal
from tail_service.errors import (
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    StreamTimeoutError,
    TailError,
)
from tail_service.schemas.agentic import SAMPLING_FIELDS, AgenticRequest, SubmitRequest
from tail_service.schemas.chat import ChatCompletionRequest
from tail_service.schemas.common import parse_as, parse_body
from tail_service.services import Services
from tail_service.store.agent import AgentStore, NewStep, RunRow, StepRow, dumps

#: fields of an MCP tool that would let a request choose where the server connects
_LOCATION_FIELDS = ("server_url", "url", "command", "headers", "env", "connector_id", "authorization")
#: the events that end a stream
_END_TYPES = frozenset(END_EVENTS.values())
#: longest wait between two looks at a run being waited for
_MAX_POLL = 0.5
#: event numbers are 32-bit in the store
_MAX_SEQ = 2**31 - 1
#: the fastest look at the store while the workers' notices wake the waits
_NOTIFIED_POLL = 0.25
#: seconds of quiet after which the looks slow down (from ``agent.watch_poll`` to ``_MAX_POLL``)
_QUIET = 2.0


def new_run_id(prefix: str = "run") -> str:
    """``run_`` (or ``prefix_``) + the creation time in nanoseconds + randomness (ids sort
    by creation)."""
    return f"{prefix}_{time.time_ns():016x}{os.urandom(8).hex()}"


def _no_such_run(run_id: str) -> NotFoundError:
    return NotFoundError(f"No such run: {run_id}", param="run_id")


def runs_of(services: Services) -> AgentStore:
    return AgentStore(services.store)


def _check_locations(body: Any) -> None:
    """A request may only name an MCP server the operator configured, never a location:
    a URL or command from a client would make the server connect wherever it is told."""
    tools = body.get("tools") if isinstance(body, dict) else None
    if not isinstance(tools, list):
        return
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "mcp":
            continue
        for name in _LOCATION_FIELDS:
            if name in tool:
                raise InvalidRequestError(
                    f"Invalid 'tools[{i}].{name}': MCP servers are configured by the operator; "
                    "name one with 'server'. A request may not give a URL, command or credentials.",
                    param=f"tools[{i}].{name}",
                    code="mcp_server_location_not_allowed",
                )


def _check_tools(
    req: AgenticRequest, principal: Principal, services: Services, builtins: frozenset[str]
) -> None:
    configured = {s.name for s in services.settings.mcp_servers}
    names: dict[str, int] = {}
    for i, tool in enumerate(req.tools):
        if tool.type == "function":
            name = tool.function.name
            if tool.function.parameters is not None:
                try:
                    check_schema(tool.function.parameters)
                except ValueError as exc:
                    raise InvalidRequestError(
                        f"Invalid 'tools[{i}].function.parameters': {exc}.",
                        param=f"tools[{i}].function.parameters",
                    ) from None
        elif tool.type == "builtin":
            name = tool.name
            if name not in builtins:
                raise InvalidRequestError(
                    f"Invalid 'tools[{i}].name': there is no built-in tool '{name}'. "
                    f"Built-in tools: {', '.join(sorted(builtins))}.",
                    param=f"tools[{i}].name",
                )
        else:
            if tool.server not in configured:
                raise InvalidRequestError(
                    f"Invalid 'tools[{i}].server': no MCP server '{tool.server}' is configured"
                    + (f" (configured: {', '.join(sorted(configured))})." if configured else "."),
                    param=f"tools[{i}].server",
                    code="unknown_mcp_server",
                )
            if not principal.allows_mcp_server(tool.server):
                raise PermissionDeniedError(
                    f"This API key may not use the MCP server '{tool.server}' (its own policy "
                    "or its tenant's does not allow it).",
                    param=f"tools[{i}].server",
                    code="mcp_server_not_allowed",
                )
            continue
        if name in names:
            raise InvalidRequestError(
                f"Invalid 'tools[{i}]': tools[{names[name]}] has the same name '{name}'.",
                param=f"tools[{i}]",
            )
        names[name] = i


def _chat_check(
    req: AgenticRequest, body: Mapping[str, Any], messages: list[Any], extra: Mapping[str, Any]
) -> dict[str, Any]:
    """The sampling fields (with ``extra``, passed through), checked with the messages
    exactly as chat completions checks them."""
    sampling = {k: body[k] for k in SAMPLING_FIELDS if k in body and body[k] is not None}
    sampling.update(extra)
    chat: dict[str, Any] = {"model": req.model, "messages": messages, **sampling}
    functions = [t.model_dump(exclude_none=True) for t in req.tools if t.type == "function"]
    if functions:
        chat["tools"] = functions
    if req.tool_choice is not None:
        chat["tool_choice"] = req.tool_choice
    try:
        parse_body(ChatCompletionRequest, chat)
    except InvalidRequestError as exc:
        if req.messages is None and (exc.param or "").startswith("messages"):
            exc.param = "input"  # the messages were made from it
        raise
    return sampling


async def create_run(request: Request) -> Response:
    """``POST /v1/agentic``: store the run (``queued``); a worker runs it."""
    services = get_services(request)
    principal = await authenticate(request, services)
    body, _ = await read_json(request, services.settings.server, services.large_body_gate)
    row, req = await start_run(services, principal, body)
    return await _answer(request, services, row.id, stream=req.stream, background=req.background, after=-1)


async def start_run(
    services: Services,
    principal: Principal,
    body: Mapping[str, Any],
    *,
    run_id: str | None = None,
    extra_sampling: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    steps: Sequence[NewStep] = (),
    unstored: bool = False,
) -> tuple[RunRow, AgenticRequest]:
    """Validate an agentic request ``body`` and store it as a queued run (with ``steps``
    already planned: the run then starts with them). Other front ends (the Responses
    API) give their own id, pass-through sampling fields, and what they keep beside."""
    _check_locations(body)
    req = parse_as(AgenticRequest, body)
    check_model_access(principal, req.model)
    services.router.deployments(req.model, Endpoint.CHAT)  # 404 / 400 now, not in the run
    if (req.messages is None) == (req.input is None):
        raise InvalidRequestError(
            "Give exactly one of 'messages' and 'input'.",
            param="messages" if req.messages is not None else "input",
            code="missing_required_parameter" if req.messages is None else "invalid_value",
        )
    _check_tools(req, principal, services, services.builtin_tools)
    messages = req.messages if req.messages is not None else [{"role": "user", "content": req.input}]
    sampling = _chat_check(req, body, messages, extra_sampling or {})
    policy = services.settings.agent
    limits = resolve_limits(
        {
            "max_steps": req.max_steps,
            "max_tool_calls": req.max_tool_calls,
            "max_time_s": req.max_time_s,
            "max_total_tokens": req.max_total_tokens,
        },
        {
            "max_steps": (policy.max_steps.default, policy.max_steps.max),
            "max_tool_calls": (policy.max_tool_calls.default, policy.max_tool_calls.max),
            "max_time_s": (policy.max_time_s.default, policy.max_time_s.max),
            "max_total_tokens": (policy.max_total_tokens.default, policy.max_total_tokens.max),
        },
    )
    run_request = {
        "tools": [t.model_dump(exclude_none=True) for t in req.tools],
        "tool_choice": req.tool_choice,
        "sampling": sampling,
        "limits": limits.to_dict(),
        **(extra or {}),
    }
    values = {
        "id": run_id or new_run_id(),
        "tenant": principal.tenant,
        "key_id": principal.key_id,
        "principal": principal_to_json(principal),
        "model": req.model,
        "status": "queued",
        "background": req.background,
        "request": dumps(run_request),
        "messages": dumps(messages),
        "segment": 0,
        "metadata": dumps(req.metadata) if req.metadata else None,
        "created_at": int(time.time()),
        "unstored": unstored,
    }
    if steps:  # a run that starts with tool calls (approved in the request that made it)
        values.update(phase="tools", next_step=len(steps))
    row = await services.store.run(runs_of(services).create, values, steps)
    services.wake_agents()
    return row, req


async def _answer(
    request: Request, services: Services, run_id: str, *, stream: bool, background: bool, after: int
) -> Response:
    """A run just queued: at once (``background``), as a stream, or once it rests."""
    if stream:
        return await _event_stream(request, services, run_id, after)
    if not background:
        await race_disconnect(request.receive, until_resting(services, run_id))
    return await _render(services, run_id)


async def _render(services: Services, run_id: str) -> Response:
    runs = runs_of(services)
    row = await services.store.run(runs.get_any, run_id)
    if row is None:
        raise _no_such_run(run_id)
    steps = await services.store.run(runs.steps, run_id)
    return json_response(row.to_openai(steps))


async def until_resting(services: Services, run_id: str) -> None:
    """Wait until the run ends or pauses (bounded by the server's request timeout; the run
    goes on either way)."""
    runs = runs_of(services)
    active = time.monotonic()
    deadline = active + services.settings.server.request_timeout
    seen = -1
    with services.run_watch.watch(run_id) as pause:
        while time.monotonic() < deadline:
            row = await services.store.run(runs.get_any, run_id)
            if row is None or row.status in RESTING:
                return
            if row.next_seq != seen:  # something happened: keep looking often
                seen, active = row.next_seq, time.monotonic()
            await pause(_poll(services, active))


async def events_of(services: Services, run_id: str, after: int) -> AsyncGenerator[tuple[str, bytes], None]:
    """The run's events numbered above ``after``, as they are stored, up to the next event
    that ends a stream; or none if the run rests and has nothing newer. A stream still open
    at the server's request timeout ends with an error that says how to resume it."""
    runs = runs_of(services)
    active = time.monotonic()
    deadline = active + services.settings.server.request_timeout
    with services.run_watch.watch(run_id) as pause:
        while True:
            found = await services.store.run(runs.events, run_id, after)
            for seq, kind, data in found:
                after = seq
                yield kind, data
                if kind in _END_TYPES:
                    return
            if found:
                active = time.monotonic()
                continue
            row = await services.store.run(runs.get_any, run_id)
            if row is None or (row.status in RESTING and row.next_seq - 1 <= after):
                return
            if time.monotonic() >= deadline:
                raise StreamTimeoutError(
                    f"The event stream reached this server's limit of "
                    f"{services.settings.server.request_timeout:g} s; the run goes on. Resume "
                    "the stream after the last sequence_number received."
                )
            await pause(_poll(services, active))


def _poll(services: Services, since: float) -> float:
    """How long to wait before the next look: ``agent.watch_poll`` while the run was
    active in the last ``_QUIET`` seconds, then slower; with the workers' notices heard,
    the look is only the fallback for a lost one."""
    fast = services.settings.agent.watch_poll
    if services.run_watch.notified:
        fast = max(fast, _NOTIFIED_POLL)
    return fast if time.monotonic() - since < _QUIET else max(fast, _MAX_POLL)


def frame_event(item: tuple[str, bytes]) -> bytes:
    kind, data = item
    return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"


def _error_frame(exc: BaseException, rid: str) -> bytes:
    error = exc if isinstance(exc, TailError) else TailError(f"The stream failed (request id {rid}).")
    return b"event: error\ndata: " + orjson.dumps({"type": "error", **error.body()}) + b"\n\n"


async def _event_stream(request: Request, services: Services, run_id: str, after: int) -> Response:
    return await sse_events(request, services, events_of(services, run_id, after), _error_frame)


async def sse_events(
    request: Request,
    services: Services,
    events: AsyncGenerator[tuple[str, bytes], None],
    error_framer: Callable[[BaseException, str], bytes],
) -> Response:
    """``(event type, JSON)`` pairs as SSE (``event:`` and ``data:`` lines, no ``[DONE]``);
    an empty stream when there is nothing to send."""
    first = await race_disconnect(request.receive, anext(events, None))
    if first is None:
        await events.aclose()
        return Response(b"", media_type="text/event-stream")
    return SSEResponse(
        first,
        events,
        request_id=request_id(request),
        keepalive=services.settings.server.sse_keepalive,
        framer=frame_event,
        done=None,
        error_framer=error_framer,
    )


async def _owned(request: Request) -> tuple[Services, Principal, RunRow]:
    services = get_services(request)
    principal = await authenticate(request, services)
    run_id = request.path_params["run_id"]
    row = await services.store.run(runs_of(services).get, principal.tenant, run_id)
    if row is None:
        raise _no_such_run(run_id)
    return services, principal, row


async def retrieve_run(request: Request) -> Response:
    """``GET /v1/agentic/{run_id}``: the run with its steps."""
    services, _, row = await _owned(request)
    return await _render(services, row.id)


async def cancel_run(request: Request) -> Response:
    """``POST /v1/agentic/{run_id}/cancel``: a queued or paused run ends now; a working
    one stops before its next step."""
    services, principal, row = await _owned(request)
    if row.status in TERMINAL and row.status != "cancelled":
        raise ConflictError(
            f"Cannot cancel a run with status `{row.status}`.", param="run_id", code="run_not_cancellable"
        )
    await services.store.run(runs_of(services).request_cancel, principal.tenant, row.id, int(time.time()))
    return await _render(services, row.id)


async def run_events(request: Request) -> Response:
    """``GET /v1/agentic/{run_id}/events?after=N``: the run's stream events after ``N``
    (all of them without ``after``), then live ones until the stream's end event."""
    services, _, row = await _owned(request)
    raw = request.query_params.get("after")
    after = -1
    if raw is not None:
        try:
            after = int(raw)
        except ValueError:
            after = -2
        if after < -1:
            raise InvalidRequestError("Invalid 'after': must be an integer of -1 or more.", param="after")
        after = min(after, _MAX_SEQ)  # no event is numbered above it (nor may a query say more)
    return await _event_stream(request, services, row.id, after)


async def submit_run(request: Request) -> Response:
    """``POST /v1/agentic/{run_id}/submit``: the outputs of the client's tool calls and the
    approvals the run waits for; the run goes on in a new segment."""
    services, _, row = await _owned(request)
    body, _ = await read_json(request, services.settings.server, services.large_body_gate)
    req = parse_as(SubmitRequest, body)
    if row.status != "requires_action":
        raise ConflictError(
            f"The run is not waiting for tool outputs or approvals (status `{row.status}`).",
            param="run_id",
            code="run_not_waiting",
        )
    runs = runs_of(services)
    waiting = {
        s.data["tool_call_id"]: s
        for s in await services.store.run(runs.steps, row.id)
        if s.status in ("awaiting_output", "awaiting_approval")
    }
    answered: dict[str, NewStep] = {}

    def take(field: str, i: int, call_id: str, want: str) -> dict[str, Any]:
        step: StepRow | None = waiting.get(call_id)
        what = "an output" if want == "awaiting_output" else "an approval"
        if step is None or step.status != want:
            raise InvalidRequestError(
                f"Invalid '{field}[{i}].tool_call_id': the run does not wait for {what} of '{call_id}'.",
                param=f"{field}[{i}].tool_call_id",
            )
        if call_id in answered:
            raise InvalidRequestError(
                f"Invalid '{field}[{i}].tool_call_id': '{call_id}' is answered twice.",
                param=f"{field}[{i}].tool_call_id",
            )
        return {"step_no": step.step_no, **step.data}

    max_bytes = services.settings.agent.max_tool_output_bytes
    for i, out in enumerate(req.tool_outputs):
        data = take("tool_outputs", i, out.tool_call_id, "awaiting_output")
        data.update(status="completed", output=cut_text(out.output, max_bytes))
        answered[out.tool_call_id] = (data.pop("step_no"), "tool_call", "completed", data)
    for i, approval in enumerate(req.approvals):
        data = take("approvals", i, approval.tool_call_id, "awaiting_approval")
        if approval.approve:
            data.update(status="pending", approved=True)
        else:
            reason = approval.reason
            denial = "The user denied this tool call" + (f": {reason}" if reason else ".")
            data.update(status="denied", approved=False, error=denial)
        answered[approval.tool_call_id] = (data.pop("step_no"), "tool_call", data["status"], data)
    missing = sorted(set(waiting) - set(answered))
    if missing:
        raise InvalidRequestError(
            f"The run also waits for: {', '.join(missing)}. Submit every output and approval at once.",
            param="tool_outputs" if waiting[missing[0]].status == "awaiting_output" else "approvals",
            code="missing_required_parameter",
        )
    values = {
        "status": "queued",
        "phase": "tools",
        "segment": row.segment + 1,
        "required_action": None,
    }
    where = {"status": "requires_action", "segment": row.segment, "next_step": row.next_step}
    submitted = {"tool_call_ids": sorted(answered)}
    done = await services.store.run(
        runs.advance, row.id, where, values, [("run.submitted", submitted)], list(answered.values())
    )
    if not done:
        raise ConflictError(
            "The run was submitted to or cancelled meanwhile.", param="run_id", code="run_not_waiting"
        )
    services.wake_agents()
    # nothing else writes events while a run waits: ``run.submitted`` got ``next_seq``
    after = row.next_seq - 1
    return await _answer(request, services, row.id, stream=req.stream, background=req.background, after=after)


#: the OpenAPI document's additions for these routes (query parameters)
OPENAPI: dict[tuple[str, str], dict[str, object]] = {
    ("GET", "/v1/agentic/{run_id}/events"): {
        "parameters": [query_param("after", {"type": "integer", "minimum": -1})]
    },
}
