"""Request schemas of ``POST /v1/agentic`` and ``POST /v1/agentic/{id}/submit``.

Our own API, so unknown fields are refused (a misspelt limit must not be ignored). The
messages and sampling fields are checked again as the chat-completions body the loop
sends, by the chat schema, so they take exactly what ``/v1/chat/completions`` takes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tail_service.schemas.batch import Metadata

#: names a model may call a tool by (OpenAI's rule for function names)
TOOL_NAME = r"^[A-Za-z0-9_-]{1,64}$"
#: the chat-completions fields a run passes on to every model call
SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "parallel_tool_calls",
    "response_format",
    "reasoning_effort",
    "logit_bias",
    "user",
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class FunctionDef(_Strict):
    name: str = Field(pattern=TOOL_NAME)
    description: str | None = Field(default=None, max_length=16_384)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionTool(_Strict):
    """A tool the client runs: the run pauses in ``requires_action`` for its output."""

    type: Literal["function"]
    function: FunctionDef


class BuiltinTool(_Strict):
    """A tool the server ships (``calculator``, ``current_time``)."""

    type: Literal["builtin"]
    name: str = Field(pattern=TOOL_NAME)


class ToolNames(_Strict):
    tool_names: list[Annotated[str, Field(max_length=128)]] = Field(max_length=1024)


class ApprovalFilter(_Strict):
    """OpenAI's filter form: these tools always need approval, those never do; any other
    tool needs it."""

    always: ToolNames | None = None
    never: ToolNames | None = None


class McpTool(_Strict):
    """The tools of an MCP server the operator configured, named by ``server``."""

    type: Literal["mcp"]
    server: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    allowed_tools: list[Annotated[str, Field(max_length=128)]] | None = Field(default=None, max_length=1024)
    require_approval: Literal["never", "always"] | ApprovalFilter = "always"


AgentTool = Annotated[FunctionTool | BuiltinTool | McpTool, Field(discriminator="type")]


#: most tools one request may offer the model (OpenAI's limit for chat completions)
MAX_TOOLS = 128


class AgenticRequest(_Strict):
    model: str = Field(min_length=1, max_length=256)
    messages: list[dict[str, Any]] | None = Field(default=None, min_length=1)
    input: str | None = Field(default=None, min_length=1)
    #: OpenAI's own cap; each function tool's schema is checked here
    tools: list[AgentTool] = Field(default_factory=list, max_length=MAX_TOOLS)
    tool_choice: Any = None
    stream: bool = False
    background: bool = False
    metadata: Metadata | None = None
    max_steps: int | None = Field(default=None, ge=1)
    max_tool_calls: int | None = Field(default=None, ge=1)
    max_time_s: int | None = Field(default=None, ge=1)
    max_total_tokens: int | None = Field(default=None, ge=1)
    # sampling fields, passed on to every model call (checked by the chat schema)
    temperature: Any = None
    top_p: Any = None
    max_tokens: Any = None
    max_completion_tokens: Any = None
    stop: Any = None
    seed: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    parallel_tool_calls: Any = None
    response_format: Any = None
    reasoning_effort: Any = None
    logit_bias: Any = None
    user: Any = None


class ToolOutput(_Strict):
    tool_call_id: str = Field(min_length=1, max_length=128)
    output: str


class Approval(_Strict):
    tool_call_id: str = Field(min_length=1, max_length=128)
    approve: bool
    reason: str | None = Field(default=None, max_length=4096)


class SubmitRequest(_Strict):
    """``POST /v1/agentic/{id}/submit``: what the paused run waits for."""

    tool_outputs: list[ToolOutput] = Field(default_factory=list, max_length=1024)
    approvals: list[Approval] = Field(default_factory=list, max_length=1024)
    stream: bool = False
    background: bool = False
