"""``/v1/responses``: OpenAI's Responses API, served by the agent engine.

A response is an agent run with a ``resp_`` id (see :mod:`tail_service.core.responses` for
the translation). It is stored like any run, scoped to the tenant; ``previous_response_id``
rebuilds the conversation from the store, so it works on any replica after any restart.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from tail_service.api.agentic import events_of, new_run_id, runs_of, sse_events, start_run, until_resting
from tail_service.api.body import read_json
from tail_service.api.deps import PAGE_PARAMS, authenticate, get_services, json_response, query_param
from tail_service.api.sse import race_disconnect
from tail_service.core import responses as rx
from tail_service.core.auth import check_model_access
from tail_service.core.types import Endpoint, Principal
from tail_service.errors import InvalidRequestError, NotFoundError, TailError
from tail_service.schemas.common import parse_as
from tail_service.schemas.responses import CreateResponseRequest
from tail_service.services import Services
from tail_service.store.agent import NewStep, RunRow, StepRow, loads


def _no_such_response(response_id: str) -> NotFoundError:
    return NotFoundError(f"Response with id '{response_id}' not found.", param="response_id")


def response_object(row: RunRow, steps: list[StepRow]) -> dict[str, Any]:
    """The stored run as an OpenAI ``Response``."""
    request = loads(row.request)
    meta: dict[str, Any] = request.get("responses") or {}
    catalog = loads(row.tools) or []
    status = rx.response_status(row.status)
    out = {
        "id": row.id,
        "object": "response",
        "created_at": row.created_at,
        "status": status,
        "background": row.background,
        "error": rx.error_object(loads(row.error)),
        "incomplete_details": rx.incomplete_details(row.incomplete_reason, status),
        "model": row.model,
        "output": rx.output_items(row.id, catalog, [s.data for s in steps]),
        "previous_response_id": meta.get("previous_response_id"),
        "reasoning": {"effort": meta.get("reasoning_effort"), "summary": None},
        "store": meta.get("store", True),
        "tool_choice": meta.get("tool_choice") or "auto",
        "tools": meta.get("tools") or [],
        "truncation": "disabled",
        "usage": rx.usage(row.prompt_tokens, row.completion_tokens, *_details(steps))
        if status != "queued"
        else None,
        "metadata": loads(row.metadata) or {},
    }
    for name in rx.ECHOED_FIELDS:
        out[name] = meta.get(name)
    if out["parallel_tool_calls"] is None:
        out["parallel_tool_calls"] = True
    out["text"] = out["text"] or {"format": {"type": "text"}}
    return out


def _details(steps: list[StepRow]) -> tuple[int, int]:
    """Cached prompt tokens and reasoning tokens, summed over the model calls."""
    cached = reasoning = 0
    for step in steps:
        usage = step.data.get("usage") or {}
        cached += (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        reasoning += (usage.get("completion_tokens_details") or {}).get("reasoning_tokens", 0)
    return cached, reasoning


async def _snapshot(services: Services, run_id: str) -> dict[str, Any]:
    runs = runs_of(services)
    row = await services.store.run(runs.get_any, run_id)
    if row is None:
        raise _no_such_response(run_id)
    return response_object(row, await services.store.run(runs.steps, run_id))


async def _resolve_references(services: Services, principal: Principal, raw: Any) -> Any:
    """``input`` with each ``item_reference`` to an earlier answer of the tenant's replaced
    by that message (an unknown one is left for the translation to refuse)."""
    if not isinstance(raw, list) or not any(
        isinstance(i, dict) and i.get("type") == "item_reference" for i in raw
    ):
        return raw
    runs = runs_of(services)
    out = []
    for item in raw:
        found = (
            rx.parse_message_id(str(item.get("id")))
            if isinstance(item, dict) and item.get("type") == "item_reference"
            else None
        )
        if found is None:
            out.append(item)
            continue
        run_id, step_no = found
        row = await services.store.run(runs.get, principal.tenant, run_id)
        step = await services.store.run(runs.step, run_id, step_no) if row is not None else None
        message = (
            (step.data.get("output") or {}).get("message")
            if step is not None and step.type == "model_call"
            else None
        )
        if not message or not message.get("content"):
            out.append(item)
            continue
        out.append({"type": "message", "role": "assistant", "content": message["content"]})
    return out


async def _history(
    services: Services, principal: Principal, previous_id: str, cont: rx.Continuation
) -> tuple[list[dict[str, Any]], list[NewStep]]:
    """The conversation of the previous response, and the calls it left open, answered by
    this request's items: their results become the new run's first steps."""
    runs = runs_of(services)
    prev = await services.store.run(runs.get, principal.tenant, previous_id)
    if prev is None or not (loads(prev.request).get("responses") or {}).get("store", True):
        raise InvalidRequestError(
            f"Previous response with id '{previous_id}' not found.",
            param="previous_response_id",
            code="previous_response_not_found",
        )
    if prev.status in ("queued", "in_progress"):
        raise InvalidRequestError(
            f"Previous response with id '{previous_id}' is still in progress.",
            param="previous_response_id",
            code="previous_response_in_progress",
        )
    messages: list[dict[str, Any]] = loads(prev.messages)
    if (loads(prev.request).get("responses") or {}).get("instructions"):
        messages = messages[1:]  # instructions do not carry over to the next response
    output = loads(prev.output)
    if prev.status in ("completed", "incomplete") and output:
        messages.append(output)
    if prev.status != "requires_action":
        return messages, []
    steps: list[NewStep] = []
    stored = await services.store.run(runs.steps, prev.id)
    last_model = max((s.step_no for s in stored if s.type == "model_call"), default=-1)
    for step in (s for s in stored if s.type == "tool_call" and s.step_no > last_model):
        data = {k: v for k, v in step.data.items() if k not in ("started_at", "completed_at", "duration_ms")}
        call_id = data["tool_call_id"]
        data["index"] = len(steps)
        data["id"] = f"step_{len(steps)}"
        if step.status == "awaiting_output":
            if call_id not in cont.outputs:
                raise InvalidRequestError(
                    f"No tool output found for function call {call_id}.",
                    param="input",
                    code="missing_tool_output",
                )
            data.update(status="completed", output=cont.outputs[call_id])
        elif step.status == "awaiting_approval":
            approval = rx.approval_id(prev.id, call_id)
            answer = cont.approvals.get(approval)
            if answer is None:
                raise InvalidRequestError(
                    f"No approval response found for MCP approval request {approval}.",
                    param="input",
                    code="missing_approval_response",
                )
            approve, reason = answer
            data["approval_request_id"] = approval
            if approve:
                data.update(status="pending", approved=True)
            else:
                denial = "The user denied this tool call" + (f": {reason}" if reason else ".")
                data.update(status="denied", approved=False, error=denial)
        steps.append((len(steps), "tool_call", data["status"], data))
    return messages, steps


async def create_response(request: Request) -> Response:
    """``POST /v1/responses``."""
    services = get_services(request)
    principal = await authenticate(request, services)
    body, _ = await read_json(request, services.settings.server, services.large_body_gate)
    req = parse_as(CreateResponseRequest, body)
    rx.check_input_size(body["input"])  # before any item_reference is looked up
    check_model_access(principal, body["model"])
    services.router.deployments(body["model"], Endpoint.CHAT)  # 404 / 400 before the rest
    new_messages, cont = rx.input_messages(await _resolve_references(services, principal, body["input"]))
    messages: list[dict[str, Any]] = []
    steps: list[NewStep] = []
    previous = req.previous_response_id
    if previous is not None:
        messages, steps = await _history(services, principal, previous, cont)
        if steps and new_messages:
            raise InvalidRequestError(
                "Send tool outputs and approval responses for the previous response on their own; "
                "add new input in the next request.",
                param="input",
            )
    if req.instructions:
        messages.insert(0, {"role": "system", "content": req.instructions})
    messages.extend(new_messages)
    if not messages:
        raise InvalidRequestError("The input has no messages.", param="input")
    agentic: dict[str, Any] = {
        "model": body["model"],
        "messages": messages,
        "tools": rx.agent_tools(body.get("tools")),
        "stream": bool(body.get("stream")),
        "background": bool(body.get("background")),
    }
    if body.get("tool_choice") is not None:
        agentic["tool_choice"] = rx.tool_choice(body["tool_choice"])
    for name in ("temperature", "top_p", "parallel_tool_calls", "user"):
        if body.get(name) is not None:
            agentic[name] = body[name]
    if body.get("max_output_tokens") is not None:
        agentic["max_completion_tokens"] = body["max_output_tokens"]
    if body.get("max_tool_calls") is not None:
        agentic["max_tool_calls"] = body["max_tool_calls"]
    fmt = rx.response_format(body.get("text"))
    if fmt is not None:
        agentic["response_format"] = fmt
    reasoning = body.get("reasoning")
    effort = reasoning.get("effort") if isinstance(reasoning, dict) else None
    if effort is not None:
        agentic["reasoning_effort"] = effort
    if body.get("metadata"):
        agentic["metadata"] = body["metadata"]
    passthrough = {k: v for k, v in body.items() if k not in rx.CONSUMED}
    meta = {name: body.get(name) for name in rx.ECHOED_FIELDS}
    meta.update(
        tools=[t for t in body.get("tools") or [] if isinstance(t, dict) and t.get("type") != "builtin"],
        tool_choice=body.get("tool_choice"),
        store=body.get("store", True) is not False,
        reasoning_effort=effort,
        previous_response_id=previous,
        input_items=rx.input_items(body["input"]),
    )
    unstored = body.get("store") is False
    if unstored and agentic["background"]:
        raise InvalidRequestError(
            "Background responses must be stored: 'store' may not be false with 'background'.",
            param="store",
        )
    row, _ = await start_run(
        services,
        principal,
        agentic,
        run_id=new_run_id("resp"),
        extra_sampling=passthrough,
        extra={"responses": meta},
        steps=steps,
        unstored=unstored,
    )
    if agentic["stream"]:
        return await _stream(request, services, row.id, forget_after=unstored)
    runs = runs_of(services)
    if not agentic["background"]:
        await race_disconnect(request.receive, until_resting(services, row.id))
    now = await services.store.run(runs.get_any, row.id)
    if now is None:
        raise _no_such_response(row.id)  # deleted meanwhile (a DELETE with its id)
    refused = None if agentic["background"] else rx.refusal(now.status, now.model_calls, loads(now.error))
    answer = response_object(now, await services.store.run(runs.steps, row.id))
    if refused or unstored:  # a refused request, as at OpenAI, or one nobody may read again
        await services.store.run(runs.delete, principal.tenant, row.id)
    if refused:
        raise InvalidRequestError(refused["message"], param=refused["param"], code=refused["code"])
    return json_response(answer)


async def _translated(
    services: Services, run_id: str, after: int, *, starting_after: int = -1, forget_after: bool = False
) -> AsyncGenerator[tuple[str, bytes], None]:
    """The run's events as the Responses API's, from the one numbered above
    ``starting_after``; ``forget_after``: the run is deleted once its stream has ended
    (``store: false``)."""
    translator = rx.StreamTranslator(run_id)
    seq = 0
    async for kind, data in events_of(services, run_id, after):
        event = orjson.loads(data)
        snapshot = None
        if kind in ("run.created", "run.in_progress") or kind in rx.END_EVENTS:
            snapshot = await _snapshot(services, run_id)
            if kind in ("run.created", "run.in_progress"):
                snapshot = rx.as_of(snapshot, kind, event.get("run") or {})
            if kind == "run.in_progress":
                row = await services.store.run(runs_of(services).get_any, run_id)
                translator.catalog = {t["name"]: t for t in (loads(row.tools) if row else None) or []}
        for name, fields in translator.feed(kind, event, snapshot):
            if seq > starting_after:  # the numbering is the same on every replay
                yield name, orjson.dumps({"type": name, "sequence_number": seq, **fields})
            seq += 1
    if forget_after:
        row = await services.store.run(runs_of(services).get_any, run_id)
        if row is not None:
            await services.store.run(runs_of(services).delete, row.tenant, run_id)


def _error_frame(exc: BaseException, rid: str) -> bytes:
    error = exc if isinstance(exc, TailError) else TailError(f"The stream failed (request id {rid}).")
    body = error.body()["error"]
    payload = {
        "type": "error",
        "code": body.get("code"),
        "message": body["message"],
        "param": body.get("param"),
    }
    return b"event: error\ndata: " + orjson.dumps(payload) + b"\n\n"


async def _stream(
    request: Request, services: Services, run_id: str, *, starting_after: int = -1, forget_after: bool = False
) -> Response:
    events = _translated(services, run_id, -1, starting_after=starting_after, forget_after=forget_after)
    return await sse_events(request, services, events, _error_frame)


async def _owned(request: Request) -> tuple[Services, Principal, RunRow]:
    services = get_services(request)
    principal = await authenticate(request, services)
    response_id = request.path_params["response_id"]
    row = await services.store.run(runs_of(services).get, principal.tenant, response_id)
    if row is None or not response_id.startswith("resp_") or not _stored(row):
        raise _no_such_response(response_id)
    return services, principal, row


def _stored(row: RunRow) -> bool:
    return not row.unstored and bool((loads(row.request).get("responses") or {}).get("store", True))


async def retrieve_response(request: Request) -> Response:
    """``GET /v1/responses/{id}`` (``?stream=true`` replays its events, and follows them
    while it runs; ``starting_after=N`` resumes after the event numbered ``N``)."""
    services, _, row = await _owned(request)
    if request.query_params.get("stream") == "true":
        raw = request.query_params.get("starting_after", "-1")
        starting_after = int(raw) if raw.isdigit() or raw == "-1" else None
        if starting_after is None or starting_after > 10**9:
            raise InvalidRequestError(
                "Invalid 'starting_after': must be a non-negative integer (a sequence_number).",
                param="starting_after",
            )
        return await _stream(request, services, row.id, starting_after=starting_after)
    return json_response(await _snapshot(services, row.id))


async def delete_response(request: Request) -> Response:
    """``DELETE /v1/responses/{id}``."""
    services, principal, row = await _owned(request)
    await services.store.run(runs_of(services).delete, principal.tenant, row.id)
    return json_response({"id": row.id, "object": "response.deleted", "deleted": True})


async def cancel_response(request: Request) -> Response:
    """``POST /v1/responses/{id}/cancel``: background responses only."""
    services, principal, row = await _owned(request)
    if not row.background:
        raise InvalidRequestError(
            "Only responses created with background=true can be cancelled.", param="response_id"
        )
    await services.store.run(runs_of(services).request_cancel, principal.tenant, row.id, int(time.time()))
    return json_response(await _snapshot(services, row.id))


async def list_input_items(request: Request) -> Response:
    """``GET /v1/responses/{id}/input_items?after=&limit=&order=``."""
    _, _, row = await _owned(request)
    items: list[dict[str, Any]] = (loads(row.request).get("responses") or {}).get("input_items") or []
    order = request.query_params.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequestError("Invalid 'order': must be asc or desc.", param="order")
    raw_limit = request.query_params.get("limit", "20")
    limit = int(raw_limit) if raw_limit.isdigit() else 0
    if not 1 <= limit <= 100:
        raise InvalidRequestError("Invalid 'limit': must be an integer from 1 to 100.", param="limit")
    ordered = items if order == "asc" else list(reversed(items))
    after = request.query_params.get("after")
    if after:
        ids = [i["id"] for i in ordered]
        ordered = ordered[ids.index(after) + 1 :] if after in ids else []
    page = ordered[:limit]
    return json_response(
        {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(ordered) > limit,
        }
    )


#: the OpenAPI document's additions for these routes (query parameters)
OPENAPI: dict[tuple[str, str], dict[str, object]] = {
    ("GET", "/v1/responses/{response_id}"): {
        "parameters": [
            query_param("stream", {"type": "boolean"}),
            query_param("starting_after", {"type": "integer", "minimum": 0, "maximum": 10**9}),
        ]
    },
    ("GET", "/v1/responses/{response_id}/input_items"): {
        "parameters": [*PAGE_PARAMS, query_param("order", {"type": "string", "enum": ["asc", "desc"]})]
    },
}
