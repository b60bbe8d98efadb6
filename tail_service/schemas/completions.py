"""``POST /v1/completions`` (legacy) request schema (``§CreateCompletionRequest``)."""

from __future__ import annotations

from pydantic import Field

from tail_service.core.types import RequestParams
from tail_service.schemas.chat import StreamOptions, generation_params
from tail_service.schemas.common import RequestSchema


class CompletionRequest(RequestSchema):
    prompt: str | list[str] | list[int] | list[list[int]] = "<|endoftext|>"
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=None, ge=1, le=128)
    best_of: int | None = Field(default=None, ge=0, le=20)
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    suffix: str | None = None
    user: str | None = None

    def params(self) -> RequestParams:
        return generation_params(self.stream, self.stream_options, self.n, self.max_tokens)
