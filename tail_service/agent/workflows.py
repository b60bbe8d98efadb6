"""Agent runs on DBOS: one workflow per segment of a run, one step per model call and per
tool call.

The workflow ``tail.agent.segment`` (id ``<run id>.<segment>``) begins the segment, then
alternates model calls and rounds of tool calls (the calls of one round run concurrently,
each its own step) until the run ends or pauses for the client. A submit starts the next
segment. DBOS checkpoints each step: a worker that restarts, or takes over a dead
worker's runs, resumes each run after its last finished step.
"""

from __future__ import annotations

import asyncio
from typing import Any

from dbos import DBOS, SetWorkflowID

from tail_service.agent.engine import AgentEngine, Plan

#: a step that fails (the store down, a bug) is tried this often before the run fails
_ATTEMPTS = 5


class AgentWorkflows:
    """Starts run segments on this worker, at most ``concurrency`` at once.

    A segment is started directly (no queue to poll: a run starts within the worker's
    store poll). Its workflow id is ``<run id>.<segment>``, so a second start of the same
    segment, here or on another worker, finds it and runs nothing; a crashed worker's
    segments are recovered by DBOS like any workflow of its executor.
    """

    def __init__(self, segment: Any, concurrency: int) -> None:
        self.segment = segment
        self._concurrency = concurrency
        self._active: set[asyncio.Task[Any]] = set()

    @property
    def room(self) -> int:
        return max(0, self._concurrency - len(self._active))

    async def start(self, run_id: str, segment: int) -> None:
        with SetWorkflowID(f"{run_id}.{segment}"):
            handle = await DBOS.start_workflow_async(self.segment, run_id, segment)
        task = asyncio.create_task(handle.get_result())
        self._active.add(task)
        task.add_done_callback(self._active.discard)

    async def aclose(self) -> None:
        """Stop watching; the workflows themselves end with DBOS."""
        for task in list(self._active):
            task.cancel()


def register(engine: AgentEngine) -> Any:
    """Declare the agent workflow and its steps (closures over ``engine``) with DBOS."""

    @DBOS.step(name="tail.agent.begin", retries_allowed=True, max_attempts=_ATTEMPTS, interval_seconds=1.0)
    async def begin(run_id: str, segment: int) -> Plan:
        return await engine.begin(run_id, segment)

    @DBOS.step(
        name="tail.agent.model_call", retries_allowed=True, max_attempts=_ATTEMPTS, interval_seconds=1.0
    )
    async def model_call(run_id: str, step_no: int) -> Plan:
        return await engine.model_call(run_id, step_no)

    @DBOS.step(
        name="tail.agent.tool_call", retries_allowed=True, max_attempts=_ATTEMPTS, interval_seconds=1.0
    )
    async def tool_call(run_id: str, step_no: int) -> None:
        await engine.tool_call(run_id, step_no)

    @DBOS.step(name="tail.agent.join", retries_allowed=True, max_attempts=_ATTEMPTS, interval_seconds=1.0)
    async def join(run_id: str, step_no: int) -> Plan:
        return await engine.join(run_id, step_no)

    @DBOS.step(name="tail.agent.fail", retries_allowed=True, max_attempts=_ATTEMPTS, interval_seconds=1.0)
    async def fail(run_id: str) -> None:
        await engine.fail(run_id)

    @DBOS.workflow(name="tail.agent.segment")
    async def segment_workflow(run_id: str, segment: int) -> str:
        try:
            plan = await begin(run_id, segment)
            while plan["phase"] in ("model", "tools"):
                if plan["phase"] == "model":
                    plan = await model_call(run_id, plan["step"])
                    continue
                # the calls of a round run together; each is its own step (started in order)
                await asyncio.gather(*(tool_call(run_id, n) for n in plan["tools"]))
                plan = await join(run_id, plan["step"])
            return str(plan["phase"])
        except Exception:
            DBOS.logger.exception("agent run %s failed", run_id)
            await fail(run_id)
            return "end"

    return segment_workflow
