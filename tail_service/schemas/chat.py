"""``POST /v1/chat/completions`` request schema (``§CreateChatCompletionRequest``)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from tail_service.core.types import RequestParams
from tail_service.schemas.common import OpenAIModel, RequestSchema


class ContentPart(OpenAIModel):
    """One part of a multi-part message; ``text`` parts must carry text."""

    type: str

    @model_validator(mode="after")
    def _check(self) -> ContentPart:
        extra = self.model_extra or {}
        if self.type == "text" and not isinstance(extra.get("text"), str):
            raise ValueError("a text part needs a string `text`")
        if self.type == "image_url":
            img = extra.get("image_url")
            if not isinstance(img, dict) or not isinstance(img.get("url"), str):
                raise ValueError("an image_url part needs `image_url.url`")
        return self


Content = str | list[ContentPart]


class FunctionCall(OpenAIModel):
    name: str
    arguments: str


class ToolCall(OpenAIModel):
    id: str
    type: str = "function"
    function: FunctionCall | None = None


class SystemMessage(OpenAIModel):
    role: Literal["system", "developer"]
    content: Content


class UserMessage(OpenAIModel):
    role: Literal["user"]
    content: Content


class AssistantMessage(OpenAIModel):
    role: Literal["assistant"]
    content: Content | None = None
    tool_calls: list[ToolCall] | None = None


class ToolMessage(OpenAIModel):
    role: Literal["tool"]
    content: Content
    tool_call_id: str


class FunctionMessage(OpenAIModel):
    role: Literal["function"]
    content: str | None = None
    name: str


Message = Annotated[
    SystemMessage | UserMessage | AssistantMessage | ToolMessage | FunctionMessage,
    Field(discriminator="role"),
]


class FunctionDef(OpenAIModel):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(OpenAIModel):
    type: str
    function: FunctionDef | None = None

    @model_validator(mode="after")
    def _check(self) -> Tool:
        if self.type == "function" and self.function is None:
            raise ValueError("a function tool needs `function`")
        return self


class StreamOptions(OpenAIModel):
    include_usage: bool | None = None


class ResponseFormat(OpenAIModel):
    type: Literal["text", "json_object", "json_schema"]


class ChatCompletionRequest(RequestSchema):
    messages: list[Message] = Field(min_length=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=None, ge=1, le=128)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    stop: str | list[str] | None = None
    logit_bias: dict[str, Annotated[int, Field(ge=-100, le=100)]] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    seed: int | None = None
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and self.top_logprobs > 0 and not self.logprobs:
            raise ValueError("`top_logprobs` requires `logprobs` to be true")
        if isinstance(self.tool_choice, str) and self.tool_choice not in ("none", "auto", "required"):
            raise ValueError("`tool_choice` must be 'none', 'auto', 'required' or an object")
        return self

    def params(self) -> RequestParams:
        opts = self.stream_options
        return RequestParams(
            stream=self.stream is True,
            include_usage=opts is not None and opts.include_usage is True,
            n=self.n or 1,
            max_output_tokens=self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens,
        )
