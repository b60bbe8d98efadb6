"""The agent loop's steps: each reads the run from the store, does its work (a model call,
a tool call), and applies the result with a conditional update.

The DBOS workflow (:mod:`tail_service.agent.workflows`) calls these steps; DBOS
checkpoints each finished step, so a resumed run never calls a finished step again, and
the conditional updates make the window between a step's write and its checkpoint safe
too. Every model call goes through admission and the model proxy with the run's key, so
it is charged to the key's RPM, TPM and concurrency like any other request.

A segment is the stretch of a run between two pauses for the client: :meth:`begin`
starts it, then model calls and rounds of tool calls (:meth:`model_call`,
:meth:`tool_call`, :meth:`join`) alternate until the run ends or waits for the client.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import random
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from opentelemetry.trace import Tracer

from tail_service.core.agent import (
    END_EVENTS,
    CatalogError,
    CatalogTool,
    Limits,
    build_catalog,
    error_output,
    model_body,
    tool_message,
    usage_object,
)
from tail_service.core.auth import principal_from_json
from tail_service.core.batch import TRANSIENT, usage_details
from tail_service.core.cache import ChatAccumulator
from tail_service.core.inference import InferenceService
from tail_service.core.spans import NOOP_TRACER, step_span
from tail_service.core.tools import Tool, ToolError, ToolSpec, builtin_tools, cut_text, parse_arguments
from tail_service.core.types import Endpoint, ProxyRequest, Source, TokenUsage
from tail_service.errors import QuotaExceededError, RateLimitError, TailError
from tail_service.schemas.chat import ChatCompletionRequest
from tail_service.schemas.common import parse_body
from tail_service.settings import AgentSettings
from tail_service.store import Store
from tail_service.store.agent import AgentStore, NewEvent, NewStep, RunRow, StepRow, dumps, loads

log = logging.getLogger("tail_service.agent")

#: a plan: what the workflow does next (JSON-able, checkpointed by DBOS)
Plan = dict[str, Any]
#: seconds between flushes of streamed text into ``message.delta`` events
DELTA_FLUSH = 0.1
#: the same for a run whose client streams: its first text is flushed at once, then this often
LIVE_DELTA_FLUSH = 0.05
#: seconds between looks at the cancel flag while a tool call runs
STOP_POLL = 0.5
#: transient upstream failures a model call is tried again for
TRANSIENT_RETRIES = 3
_ANY_OBJECT: dict[str, Any] = {"type": "object"}
#: the plan of a run that was deleted meanwhile
_GONE: Plan = {"phase": "end", "step": -1, "tools": []}
_T = TypeVar("_T")


def _quiet(_run_id: str) -> None:
    return None


class McpTools(Protocol):
    """What the loop needs of the MCP client (:class:`tail_service.clients.mcp.McpClient`)."""

    async def list_tools(self, server: str) -> list[ToolSpec]: ...

    async def call_tool(self, server: str, tool: str, arguments: dict[str, Any]) -> str: ...


class _Stopped(Exception):
    """The run was cancelled (or deleted) while a tool call ran."""


class _Ended(Exception):
    """The run ends now: ``status`` with ``reason`` (incomplete) or ``error`` (failed)."""

    def __init__(
        self,
        status: str,
        *,
        reason: str | None = None,
        error: dict[str, Any] | None = None,
        throttled: int = 0,
    ) -> None:
        super().__init__(status)
        self.status, self.reason, self.error = status, reason, error
        #: the model call's attempts refused by the key's rate limits
        self.throttled = throttled


class AgentEngine:
    """Runs the steps of agent runs stored in ``store``."""

    def __init__(
        self,
        settings: AgentSettings,
        store: Store,
        inference: InferenceService,
        mcp: McpTools,
        *,
        default_max_tokens: int = 1024,
        clock: Callable[[], float] = time.time,
        tracer: Tracer = NOOP_TRACER,
        notify: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        #: told a run's id after each write that added events to it (a Redis notice)
        self._notify = notify or _quiet
        #: one span per model call and per tool call step
        self.tracer = tracer
        self.store = store
        self.runs = AgentStore(store)
        self.inference = inference
        self.mcp = mcp
        self.builtins: dict[str, Tool] = builtin_tools(clock)
        self._default_max_tokens = default_max_tokens
        self._clock = clock

    # -- helpers ------------------------------------------------------------------------

    async def _write(self, fn: Callable[..., _T], run_id: str, *args: Any) -> _T:
        """A write to the run's rows (with events); whoever waits on the run hears of it."""
        result = await self.store.run(fn, run_id, *args)
        self._notify(run_id)
        return result

    async def _row(self, run_id: str) -> RunRow | None:
        """The run as stored; ``None`` once it was deleted (a response's ``DELETE``): the
        workflow then just ends."""
        return await self.store.run(self.runs.get_any, run_id)

    def _worked_ms(self, row: RunRow) -> int:
        started = row.segment_started_at or self._clock()
        return row.worked_ms + int((self._clock() - started) * 1000)

    def _limits(self, row: RunRow) -> Limits:
        return Limits.from_dict(loads(row.request)["limits"])

    def _time_left(self, row: RunRow) -> float:
        return self._limits(row).max_time_s - self._worked_ms(row) / 1000

    async def _plan(self, row: RunRow) -> Plan:
        """What comes next for the run as stored (a step that ran before returns this)."""
        pending = [s.step_no for s in await self._round(row) if s.status == "pending"]
        return {"phase": row.phase, "step": row.next_step, "tools": pending}

    async def _round(self, row: RunRow) -> list[StepRow]:
        """The tool steps of the run's current round (after its last model call)."""
        steps = await self.store.run(self.runs.steps, row.id)
        last_model = max((s.step_no for s in steps if s.type == "model_call"), default=-1)
        return [s for s in steps if s.step_no > last_model and s.type == "tool_call"]

    async def _end(
        self,
        row: RunRow,
        expect: Mapping[str, Any],
        ended: _Ended,
        steps: Sequence[NewStep] = (),
        **values: Any,
    ) -> Plan:
        """End the run (``completed``, ``incomplete``, ``failed``, ``cancelled``), writing
        ``steps`` with it."""
        values = {
            "status": ended.status,
            "phase": "end",
            "incomplete_reason": ended.reason,
            "error": dumps(ended.error) if ended.error else None,
            "required_action": None,
            "worked_ms": self._worked_ms(row),
            "completed_at": int(self._clock()),
            "next_step": row.next_step + 1,
            **values,
        }
        summary = dataclasses.replace(row, **values).to_openai()
        events = [*_step_events(steps), (END_EVENTS[ended.status], {"run": summary})]
        await self._write(self.runs.advance, row.id, expect, values, events, steps)
        return {"phase": "end", "step": values["next_step"], "tools": []}

    # -- the steps ----------------------------------------------------------------------

    async def begin(self, run_id: str, segment: int) -> Plan:
        """Start a segment: the run is ``in_progress``; on its first segment the tools are
        resolved (MCP servers list theirs)."""
        row = await self._row(run_id)
        if row is None:
            return _GONE
        if row.segment != segment or row.status != "queued":
            return await self._plan(row)
        request = loads(row.request)
        now = self._clock()
        values: dict[str, Any] = {"status": "in_progress", "segment_started_at": now}
        if row.started_at is None:
            values["started_at"] = int(now)
        expect = {"status": "queued", "segment": segment, "next_step": row.next_step}
        if row.tools is None:
            try:
                catalog = await self._catalog(request["tools"])
            except CatalogError as exc:
                err = {"code": "invalid_tools", "message": str(exc)}
                return await self._end(row, expect, _Ended("failed", error=err))
            values["tools"] = dumps([t.to_dict() for t in catalog])
        started = dataclasses.replace(row, **values)
        await self._write(
            self.runs.advance, run_id, expect, values, [("run.in_progress", {"run": started.to_openai()})]
        )
        row = await self._row(run_id)
        return await self._plan(row) if row is not None else _GONE

    async def _catalog(self, requested: Sequence[Mapping[str, Any]]) -> list[CatalogTool]:
        servers = {t["server"] for t in requested if t["type"] == "mcp"}
        listed: dict[str, list[ToolSpec]] = {}

        async def one(server: str) -> None:
            try:
                listed[server] = await self.mcp.list_tools(server)
            except ToolError as exc:
                # offered by name anyway when the request named them: calls then fail, and
                # the model hears why, like any tool error
                log.warning("cannot list the tools of MCP server %s: %s", server, exc)
                names = next(t.get("allowed_tools") for t in requested if t.get("server") == server) or ()
                listed[server] = [ToolSpec(n, f"A tool of MCP server {server}.") for n in names]

        await asyncio.gather(*(one(s) for s in sorted(servers)))
        return build_catalog(
            requested, {n: t.spec for n, t in self.builtins.items()}, listed, self.settings.max_tools
        )

    @step_span("tail.agent.model_call", "tail.agent.run_id", "tail.agent.step")
    async def model_call(self, run_id: str, step_no: int) -> Plan:
        """One model call (streamed into ``message.delta`` events), then the plan: the end,
        or a round of tool calls. The call's step, the tool steps it plans and the run's
        new state are written in one transaction."""
        row = await self._row(run_id)
        if row is None:
            return _GONE
        expect = {"next_step": step_no, "phase": "model"}
        if row.next_step != step_no or row.phase != "model":
            return await self._plan(row)
        limits = self._limits(row)
        try:
            self._check_limits(row, limits)
        except _Ended as ended:
            return await self._end(row, expect, ended)
        request = loads(row.request)
        catalog = [CatalogTool.from_dict(t) for t in loads(row.tools) or ()]
        messages: list[dict[str, Any]] = loads(row.messages)
        tokens_left = limits.max_total_tokens - row.total_tokens
        body = model_body(
            request,
            row.model,
            messages,
            catalog,
            first_call=row.model_calls == 0,
            tokens_left=tokens_left,
            default_max_tokens=self._default_max_tokens,
        )
        capped = body.get("max_completion_tokens") == tokens_left
        started = self._clock()
        step: dict[str, Any] = {
            "id": f"step_{run_id.removeprefix('run_')}_{step_no}",
            "index": step_no,
            "type": "model_call",
            "status": "in_progress",
            "started_at": started,
            "input": {"messages": new_messages(messages, first=row.model_calls == 0)},
        }
        await self._write(
            self.runs.put_step,
            run_id,
            step_no,
            "model_call",
            "in_progress",
            step,
            [("step.started", {"step": step})],
        )
        try:
            answer, usage, throttled = await self._call_model(row, body, step_no)
        except _Ended as ended:
            status = "failed" if ended.status == "failed" else "incomplete"
            failed = {
                **step,
                "status": status,
                "completed_at": self._clock(),
                "rate_limited": ended.throttled,
            }
            return await self._end(row, expect, ended, [(step_no, "model_call", status, failed)])
        choice = (answer.get("choices") or [{}])[0]
        message = dict(choice.get("message") or {"role": "assistant", "content": None})
        if message.get("refusal") is None:
            message.pop("refusal", None)
        finish = choice.get("finish_reason")
        done = self._clock()
        step.update(
            status="completed",
            completed_at=done,
            duration_ms=int((done - started) * 1000),
            output={"message": message, "finish_reason": finish},
            usage=usage_object(
                usage.prompt_tokens, usage.completion_tokens, *usage_details(answer.get("usage"))
            ),
            rate_limited=throttled,
        )
        model_step: NewStep = (step_no, "model_call", "completed", step)
        counters: dict[str, Any] = {
            "model_calls": row.model_calls + 1,
            "prompt_tokens": row.prompt_tokens + usage.prompt_tokens,
            "completion_tokens": row.completion_tokens + usage.completion_tokens,
        }
        after = dataclasses.replace(row, **counters)
        calls = message.get("tool_calls") or []
        if not calls:
            reason = None
            if finish == "length":
                reason = "max_total_tokens" if capped else "max_output_tokens"
            elif finish == "content_filter":
                reason = "content_filter"
            outcome = _Ended("incomplete", reason=reason) if reason else _Ended("completed")
            return await self._end(after, expect, outcome, [model_step], output=dumps(message), **counters)
        if row.tool_calls + len(calls) > limits.max_tool_calls:
            outcome = _Ended("incomplete", reason="max_tool_calls")
            return await self._end(after, expect, outcome, [model_step], **counters)
        by_name = {t.name: t for t in catalog}
        planned = [self._plan_call(run_id, step_no + 1 + i, call, by_name) for i, call in enumerate(calls)]
        next_step = step_no + 1 + len(calls)
        values = {
            **counters,
            "tool_calls": row.tool_calls + len(calls),
            "messages": dumps([*messages, message]),
            "phase": "tools",
            "next_step": next_step,
        }
        steps = [model_step, *((n, "tool_call", s["status"], s) for n, s in planned)]
        await self._write(self.runs.advance, run_id, expect, values, _step_events(steps[:1]), steps)
        return {
            "phase": "tools",
            "step": next_step,
            "tools": [n for n, s in planned if s["status"] == "pending"],
        }

    def _check_limits(self, row: RunRow, limits: Limits) -> None:
        if row.cancel_requested:
            raise _Ended("cancelled")
        if row.model_calls >= limits.max_steps:
            raise _Ended("incomplete", reason="max_steps")
        if row.total_tokens >= limits.max_total_tokens:
            raise _Ended("incomplete", reason="max_total_tokens")
        if self._time_left(row) <= 0:
            raise _Ended("incomplete", reason="max_time")

    def _plan_call(
        self, run_id: str, step_no: int, call: Mapping[str, Any], tools: Mapping[str, CatalogTool]
    ) -> tuple[int, dict[str, Any]]:
        """A tool call the model asked for, as a step: ``pending`` (the server runs it),
        ``awaiting_output`` / ``awaiting_approval`` (the client must act), or already
        ``failed`` (an unknown tool, invalid arguments: the model hears why)."""
        fn = call.get("function") or {}
        name, raw = str(fn.get("name") or ""), str(fn.get("arguments") or "")
        step: dict[str, Any] = {
            "id": f"step_{run_id.removeprefix('run_')}_{step_no}",
            "index": step_no,
            "type": "tool_call",
            "tool_call_id": str(call.get("id") or f"call_{step_no}"),
            "name": name,
            "arguments": raw,
            "tool": None,
            "server": None,
            "output": None,
            "error": None,
        }
        tool = tools.get(name)
        if tool is None:
            return step_no, {**step, "status": "failed", "error": f"There is no tool named '{name}'."}
        step.update(tool=tool.kind, server=tool.server)
        # a client's own tool is checked to be an object only: its schema comes from the
        # request, and patterns in it would run on the worker (the client validates)
        schema = _ANY_OBJECT if tool.kind == "function" else tool.parameters
        try:
            parse_arguments(schema, raw)
        except ToolError as exc:
            return step_no, {**step, "status": "failed", "error": str(exc)}
        if tool.kind == "function":
            return step_no, {**step, "status": "awaiting_output"}
        if tool.approval:
            return step_no, {**step, "status": "awaiting_approval"}
        return step_no, {**step, "status": "pending"}

    async def _call_model(
        self, row: RunRow, body: dict[str, Any], step_no: int
    ) -> tuple[dict[str, Any], TokenUsage, int]:
        """The model's answer, streamed; waits out the key's rate limits (and tries a
        transient upstream failure again) until the run's time is up."""
        principal = principal_from_json(row.principal)
        try:
            params = parse_body(ChatCompletionRequest, body)  # admission reserves its max tokens
        except TailError as exc:  # e.g. an MCP server's tool schema the chat schema refuses
            raise _Ended("failed", error=exc.body()["error"]) from None
        throttled = transient = 0
        live = bool(loads(row.request).get("stream"))
        while True:
            now = await self._row(row.id)
            if now is None:
                raise _Ended("cancelled", throttled=throttled)
            left = self._time_left(now)
            if left <= 0:
                raise _Ended("incomplete", reason="max_time", throttled=throttled)
            if await self.store.run(self.runs.cancel_requested, row.id):
                raise _Ended("cancelled", throttled=throttled)
            req = ProxyRequest(
                endpoint=Endpoint.CHAT,
                model=row.model,
                body=body,
                params=params,
                request_id="req_" + os.urandom(12).hex(),
                principal=principal,
                source=Source.AGENT,
            )
            try:
                async with asyncio.timeout(left):
                    answer, usage = await self._stream(row.id, req, step_no, live=live)
                return answer, usage, throttled
            except TimeoutError:
                raise _Ended("incomplete", reason="max_time", throttled=throttled) from None
            except TailError as exc:
                if isinstance(exc, QuotaExceededError):  # spent: waiting does not help
                    raise _Ended("incomplete", reason="budget", throttled=throttled) from None
                if isinstance(exc, RateLimitError):
                    throttled += 1
                elif isinstance(exc, TRANSIENT) and transient < TRANSIENT_RETRIES:
                    transient += 1
                else:
                    raise _Ended("failed", error=exc.body()["error"], throttled=throttled) from None
                delay = exc.retry_after if exc.retry_after is not None else 1.0
                delay = min(max(delay, 0.05), self.settings.max_backoff, max(left, 0.05))
                await asyncio.sleep(delay * (0.5 + random.random()))

    async def _stream(
        self, run_id: str, req: ProxyRequest, step_no: int, *, live: bool
    ) -> tuple[dict[str, Any], TokenUsage]:
        stream = await self.inference.open_stream(req)
        acc = ChatAccumulator()
        pending: list[str] = []
        every = LIVE_DELTA_FLUSH if live else DELTA_FLUSH
        flushed = float("-inf") if live else time.monotonic()

        async def flush() -> None:
            """Store the text so far; a cancel (or a delete) seen here stops the answer at
            once: closing the stream ends the upstream's generation."""
            nonlocal flushed
            if pending:
                text = "".join(pending)
                pending.clear()
                event = ("message.delta", {"step": step_no, "delta": text})
                if await self._write(self.runs.append_delta, run_id, [event]):
                    raise _Ended("cancelled")
            flushed = time.monotonic()

        try:
            chunk: dict[str, Any] | None = stream.first
            while chunk is not None:
                acc.feed(chunk)
                for choice in chunk.get("choices") or ():
                    text = (choice.get("delta") or {}).get("content")
                    if text and choice.get("index", 0) == 0:
                        pending.append(text)
                if pending and time.monotonic() - flushed >= every:
                    await flush()
                chunk = await anext(stream.rest, None)
        finally:
            await stream.rest.aclose()
        await flush()
        answer = acc.result()
        if answer is None:
            raise _Ended(
                "failed", error={"code": "upstream_stream_cut", "message": "The model's answer was cut off."}
            )
        usage = TokenUsage.from_openai(answer.get("usage")) or TokenUsage()
        return answer, usage

    @step_span("tail.agent.tool_call", "tail.agent.run_id", "tail.agent.step")
    async def tool_call(self, run_id: str, step_no: int) -> None:
        """Run one server-side tool call; its result (or error) is stored for the model."""
        step = await self.store.run(self.runs.step, run_id, step_no)
        if step is None or step.status != "pending":
            return  # ran before (the checkpoint was lost in a crash), or not ours to run
        data = dict(step.data)
        started = self._clock()
        await self._write(self.runs.append, run_id, [("tool_call.started", {"step": data})])
        try:
            output = await self._unless_stopped(run_id, self._run_tool(data))
            data.update(status="completed", output=output)
        except _Stopped:
            data.update(status="failed", error="The run was cancelled while the tool ran.")
        except ToolError as exc:
            data.update(status="failed", error=str(exc))
        except Exception:  # a tool's bug is the model's tool error too, never the run's end
            log.exception("tool %s failed", data["name"])
            data.update(status="failed", error="The tool failed unexpectedly.")
        done = self._clock()
        data.update(started_at=started, completed_at=done, duration_ms=int((done - started) * 1000))
        await self._write(
            self.runs.put_step,
            run_id,
            step_no,
            "tool_call",
            data["status"],
            data,
            [("tool_call.completed", {"step": data})],
        )

    async def _unless_stopped(self, run_id: str, work: Coroutine[Any, Any, _T]) -> _T:
        """``work``'s result; or :class:`_Stopped`, with ``work`` cancelled, once the run is
        cancelled or deleted (looked at every :data:`STOP_POLL` seconds meanwhile)."""
        task = asyncio.ensure_future(work)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=STOP_POLL)
                if done:
                    return task.result()
                if await self.store.run(self.runs.stopping, run_id):
                    raise _Stopped
        finally:
            if not task.done():
                task.cancel()
                await asyncio.wait({task})  # its end, whatever it is (our own cancel still propagates)
                if not task.cancelled():
                    task.exception()  # retrieved: it is the cancel's doing, not news

    async def _run_tool(self, step: Mapping[str, Any]) -> str:
        arguments = parse_arguments(_ANY_OBJECT, step["arguments"])
        limit = self.settings.max_tool_output_bytes
        if step["tool"] == "mcp":
            return await self.mcp.call_tool(step["server"], step["name"], arguments)
        tool = self.builtins.get(step["name"])
        if tool is None:
            raise ToolError(f"There is no built-in tool named '{step['name']}'.")
        try:
            async with asyncio.timeout(self.settings.tool_timeout):
                return cut_text(await tool.run(arguments), limit)
        except TimeoutError:
            raise ToolError(f"The tool did not answer within {self.settings.tool_timeout:g} s.") from None

    async def fail(self, run_id: str) -> None:
        """End a run whose workflow failed for good (a bug or a store that stays down)."""
        row = await self._row(run_id)
        if row is None or row.phase == "end":
            return
        error = {"code": "internal_error", "message": "The run failed on the server; see the service log."}
        expect = {"next_step": row.next_step, "phase": row.phase}
        await self._end(row, expect, _Ended("failed", error=error))

    async def join(self, run_id: str, step_no: int) -> Plan:
        """After a round of tool calls: back to the model with their results, or pause for
        the client when some call needs its output or approval."""
        row = await self._row(run_id)
        if row is None:
            return _GONE
        expect = {"next_step": step_no, "phase": "tools"}
        if row.next_step != step_no or row.phase != "tools":
            return await self._plan(row)
        round_steps = await self._round(row)
        waiting = [s for s in round_steps if s.status in ("awaiting_output", "awaiting_approval")]
        if waiting:
            action = required_action(waiting)
            values: dict[str, Any] = {
                "status": "requires_action",
                "phase": "wait",
                "required_action": dumps(action),
                "worked_ms": self._worked_ms(row),
                "segment_started_at": None,
            }
            summary = dataclasses.replace(row, **values).to_openai()
            await self._write(
                self.runs.advance, run_id, expect, values, [("run.requires_action", {"run": summary})]
            )
            return {"phase": "wait", "step": step_no, "tools": []}
        messages = loads(row.messages)
        messages.extend(tool_message(s.data["tool_call_id"], tool_result(s.data)) for s in round_steps)
        values = {"messages": dumps(messages), "phase": "model"}
        await self._write(self.runs.advance, run_id, expect, values)
        return {"phase": "model", "step": step_no, "tools": []}


def new_messages(messages: Sequence[Mapping[str, Any]], *, first: bool) -> list[Mapping[str, Any]]:
    """The messages a model call adds to the conversation: all of them on the first call,
    then the tool results since the last assistant message."""
    if first:
        return list(messages)
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=-1)
    return list(messages[last + 1 :])


def _step_events(steps: Sequence[NewStep]) -> list[NewEvent]:
    return [("step.completed", {"step": data}) for _, kind, _, data in steps if kind == "model_call"]


def tool_result(step: Mapping[str, Any]) -> str:
    """What the model is told a tool call gave."""
    if step.get("error") is not None:
        return error_output(str(step["error"]))
    return str(step.get("output") or "")


def required_action(waiting: Sequence[StepRow]) -> dict[str, Any]:
    """What a paused run waits for: client tool outputs and approvals."""
    calls = [
        {
            "id": s.data["tool_call_id"],
            "type": "function",
            "function": {"name": s.data["name"], "arguments": s.data["arguments"]},
        }
        for s in waiting
        if s.status == "awaiting_output"
    ]
    approvals = [
        {
            "tool_call_id": s.data["tool_call_id"],
            "server": s.data["server"],
            "name": s.data["name"],
            "arguments": s.data["arguments"],
        }
        for s in waiting
        if s.status == "awaiting_approval"
    ]
    return {"type": "submit", "tool_calls": calls, "approvals": approvals}
