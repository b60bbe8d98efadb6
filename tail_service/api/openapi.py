"""The OpenAPI document and the interactive docs page, built from the route table.

The app is plain Starlette (FastAPI's per-request machinery cost more CPU than the
whole budget of a request), so the document is assembled here: one operation per
route, request bodies from the pydantic schemas, and the OpenAI error envelope as the
default response of every operation.

``/docs`` is Swagger UI served by this process, never from a CDN, so it works offline:
its files come from the ``swagger-ui-py`` wheel (located without importing it) and are
served by the same route as ``/docs?asset=NAME``, with a Content-Security-Policy that
allows nothing from elsewhere. Without that package the page still links the document.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue, models_json_schema
from pydantic_core import core_schema
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, PlainTextResponse, Response

from tail_service.api import agentic, batches, files, responses, usage
from tail_service.api.deps import json_response
from tail_service.api.routes import ROUTES

#: more of an operation than the route table says (non-JSON bodies, query parameters,
#: response schemas), by ``(method, path)``
_EXTRA: dict[tuple[str, str], dict[str, Any]] = {
    **files.OPENAPI,
    **batches.OPENAPI,
    **usage.OPENAPI,
    **agentic.OPENAPI,
    **responses.OPENAPI,
}

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
                "param": {"type": "string", "nullable": True},
                "code": {"type": "string", "nullable": True},
            },
        }
    },
}

_ERROR_REF = "#/components/schemas/ErrorResponse"

#: the Swagger UI files ``/docs`` serves, by name (``asset`` query parameter)
_SWAGGER_FILES = {
    "swagger-ui.css": "text/css; charset=utf-8",
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "favicon-32x32.png": "image/png",
}
#: everything the page uses comes from this server (Swagger UI sets inline styles, and
#: shows schema images as data: URLs)
_DOCS_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'none'"
)
# Relative URLs: the page works under a path prefix too (a proxy serving the app at /x/).
_DOCS_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title} - API docs</title>
<link rel="stylesheet" href="docs?asset=swagger-ui.css">
<link rel="icon" type="image/png" href="docs?asset=favicon-32x32.png"></head>
<body><div id="ui"></div>
<script src="docs?asset=swagger-ui-bundle.js"></script>
<script src="docs?asset=init.js"></script>
<noscript>The OpenAPI document is at <a href="openapi.json">openapi.json</a>.</noscript>
</body></html>"""
# validatorUrl null: Swagger UI would otherwise send the document to an online validator.
_DOCS_INIT = (
    'window.ui = SwaggerUIBundle({url: "openapi.json", dom_id: "#ui", validatorUrl: null, '
    "deepLinking: true, persistAuthorization: false});\n"
)
_DOCS_FALLBACK = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title} - API docs</title></head>
<body><p>The interactive docs need the <code>swagger-ui-py</code> package, which is not installed
here. The OpenAPI document is at <a href="openapi.json">openapi.json</a>.</p></body></html>"""


def swagger_ui_dir() -> Path | None:
    """The directory with Swagger UI's files from the ``swagger-ui-py`` wheel, without importing it."""
    try:
        spec = importlib.util.find_spec("swagger_ui")
    except (ImportError, ValueError):
        return None
    for base in (spec.submodule_search_locations or ()) if spec is not None else ():
        static = Path(base) / "static"
        if (static / "swagger-ui-bundle.js").is_file():
            return static
    return None


#: what a JSON integer can be here: the body parser reads integers outside 64 bits as floats,
#: which the strict validators then refuse, so the document says so
INT_MIN = -(2**63)
INT_MAX = 2**64 - 1
#: routes anyone may call (probes); everything else needs an API key
PUBLIC_PATHS = frozenset({"/health", "/livez", "/readyz"})


class _StrictJsonSchema(GenerateJsonSchema):
    """The validators' JSON Schema, with the 64-bit range every integer really has."""

    def int_schema(self, schema: core_schema.IntSchema) -> JsonSchemaValue:
        out = super().int_schema(schema)
        out.setdefault("minimum", INT_MIN)
        out.setdefault("maximum", INT_MAX)
        return out


def _openapi_30(node: Any) -> Any:
    """Pydantic's JSON Schema (2020-12) in the OpenAPI 3.0 dialect.

    3.0 because its ``integer`` is a number written without a fraction, as the strict
    validators (and OpenAI's API) take it: ``"n": 2.0`` is refused. In 3.1 (JSON Schema
    2020-12), ``2.0`` is an integer too, and the document would promise what the API
    refuses. The differences used here: ``nullable`` instead of a ``null`` type, and
    ``enum`` instead of ``const``.
    """
    if isinstance(node, list):
        return [_openapi_30(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _openapi_30(value) for key, value in node.items()}
    if "const" in out:
        out["enum"] = [out.pop("const")]
    types = out.get("type")
    if isinstance(types, list) and "null" in types:
        rest = [t for t in types if t != "null"]
        out["type"] = rest[0] if len(rest) == 1 else rest
        out["nullable"] = True
    for key in ("anyOf", "oneOf"):
        options = out.get(key)
        if isinstance(options, list) and {"type": "null"} in options:
            rest = [o for o in options if o != {"type": "null"}]
            if len(rest) == 1 and "$ref" not in rest[0]:
                del out[key]
                out.update(rest[0])
            else:
                out[key] = rest
            out["nullable"] = True
    return out


def build_openapi(title: str, version: str, description: str) -> dict[str, Any]:
    """An OpenAPI 3.0 document for every route in :data:`ROUTES` (see :func:`_openapi_30`)."""
    models: list[type[BaseModel]] = [s for _, _, _, s, _ in ROUTES if s is not None]
    keyed, defs = models_json_schema(
        [(m, "validation") for m in models],
        ref_template="#/components/schemas/{model}",
        schema_generator=_StrictJsonSchema,
    )
    keyed = {k: _openapi_30(v) for k, v in keyed.items()}
    schemas: dict[str, Any] = _openapi_30(dict(defs.get("$defs", {})))
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
        if path in PUBLIC_PATHS:
            op["security"] = []
        if schema is not None:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": keyed[(schema, "validation")]}},
            }
        api_path = path.replace(":path}", "}")
        if "{" in api_path:
            name = api_path.split("{", 1)[1].split("}", 1)[0]
            op["parameters"] = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}]
        extra = _EXTRA.get((method, path), {})
        op["parameters"] = op.get("parameters", []) + extra.get("parameters", [])
        if not op["parameters"]:
            del op["parameters"]
        op["responses"].update(extra.get("responses", {}))
        if "requestBody" in extra:
            op["requestBody"] = extra["requestBody"]
        paths.setdefault(api_path, {})[method.lower()] = op
    return {
        "openapi": "3.0.3",
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
    """The Swagger UI page, or one of its files with ``?asset=NAME`` (all from this server)."""
    headers = {"content-security-policy": _DOCS_CSP, "x-content-type-options": "nosniff"}
    title = "Tail Service"
    static = swagger_ui_dir()
    asset = request.query_params.get("asset")
    if asset is None:
        page = _DOCS_HTML if static is not None else _DOCS_FALLBACK
        return HTMLResponse(page.format(title=title), headers=headers)
    cached = {**headers, "cache-control": "public, max-age=86400"}
    if asset == "init.js":
        return Response(_DOCS_INIT, media_type="text/javascript; charset=utf-8", headers=cached)
    media_type = _SWAGGER_FILES.get(asset)
    if media_type is None or static is None:
        return PlainTextResponse("no such docs asset", status_code=404, headers=headers)
    return FileResponse(static / asset, media_type=media_type, headers=cached)
