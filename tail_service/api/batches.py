"""``/v1/batches`` (OpenAI's Batch API) and ``POST /v1/batch`` (a small batch, answered at once).

A created batch is a row in the store; a batch worker runs it (see
:mod:`tail_service.batch.worker`). Every route is scoped to the caller's tenant: another
tenant's batch is a 404, exactly like one that does not exist.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time

import orjson
from starlette.requests import Request
from starlette.responses import Response

from tail_service.api.body import read_json
from tail_service.api.deps import PAGE_PARAMS, authenticate, get_services, json_response, request_id
from tail_service.api.sse import race_disconnect
from tail_service.core.auth import principal_to_json
from tail_service.core.batch import LineResult, line_record_id, output_line, run_line
from tail_service.errors import ConflictError, InvalidRequestError, NotFoundError, RateLimitError
from tail_service.schemas.batch import CreateBatchRequest, SyncBatchRequest
from tail_service.schemas.common import parse_as
from tail_service.services import Services
from tail_service.store.batches import TERMINAL, BatchRow, BatchStore, IdempotencyConflict
from tail_service.store.files import FileStore

#: longest ``Idempotency-Key`` header kept
MAX_IDEMPOTENCY_KEY = 256


def new_batch_id() -> str:
    """``batch_`` + the creation time in nanoseconds + randomness: ids sort in creation order,
    so a page ordered by ``(created_at, id)`` is newest first even within one second."""
    return f"batch_{time.time_ns():016x}{os.urandom(8).hex()}"


def _no_such_batch(batch_id: str) -> NotFoundError:
    return NotFoundError(f"No such Batch object: {batch_id}", param="batch_id")


async def _render(services: Services, batch: BatchRow) -> Response:
    """The batch object; a running batch's counts and usage are read from its results."""
    progress = None
    if batch.status not in TERMINAL:
        progress = await services.store.run(BatchStore(services.store).progress, batch.id)
    return json_response(batch.to_openai(progress))


def _idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    if not key or len(key) > MAX_IDEMPOTENCY_KEY:
        raise InvalidRequestError(
            f"The Idempotency-Key header must be 1 to {MAX_IDEMPOTENCY_KEY} characters.",
            param="Idempotency-Key",
        )
    return key


async def create_batch(request: Request) -> Response:
    """``POST /v1/batches``: store the batch as ``validating``; a worker takes it from there."""
    services = get_services(request)
    principal = await authenticate(request, services)
    body, _ = await read_json(request, services.settings.server, services.large_body_gate)
    req = parse_as(CreateBatchRequest, body)
    idempotency_key = _idempotency_key(request)
    store = services.store
    source = await store.run(FileStore(store).get, principal.tenant, req.input_file_id)
    if source is None:
        raise NotFoundError(f"No such File object: {req.input_file_id}", param="input_file_id")
    if source.purpose != "batch":
        raise InvalidRequestError(
            "The input file must be uploaded with purpose `batch`.",
            param="input_file_id",
            code="invalid_file",
        )
    limit = services.settings.batch.max_input_bytes
    if source.bytes > limit:
        raise InvalidRequestError(
            f"The input file is {source.bytes} bytes; a batch input file may be at most {limit} bytes.",
            param="input_file_id",
            code="file_too_large",
        )
    now = int(time.time())
    values = {
        "id": new_batch_id(),
        "tenant": principal.tenant,
        "key_id": principal.key_id,
        "principal": principal_to_json(principal),
        "endpoint": req.endpoint,
        "input_file_id": req.input_file_id,
        "completion_window": req.completion_window,
        "status": "validating",
        "metadata": orjson.dumps(req.metadata).decode() if req.metadata else None,
        "output_expires_after": req.output_expires_after.seconds if req.output_expires_after else None,
        "created_at": now,
        "expires_at": now + services.settings.batch.completion_window_seconds,
        "idempotency_key": idempotency_key,
        "request_hash": hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest(),
    }
    try:
        batch, _created = await store.run(BatchStore(store).create, values)
    except IdempotencyConflict:
        raise ConflictError(
            "This Idempotency-Key was already used for a different request.",
            param="Idempotency-Key",
            code="idempotency_key_reused",
        ) from None
    return await _render(services, batch)


async def retrieve_batch(request: Request) -> Response:
    """``GET /v1/batches/{batch_id}``: the batch, with live counts and usage while it runs."""
    services = get_services(request)
    principal = await authenticate(request, services)
    batch_id = request.path_params["batch_id"]
    batch = await services.store.run(BatchStore(services.store).get, principal.tenant, batch_id)
    if batch is None:
        raise _no_such_batch(batch_id)
    return await _render(services, batch)


async def cancel_batch(request: Request) -> Response:
    """``POST /v1/batches/{batch_id}/cancel``: ``cancelling`` until the running lines finish."""
    services = get_services(request)
    principal = await authenticate(request, services)
    batch_id = request.path_params["batch_id"]
    batches = BatchStore(services.store)
    batch = await services.store.run(batches.request_cancel, principal.tenant, batch_id, int(time.time()))
    if batch is None:
        raise _no_such_batch(batch_id)
    if batch.status not in ("cancelling", "cancelled"):
        raise ConflictError(
            f"Cannot cancel a batch with status `{batch.status}`.",
            param="batch_id",
            code="batch_not_cancellable",
        )
    return await _render(services, batch)


def _query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise InvalidRequestError(f"Invalid '{name}': must be an integer from {low} to {high}.", param=name)
    return value


async def list_batches(request: Request) -> Response:
    """``GET /v1/batches?after=&limit=``: the tenant's batches, newest first."""
    services = get_services(request)
    principal = await authenticate(request, services)
    limit = _query_int(request, "limit", 20, 1, 100)
    after = request.query_params.get("after") or None
    batches = BatchStore(services.store)
    page, has_more = await services.store.run(batches.page, principal.tenant, after, limit)
    data = []
    for batch in page:
        running = batch.status not in TERMINAL
        data.append(
            batch.to_openai(await services.store.run(batches.progress, batch.id) if running else None)
        )
    return json_response(
        {
            "object": "list",
            "data": data,
            "first_id": page[0].id if page else None,
            "last_id": page[-1].id if page else None,
            "has_more": has_more,
        }
    )


async def run_batch(request: Request) -> Response:
    """``POST /v1/batch``: run up to ``batch.sync_max_requests`` requests and answer with
    one output line per request, in input order (a failed line keeps its place)."""
    services = get_services(request)
    principal = await authenticate(request, services)
    body, _ = await read_json(request, services.settings.server, services.large_body_gate)
    req = parse_as(SyncBatchRequest, body)
    settings = services.settings.batch
    if len(req.requests) > settings.sync_max_requests:
        raise InvalidRequestError(
            f"A batch may hold at most {settings.sync_max_requests} requests; "
            f"got {len(req.requests)}. Use /v1/batches for larger ones.",
            param="requests",
            code="too_many_requests",
        )
    rid = request_id(request)
    deadline = time.monotonic() + services.settings.server.request_timeout * 0.9
    gate = asyncio.Semaphore(settings.sync_concurrency)

    async def one(line_no: int, custom_id: str, url: str, line_body: bytes) -> dict[str, object]:
        async with gate:
            result = await run_line(
                services.inference,
                url,
                line_body,
                principal,
                stopped=lambda: time.monotonic() >= deadline,
                max_backoff=settings.max_backoff,
            )
        return output_line(line_record_id(rid, line_no), custom_id, result or _out_of_time())

    work = asyncio.gather(
        *(
            one(i + 1, line.custom_id, line.url, orjson.dumps(line.body))
            for i, line in enumerate(req.requests)
        )
    )
    data = await race_disconnect(request.receive, work)
    return json_response({"object": "list", "data": data})


def _out_of_time() -> LineResult:
    error = RateLimitError(
        "The key's rate limits left no spare capacity for this request before the batch's deadline.",
        code="rate_limit_exceeded",
    )
    return LineResult(error.http_status, error.body(), "")


#: the OpenAPI document's additions for these routes (query parameters)
OPENAPI: dict[tuple[str, str], dict[str, object]] = {("GET", "/v1/batches"): {"parameters": PAGE_PARAMS}}
