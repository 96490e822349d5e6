"""Errors as JSON: OpenAI's envelope `{"error": {"message", "type", "param", "code"}}`.

Every refusal carries a stable `code` and a message a person can act on; nothing becomes a 500
unless it is a bug.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import sqlalchemy.exc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from control_plane.messages import first_line

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
}


class ErrorDetail(BaseModel):
    message: str = Field(description="what was refused and what to do about it")
    type: str = Field(description="OpenAI's error type, e.g. `invalid_request_error`")
    param: str | None = Field(description="the parameter or field at fault, when one is")
    code: str = Field(description="a stable code for programs, e.g. `file_not_found`")


class ErrorResponse(BaseModel):
    """Every error this API answers (OpenAI's envelope), as `error_body` writes it."""

    error: ErrorDetail


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.headers = headers  # e.g. a 401's `WWW-Authenticate` challenge


def not_found(kind: str, ident: str, param: str | None = None) -> ApiError:
    return ApiError(
        404, f"{kind}_not_found", f"No {kind.replace('_', ' ')} with id {ident!r}", param
    )


def error_body(status: int, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": _TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }


def _location(loc: tuple[Any, ...]) -> str:
    # Only the first part says where in the request: a body field may be called `path`.
    if loc and loc[0] in ("body", "query", "path", "header"):
        loc = loc[1:]
    return ".".join(str(p) for p in loc)


def describe_validation_errors(errors: list[Any]) -> tuple[str, str | None]:
    """One readable sentence from pydantic's error list, plus the first offending field."""
    messages = []
    for err in errors[:5]:
        where = _location(tuple(err.get("loc", ())))
        msg = str(err.get("msg", "invalid value"))
        if err.get("type") == "extra_forbidden":
            msg = "unknown field"
        elif err.get("type") == "value_error":  # a validator's own sentence, without a prefix
            msg = msg.removeprefix("Value error, ")
        elif err.get("type") == "json_invalid":
            msg = f"the body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})"
        messages.append(f"{where}: {msg}" if where else msg)
    first = _location(tuple(errors[0].get("loc", ()))) if errors else None
    return "; ".join(messages), first or None


class RateLimitedLog:
    """At most one line per `every` seconds per message kind, with the count of the silenced
    ones: an outage answered a thousand times a second must not flood the log."""

    def __init__(self, logger: logging.Logger, every: float = 10.0) -> None:
        self.logger = logger
        self.every = every
        self._last: dict[str, float] = {}
        self._silenced: dict[str, int] = {}
        self._lock = threading.Lock()

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(message, -self.every) < self.every:
                self._silenced[message] = self._silenced.get(message, 0) + 1
                return
            self._last[message] = now
            silenced = self._silenced.pop(message, 0)
        suffix = f" ({silenced} more like it since the last line)" if silenced else ""
        self.logger.warning(message + suffix, *args)


def _unavailable(code: str, message: str, retry_after: int) -> JSONResponse:
    return JSONResponse(
        error_body(503, code, message), 503, headers={"Retry-After": str(retry_after)}
    )


def allowed_methods(request: Request) -> str:
    """Every method some route takes at this request's path: FastAPI makes a route per method,
    and Starlette's 405 names only the first route that matched the path."""
    methods: set[str] = set()
    for route in getattr(request.app.state, "routes", ()):
        match, _ = route.matches(request.scope)
        if match != Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return ", ".join(sorted(methods))


def install_error_handlers(app: FastAPI) -> None:
    # One rate limit per app, so that two apps in one process (tests) do not silence each other.
    outage_log = RateLimitedLog(log)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(
            error_body(exc.status, exc.code, exc.message, exc.param),
            exc.status,
            headers=exc.headers,
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = describe_validation_errors(list(exc.errors()))
        return JSONResponse(error_body(400, "invalid_request", message, param), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized"}.get(
            exc.status_code, "http_error"
        )
        # The exception's headers too: a 405's `Allow` (RFC 9110 requires it), a 401's challenge.
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = allowed_methods(request)
        return JSONResponse(
            error_body(exc.status_code, code, str(exc.detail)), exc.status_code, headers=headers
        )

    @app.exception_handler(sqlalchemy.exc.TimeoutError)
    async def _pool_exhausted(_: Request, exc: sqlalchemy.exc.TimeoutError) -> JSONResponse:
        outage_log.warning("database pool exhausted: answering 503 server_busy")
        return _unavailable("server_busy", "The server is busy; retry in a second.", 1)

    @app.exception_handler(sqlalchemy.exc.OperationalError)
    async def _database_down(_: Request, exc: sqlalchemy.exc.OperationalError) -> JSONResponse:
        outage_log.warning("database unavailable: %s", first_line(exc.orig or exc))
        return _unavailable(
            "database_unavailable",
            "The database is unavailable; nothing was changed. Retry in a few seconds.",
            5,
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return JSONResponse(
            error_body(500, "internal_error", "internal error; the request was not applied"), 500
        )
