"""The OpenAPI document says what the API answers, errors included.

FastAPI documents a 200 and a 422 for each operation. This API answers a bad request with a
400 in OpenAI's error envelope (`errors.ErrorResponse`), never a 422, and refuses in ways the
routes' code shows: a key missing or unknown (401), a role that may not (403), a name or id
that is not there (404), a body over the size limit (413), the database away (503 with
`Retry-After`). Those are read off each route (its dependencies, its path parameters, its
body), so a new route is documented by what it depends on; the rarer ones (409, 410, 304, a
202) are declared on the route itself (`responses=`) and take the error schema here.
`tests/integration/test_openapi_conformance.py` holds the API to this document with
schemathesis.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute

from control_plane.api.deps import get_principal, require_admin, require_writer
from control_plane.api.errors import ErrorResponse

ERROR_SCHEMA = "ErrorResponse"

_DESCRIPTIONS = {
    304: "Not modified: the `ETag` given in `If-None-Match` is still current.",
    400: "The request cannot be taken as sent: `error.code` names the rule, `error.param` "
    "the parameter or field.",
    401: "No API key was sent, or the key is unknown or revoked.",
    403: "The key's role (or its tenant) may not do this.",
    404: "Nothing by that id or name in the caller's tenant.",
    409: "The request conflicts with what is stored.",
    410: "What the name refers to is gone.",
    413: "The request body is larger than the server's limit (`LORAFORGE_MAX_UPLOAD_BYTES`).",
    502: "The stored bytes do not match their recorded sha256; nothing was sent.",
    503: "A service the request needs (the database, the object store, the task broker) did "
    "not answer; nothing was changed. Retry after `Retry-After` seconds.",
}

_RETRY_AFTER = {
    "Retry-After": {
        "description": "seconds to wait before trying again",
        "schema": {"type": "integer"},
    }
}


def refusals(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """A route's `responses=` for the refusals its dependencies do not show (a conflict, a
    cursor or a referenced id not found, a file gone): each takes the error schema."""
    return {status: {"description": _DESCRIPTIONS[status]} for status in statuses}


def download(media_type: str) -> dict[int | str, dict[str, Any]]:
    """A route's `responses=` for a file's bytes, streamed with their sha256
    (`control_plane.api.downloads`), as `media_type`."""
    return {
        200: {
            "description": "The file's bytes; complete only when they match `X-Content-SHA256`.",
            "content": {media_type: {"schema": {"type": "string", "format": "binary"}}},
            "headers": {
                "X-Content-SHA256": {
                    "description": "the sha256 the bytes were recorded with",
                    "schema": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                    "required": True,
                }
            },
        }
    }


def _calls(dependant: Dependant) -> set[Callable[..., Any]]:
    found: set[Callable[..., Any]] = set()
    pending = [dependant]
    while pending:
        current = pending.pop()
        if current.call is not None:
            found.add(current.call)
        pending.extend(current.dependencies)
    return found


def _refusals(route: APIRoute) -> set[int]:
    """The error statuses a route can answer, from what it depends on."""
    calls = _calls(route.dependant)
    statuses = {400}  # every router refuses a NUL character anywhere (text_input.refuse_nul)
    if get_principal in calls:
        statuses |= {401, 503}  # a key is checked against the database
    if require_writer in calls or require_admin in calls:
        statuses.add(403)
    if route.dependant.path_params:
        statuses.add(404)
    if route.body_field is not None:
        statuses.add(413)
    return statuses


def _error_response(status: int, declared: dict[str, Any] | None) -> dict[str, Any]:
    response = dict(declared or {})
    if not response.get("description") or response["description"] == "Successful Response":
        response["description"] = _DESCRIPTIONS.get(status, "Refused.")
    if status != 304:
        response.setdefault(
            "content",
            {"application/json": {"schema": {"$ref": f"#/components/schemas/{ERROR_SCHEMA}"}}},
        )
    if status == 503:
        response["headers"] = {**_RETRY_AFTER, **response.get("headers", {})}
    return response


def document_refusals(schema: dict[str, Any], routes: Iterable[APIRoute]) -> dict[str, Any]:
    """`schema` (FastAPI's document) with the refusals of each of `routes` in place of FastAPI's
    422, every one of them described by `ErrorResponse`."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components[ERROR_SCHEMA] = ErrorResponse.model_json_schema(
        ref_template="#/components/schemas/{model}"
    )
    components.update(components[ERROR_SCHEMA].pop("$defs", {}))
    for route in routes:
        if not route.include_in_schema:
            continue
        for method in route.methods or ():
            operation = schema["paths"][route.path_format][method.lower()]
            responses: dict[str, Any] = operation.setdefault("responses", {})
            responses.pop("422", None)
            statuses = _refusals(route) | {int(s) for s in responses if int(s) >= 300}
            for status in sorted(statuses):
                responses[str(status)] = _error_response(status, responses.get(str(status)))
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    return schema


def install_openapi(app: FastAPI, routes: Iterable[APIRoute]) -> None:
    """Serve `document_refusals`' document for the API's `routes` at /openapi.json (built once,
    on its first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            app.openapi_schema = document_refusals(schema, routes)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
