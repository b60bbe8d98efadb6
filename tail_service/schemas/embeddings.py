"""``POST /v1/embeddings`` request schema (``§CreateEmbeddingRequest``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from tail_service.core.types import RequestParams
from tail_service.schemas.common import RequestSchema

MAX_INPUTS = 2048


class EmbeddingRequest(RequestSchema):
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _check_input(
        cls, v: str | list[str] | list[int] | list[list[int]]
    ) -> str | list[str] | list[int] | list[list[int]]:
        if isinstance(v, str):
            if not v:
                raise ValueError("input must not be an empty string")
            return v
        if not v:
            raise ValueError("input must not be an empty array")
        if len(v) > MAX_INPUTS:
            raise ValueError(f"input must have at most {MAX_INPUTS} items")
        for item in v:
            if isinstance(item, str | list) and not item:
                raise ValueError("input items must not be empty")
        return v

    def params(self) -> RequestParams:
        return RequestParams(dimensions=self.dimensions, base64=self.encoding_format == "base64")
