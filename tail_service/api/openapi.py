"""The OpenAPI document and the interactive docs page, built from the route table.

The app is plain Starlette (FastAPI's per-request machinery cost more CPU than the
whole budget of a request), so the document is assembled here: one operation per
route, request bodies from the pydantic schemas, and the OpenAI error envelope as the
default response of every operation.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from tail_service.api.deps import json_response
from tail_service.api.routes import ROUTES

_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}

_ERROR_REF = "#/components/schemas/ErrorResponse"

_DOCS_HTML = """<!doctype html>
<html><head><title>{title} - docs</title><meta charset="utf-8">
<link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css"></head>
<body><div id="ui"></div>
<script src="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({{url: "/openapi.json", dom_id: "#ui"}});</script>
<noscript>The OpenAPI document is at <a href="/openapi.json">/openapi.json</a>.</noscript>
</body></html>"""


def build_openapi(title: str, version: str, description: str) -> dict[str, Any]:
    """An OpenAPI 3.1 document for every route in :data:`ROUTES`."""
    models: list[type[BaseModel]] = [s for _, _, _, s, _ in ROUTES if s is not None]
    keyed, defs = models_json_schema(
        [(m, "validation") for m in models], ref_template="#/components/schemas/{model}"
    )
    schemas: dict[str, Any] = dict(defs.get("$defs", {}))
    schemas["ErrorResponse"] = _ERROR_SCHEMA
    paths: dict[str, dict[str, Any]] = {}
    for method, path, handler, schema, summary in ROUTES:
        op: dict[str, Any] = {
            "operationId": handler.__name__,
            "summary": summary,
            "responses": {
                "200": {"description": "OK"},
                "default": {
                    "description": "OpenAI-style error",
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}
                    },
                },
            },
        }
        if schema is not None:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": keyed[(schema, "validation")]}},
            }
        api_path = path.replace(":path}", "}")
        if "{" in api_path:
            name = api_path.split("{", 1)[1].split("}", 1)[0]
            op["parameters"] = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}]
        paths.setdefault(api_path, {})[method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version, "description": description},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }


async def openapi_json(request: Request) -> Response:
    doc: dict[str, Any] = request.app.state.openapi
    return json_response(doc)


async def docs(request: Request) -> Response:
    return HTMLResponse(_DOCS_HTML.format(title="Tail Service"))
