"""``POST /v1/embeddings`` request schema (``§CreateEmbeddingRequest``)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from tail_service.core.types import RequestParams
from tail_service.schemas.common import RequestSchema

MAX_INPUTS = 2048
#: token ids in one input (OpenAI's embedding models take 8192)
MAX_INPUT_TOKENS = 8192


NonEmptyStr = Annotated[str, Field(min_length=1)]
TokenArray = Annotated[list[int], Field(min_length=1, max_length=MAX_INPUT_TOKENS)]


class EmbeddingRequest(RequestSchema):
    #: text, texts, token ids, or arrays of token ids (OpenAI's four shapes)
    input: (
        NonEmptyStr
        | Annotated[list[NonEmptyStr], Field(min_length=1, max_length=MAX_INPUTS)]
        | TokenArray
        | Annotated[list[TokenArray], Field(min_length=1, max_length=MAX_INPUTS)]
    )
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None

    def params(self) -> RequestParams:
        return RequestParams(dimensions=self.dimensions, base64=self.encoding_format == "base64")
