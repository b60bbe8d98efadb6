"""The request schema of ``POST /v1/responses`` (``§CreateResponse``): the fields the
gateway acts on, typed strictly; every other field is kept and passed on to the model as
on the other endpoints. Input items and tools are checked where they are translated
(:mod:`tail_service.core.responses`), with the param of the item at fault."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from tail_service.schemas.agentic import MAX_TOOLS
from tail_service.schemas.batch import Metadata
from tail_service.schemas.common import OpenAIModel


class CreateResponseRequest(OpenAIModel):
    model: str = Field(min_length=1, max_length=256)
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    max_tool_calls: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    metadata: Metadata | None = None
    store: bool | None = None
    previous_response_id: str | None = Field(default=None, max_length=128)
    background: bool | None = None
    stream: bool | None = None
    user: str | None = None
