"""The route table: paths and handlers only."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tail_service.api import health, inference, models
from tail_service.schemas.chat import ChatCompletionRequest
from tail_service.schemas.completions import CompletionRequest
from tail_service.schemas.embeddings import EmbeddingRequest

#: (method, path, handler, request schema for the OpenAPI document, summary)
ROUTES: list[tuple[str, str, Callable[..., Any], type | None, str]] = [
    ("POST", "/v1/chat/completions", inference.chat_completions, ChatCompletionRequest, "Chat completion"),
    ("POST", "/v1/completions", inference.completions, CompletionRequest, "Legacy completion"),
    ("POST", "/v1/embeddings", inference.embeddings, EmbeddingRequest, "Embeddings"),
    ("GET", "/v1/models", models.list_models, None, "List models"),
    ("GET", "/v1/models/{model:path}", models.retrieve_model, None, "Retrieve a model"),
    ("GET", "/health", health.health, None, "Dependencies and their state"),
    ("GET", "/livez", health.livez, None, "Liveness probe"),
    ("GET", "/readyz", health.readyz, None, "Readiness probe"),
]
