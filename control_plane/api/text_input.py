"""Text that PostgreSQL cannot hold, refused where a request comes in.

PostgreSQL's text and JSONB cannot contain the NUL character (U+0000): psycopg refuses such a
parameter before it is sent, and JSONB refuses the `\\u0000` escape. Any request value that
reaches a query with one (an id in the path, a pagination cursor, a name, a metadata value)
would end as an internal error. So every route of the API and the dashboard first looks for
one in its path parameters, its query string, its JSON body and its form fields, and refuses
the request with 400 naming where it is: nothing has been read or written yet. A file's
content is not text here (an upload may hold any byte; validation reads it as a dataset).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from starlette.datastructures import UploadFile

from control_plane.api.errors import ApiError

# How JSON text writes a NUL. A body without it holds none and is not parsed again; one with it
# is, since `\\u0000` (an escaped backslash, then "u0000") is six characters of text, no NUL.
_JSON_NUL = b"\\u0000"
_FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


@dataclass(frozen=True)
class NulCharacter:
    """Where a request value holds U+0000: `where` for a person, `param` for the error body."""

    where: str
    param: str

    def __str__(self) -> str:
        return (
            f"{self.where} contains a NUL character (U+0000), which no text here may hold; "
            "remove it and send the request again"
        )


def _nul_in_json(value: Any, path: str) -> str | None:
    """The dotted path of the first key or string value holding a NUL, or None."""
    if isinstance(value, str):
        return path if "\x00" in value else None
    if isinstance(value, dict):
        for key, item in value.items():
            inner = f"{path}.{key}" if path else str(key)
            if "\x00" in key:
                return inner
            found = _nul_in_json(item, inner)
            if found is not None:
                return found
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = _nul_in_json(item, f"{path}[{index}]")
            if found is not None:
                return found
    return None


async def find_nul(request: Request) -> NulCharacter | None:
    """Where this request carries a NUL, or None. Reads the body only as the route already
    read it (FastAPI keeps it): JSON bytes are scanned, and parsed only when one is there."""
    for name, value in request.path_params.items():
        if isinstance(value, str) and "\x00" in value:
            return NulCharacter(f"path parameter {name!r}", name)
    for name, value in request.query_params.multi_items():
        if "\x00" in name or "\x00" in value:
            return NulCharacter(f"query parameter {name!r}", name.replace("\x00", "\\x00"))
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json" or content_type.endswith("+json"):
        body = await request.body()
        if _JSON_NUL in body:
            try:
                where = _nul_in_json(json.loads(body), "")
            except ValueError:
                return None  # not JSON: the route's own validation says so
            if where is not None:
                return NulCharacter(f"body field {where!r}", where)
    elif content_type in _FORM_TYPES:
        form = await request.form()
        for name, item in form.multi_items():
            text = (item.filename or "") if isinstance(item, UploadFile) else item
            if "\x00" in name or "\x00" in text:
                what = "file name of form field" if isinstance(item, UploadFile) else "form field"
                return NulCharacter(f"{what} {name!r}", name)
    return None


async def refuse_nul(request: Request) -> None:
    """The API routers' first dependency: 400 `invalid_text` naming the value that holds a NUL."""
    found = await find_nul(request)
    if found is not None:
        raise ApiError(400, "invalid_text", str(found), found.param)
