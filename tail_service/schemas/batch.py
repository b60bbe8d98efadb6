"""Request schemas of ``POST /v1/batches`` (``§CreateBatchRequest``) and ``POST /v1/batch``."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from tail_service.schemas.common import OpenAIModel

#: OpenAI's metadata bounds: 16 pairs, keys up to 64 and values up to 512 characters
Metadata = Annotated[
    dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]], Field(max_length=16)
]


#: the endpoints a batch line may call
BatchEndpoint = Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]


class ExpiresAfter(OpenAIModel):
    anchor: Literal["created_at"]
    seconds: int = Field(ge=3600, le=2_592_000)


class CreateBatchRequest(OpenAIModel):
    input_file_id: str = Field(min_length=1, max_length=64)
    #: the endpoints the engine runs (the spec lists more)
    endpoint: BatchEndpoint
    completion_window: Literal["24h"]
    metadata: Metadata | None = None
    output_expires_after: ExpiresAfter | None = None


class SyncBatchLine(OpenAIModel):
    custom_id: str = Field(min_length=1, max_length=512)
    method: Literal["POST"]
    url: BatchEndpoint
    body: dict[str, Any]


class SyncBatchRequest(OpenAIModel):
    """``POST /v1/batch``: the requests of a small batch, answered in one response."""

    requests: list[SyncBatchLine] = Field(min_length=1)
