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
from dataclasses import dataclass
from typing import Any

from dbos import DBOS, Queue, SetWorkflowID

from tail_service.agent.engine import AgentEngine, Plan

#: the queue of run segments
AGENT_QUEUE = "tail_agent_runs"
#: seconds between a worker's looks at the queue (a run's start waits for it)
AGENT_POLL = 0.1

#: a step that fails (the store down, a bug) is tried this often before the run fails
_ATTEMPTS = 5


@dataclass(frozen=True, slots=True)
class AgentWorkflows:
    segment: Any
    queue: Queue

    async def start(self, run_id: str, segment: int) -> None:
        """Enqueue a segment of a run; one already started is left as it is."""
        with SetWorkflowID(f"{run_id}.{segment}"):
            await self.queue.enqueue_async(self.segment, run_id, segment)


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


async def register_queue(concurrency: int) -> Queue:
    return await DBOS.register_queue_async(
        AGENT_QUEUE,
        worker_concurrency=concurrency,
        polling_interval_sec=AGENT_POLL,
        on_conflict="always_update",
    )
