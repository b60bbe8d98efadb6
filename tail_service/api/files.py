"""The Files API: ``/v1/files`` (upload, list) and ``/v1/files/{file_id}`` (retrieve, content, delete).

Every route is scoped to the caller's tenant: another tenant's file, an expired one and
an unknown id are the same 404 (OpenAI's wording), never a 403. Each store call runs in
the store's pool. Content is streamed one stored chunk at a time.

Listing pages by the cursor ``after`` (a file id, the last of the previous page) in the
chosen ``order`` by ``(created_at, id)``. An ``after`` that names no file of the caller
(deleted, never existed, another tenant's) gives an empty page with ``has_more: false``
(the SDK's auto-pagination stops there); a cursor file that expired since still works.
An empty page has ``first_id`` and ``last_id`` null.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from tail_service.api.deps import authenticate, get_services, json_response
from tail_service.api.upload import MAX_EXPIRES, MIN_EXPIRES, UPLOAD_PURPOSES, receive_upload
from tail_service.errors import InvalidRequestError, NotFoundError
from tail_service.services import Services
from tail_service.store.files import FileRecord, FileStore

#: purposes a listing may filter on (uploads, and the server's own output files)
LIST_PURPOSES = frozenset(
    {
        "assistants",
        "assistants_output",
        "batch",
        "batch_output",
        "fine-tune",
        "fine-tune-results",
        "vision",
        "user_data",
        "evals",
    }
)
MAX_LIMIT = 10_000


def _not_found(file_id: str) -> NotFoundError:
    return NotFoundError(f"No such File object: {file_id}", param="id")


async def _owned(request: Request) -> tuple[Services, FileStore, FileRecord]:
    services = get_services(request)
    principal = await authenticate(request, services)
    file_id: str = request.path_params["file_id"]
    files = FileStore(services.store)
    record = await services.store.run(files.get, principal.tenant, file_id)
    if record is None:
        raise _not_found(file_id)
    return services, files, record


async def create_file(request: Request) -> Response:
    """``POST /v1/files`` (multipart/form-data: ``file``, ``purpose``, ``expires_after``)."""
    services = get_services(request)
    principal = await authenticate(request, services)
    record = await receive_upload(request, services, principal.tenant)
    return json_response(record.to_openai())


async def list_files(request: Request) -> Response:
    """``GET /v1/files?after=&limit=&order=&purpose=``."""
    services = get_services(request)
    principal = await authenticate(request, services)
    query = request.query_params
    raw_limit = query.get("limit", str(MAX_LIMIT))
    if not (raw_limit.isascii() and raw_limit.isdigit() and 1 <= int(raw_limit) <= MAX_LIMIT):
        raise InvalidRequestError(
            f"Invalid value for 'limit': an integer from 1 to {MAX_LIMIT} is required.", param="limit"
        )
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequestError("Invalid value for 'order': 'asc' or 'desc' is required.", param="order")
    purpose = query.get("purpose")
    if purpose is not None and purpose not in LIST_PURPOSES:
        raise InvalidRequestError(f"Invalid value for 'purpose': '{purpose[:100]}'.", param="purpose")
    after = query.get("after")
    files = FileStore(services.store)
    page = await services.store.run(
        files.list_files, principal.tenant, limit=int(raw_limit), order=order, after=after, purpose=purpose
    )
    data = [r.to_openai() for r in page.data]
    return json_response(
        {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": page.has_more,
        }
    )


async def retrieve_file(request: Request) -> Response:
    """``GET /v1/files/{file_id}``."""
    _, _, record = await _owned(request)
    return json_response(record.to_openai())


async def file_content(request: Request) -> StreamingResponse:
    """``GET /v1/files/{file_id}/content``: the raw bytes, one stored chunk at a time."""
    services, files, record = await _owned(request)

    async def chunks() -> AsyncIterator[bytes]:
        seq = 0
        while (data := await services.store.run(files.read_chunk, record.id, seq)) is not None:
            yield data
            seq += 1

    return StreamingResponse(
        chunks(),
        media_type="application/octet-stream",
        headers={"content-length": str(record.bytes)},
    )


async def delete_file(request: Request) -> Response:
    """``DELETE /v1/files/{file_id}``."""
    services = get_services(request)
    principal = await authenticate(request, services)
    file_id: str = request.path_params["file_id"]
    files = FileStore(services.store)
    if not await services.store.run(files.delete, principal.tenant, file_id):
        raise _not_found(file_id)
    return json_response({"id": file_id, "object": "file", "deleted": True})


_FILE_OBJECT = {
    "type": "object",
    "required": ["id", "object", "bytes", "created_at", "filename", "purpose", "status"],
    "properties": {
        "id": {"type": "string"},
        "object": {"type": "string", "enum": ["file"]},
        "bytes": {"type": "integer"},
        "created_at": {"type": "integer"},
        "filename": {"type": "string"},
        "purpose": {"type": "string"},
        "status": {"type": "string"},
        "expires_at": {"type": "integer", "nullable": True},
        "status_details": {"type": "string", "nullable": True},
    },
}

#: what the OpenAPI document says of these routes beyond the route table: the multipart
#: upload body and the listing's query parameters, by ``(method, path)``
OPENAPI: dict[tuple[str, str], dict[str, object]] = {
    ("POST", "/v1/files"): {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file", "purpose"],
                        "additionalProperties": False,
                        "properties": {
                            "file": {"type": "string", "format": "binary"},
                            "purpose": {"type": "string", "enum": list(UPLOAD_PURPOSES)},
                            "expires_after[anchor]": {"type": "string", "enum": ["created_at"]},
                            "expires_after[seconds]": {
                                "type": "integer",
                                "minimum": MIN_EXPIRES,
                                "maximum": MAX_EXPIRES,
                            },
                        },
                    }
                }
            },
        },
        "responses": {
            "200": {
                "description": "The stored file",
                "content": {"application/json": {"schema": _FILE_OBJECT}},
            }
        },
    },
    ("GET", "/v1/files"): {
        "parameters": [
            {"name": "after", "in": "query", "required": False, "schema": {"type": "string"}},
            {
                "name": "limit",
                "in": "query",
                "required": False,
                "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": MAX_LIMIT},
            },
            {
                "name": "order",
                "in": "query",
                "required": False,
                "schema": {"type": "string", "enum": ["asc", "desc"]},
            },
            {
                "name": "purpose",
                "in": "query",
                "required": False,
                "schema": {"type": "string", "enum": sorted(LIST_PURPOSES)},
            },
        ],
    },
    ("GET", "/v1/files/{file_id}"): {
        "responses": {
            "200": {"description": "The file", "content": {"application/json": {"schema": _FILE_OBJECT}}}
        },
    },
    ("GET", "/v1/files/{file_id}/content"): {
        "responses": {
            "200": {
                "description": "The file's bytes",
                "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            }
        },
    },
}
