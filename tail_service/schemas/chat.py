"""``POST /v1/chat/completions`` request schema (``§CreateChatCompletionRequest``)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from tail_service.core.types import RequestParams
from tail_service.schemas.common import OpenAIModel, RequestSchema


class TextPart(OpenAIModel):
    type: Literal["text"]
    text: str


class ImageURL(OpenAIModel):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(OpenAIModel):
    type: Literal["image_url"]
    image_url: ImageURL


class AudioPart(OpenAIModel):
    type: Literal["input_audio"]
    input_audio: dict[str, Any]


class FilePart(OpenAIModel):
    type: Literal["file"]
    file: dict[str, Any]


class RefusalPart(OpenAIModel):
    type: Literal["refusal"]
    refusal: str


#: one part of a multi-part message, by its ``type``
ContentPart = Annotated[
    TextPart | ImagePart | AudioPart | FilePart | RefusalPart, Field(discriminator="type")
]

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


class FunctionTool(OpenAIModel):
    type: Literal["function"]
    function: FunctionDef


class CustomTool(OpenAIModel):
    type: Literal["custom"]
    custom: dict[str, Any]


Tool = Annotated[FunctionTool | CustomTool, Field(discriminator="type")]


class StreamOptions(OpenAIModel):
    include_usage: bool | None = None


def generation_params(
    stream: bool | None, options: StreamOptions | None, n: int | None, max_output_tokens: int | None
) -> RequestParams:
    """The typed parameters of a chat or legacy completion request."""
    return RequestParams(
        stream=stream is True,
        include_usage=options is not None and options.include_usage is True,
        n=n or 1,
        max_output_tokens=max_output_tokens,
    )


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
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None

    def params(self) -> RequestParams:
        limit = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return generation_params(self.stream, self.stream_options, self.n, limit)
