"""The route table: paths and handlers only."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tail_service.api import agentic, batches, files, health, inference, models, responses, usage
from tail_service.schemas.agentic import AgenticRequest, SubmitRequest
from tail_service.schemas.batch import CreateBatchRequest, SyncBatchRequest
from tail_service.schemas.chat import ChatCompletionRequest
from tail_service.schemas.completions import CompletionRequest
from tail_service.schemas.embeddings import EmbeddingRequest
from tail_service.schemas.responses import CreateResponseRequest

#: (method, path, handler, request schema for the OpenAPI document, summary)
ROUTES: list[tuple[str, str, Callable[..., Any], type | None, str]] = [
    ("POST", "/v1/chat/completions", inference.chat_completions, ChatCompletionRequest, "Chat completion"),
    ("POST", "/v1/completions", inference.completions, CompletionRequest, "Legacy completion"),
    ("POST", "/v1/embeddings", inference.embeddings, EmbeddingRequest, "Embeddings"),
    ("GET", "/v1/models", models.list_models, None, "List models"),
    ("GET", "/v1/models/{model:path}", models.retrieve_model, None, "Retrieve a model"),
    ("POST", "/v1/files", files.create_file, None, "Upload a file"),
    ("GET", "/v1/files", files.list_files, None, "List files"),
    ("GET", "/v1/files/{file_id}", files.retrieve_file, None, "Retrieve a file"),
    ("DELETE", "/v1/files/{file_id}", files.delete_file, None, "Delete a file"),
    ("GET", "/v1/files/{file_id}/content", files.file_content, None, "Download a file's content"),
    ("POST", "/v1/batches", batches.create_batch, CreateBatchRequest, "Create a batch"),
    ("GET", "/v1/batches", batches.list_batches, None, "List batches"),
    ("GET", "/v1/batches/{batch_id}", batches.retrieve_batch, None, "Retrieve a batch"),
    ("POST", "/v1/batches/{batch_id}/cancel", batches.cancel_batch, None, "Cancel a batch"),
    ("POST", "/v1/batch", batches.run_batch, SyncBatchRequest, "Run a small batch and answer at once"),
    ("POST", "/v1/agentic", agentic.create_run, AgenticRequest, "Start an agent run"),
    ("GET", "/v1/agentic/{run_id}", agentic.retrieve_run, None, "Retrieve an agent run with its steps"),
    ("POST", "/v1/agentic/{run_id}/cancel", agentic.cancel_run, None, "Cancel an agent run"),
    ("POST", "/v1/agentic/{run_id}/submit", agentic.submit_run, SubmitRequest, "Continue a paused agent run"),
    ("GET", "/v1/agentic/{run_id}/events", agentic.run_events, None, "Stream an agent run's events"),
    ("POST", "/v1/responses", responses.create_response, CreateResponseRequest, "Create a response"),
    ("GET", "/v1/responses/{response_id}", responses.retrieve_response, None, "Retrieve a response"),
    ("DELETE", "/v1/responses/{response_id}", responses.delete_response, None, "Delete a response"),
    (
        "POST",
        "/v1/responses/{response_id}/cancel",
        responses.cancel_response,
        None,
        "Cancel a background response",
    ),
    (
        "GET",
        "/v1/responses/{response_id}/input_items",
        responses.list_input_items,
        None,
        "List a response's input items",
    ),
    ("GET", "/v1/usage", usage.key_usage, None, "This key's usage, in buckets"),
    (
        "GET",
        "/v1/organization/usage/completions",
        usage.organization_usage,
        None,
        "Every key's usage, in buckets (usage admin token)",
    ),
    ("GET", "/health", health.health, None, "Dependencies and their state"),
    ("GET", "/livez", health.livez, None, "Liveness probe"),
    ("GET", "/readyz", health.readyz, None, "Readiness probe"),
]
