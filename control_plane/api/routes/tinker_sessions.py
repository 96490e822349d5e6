"""/api/v1/sessions/search: the SDK's `RestClient.search_sessions` (experimental there), a
tenant's sessions newest first by id, display name, `user_metadata` and status, a keyset cursor
to the next page (`control_plane.interactive_sessions.search`). And
/api/v1/sessions/{id}/trace_export: the SDK's `export_session_trace` (`tinker session
export-trace`), a URL signed for an hour that downloads the session's timeline as a Perfetto
trace (`control_plane.session_traces`), without a key, built as it is downloaded.

Any live key of the tenant searches (a reader's too), and finds the tenant's sessions: loraforge
has no projects and a tenant's keys are not users, so `project_ids` and an owner of `user` are a
400 that says so, and `own` and `accessible` both mean the tenant's. Each session says what its
checkpoints hold, its status (`active`, `client_finished` with the client's reason, or none once
it went silent), and the tenant as its owner.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request, Response
from pydantic import AwareDatetime, BaseModel, Field
from sqlalchemy import Connection

from control_plane import interactive_sessions, session_traces
from control_plane.api import signed_urls
from control_plane.api.deps import Caller, ConnDep, DbSlot, ServicesDep
from control_plane.api.errors import ApiError
from control_plane.api.routes.tinker import domain_errors
from control_plane.api.tinker_schemas import Id, _Body
from control_plane.interactive_sessions import FinishReason, SessionFound, StatusQuery

router = APIRouter(prefix="/api/v1", tags=["tinker"], include_in_schema=False)

_TRACE_SALT = "loraforge.session-trace"


class Owner(_Body):
    type: Literal["own", "accessible", "user"] = "own"
    owner_urns: list[str] | None = Field(default=None, max_length=10)


class Status(_Body):
    type: Literal["active", "client_finished", "cancelled", "failed"]
    reasons: list[FinishReason] | None = Field(default=None, min_length=1)


class SearchCursor(_Body):
    last_created_at: AwareDatetime
    last_session_id: Id


class SessionSearch(_Body):
    session_id: Id | None = None
    project_ids: list[str] | None = None
    user_metadata: dict[str, Annotated[str, Field(max_length=1000)]] = Field(
        default={}, max_length=16
    )
    display_name: str | None = Field(default=None, min_length=1, max_length=200)
    owner: Owner = Owner()
    statuses: list[Status] | None = Field(default=None, min_length=1, max_length=8)
    limit: int = Field(default=50, ge=1, le=interactive_sessions.MAX_PAGE)
    cursor: SearchCursor | None = None


class SessionSummary(BaseModel):
    session_id: str
    created_at: datetime
    owner: str
    project_id: str
    status: dict[str, Any] | None
    checkpoints_count: int
    display_name: str | None
    user_metadata: dict[str, Any] | None
    checkpoint_storage_bytes: int


class SessionSearchPage(BaseModel):
    sessions: list[SessionSummary]
    next_cursor: dict[str, Any] | None


def _status(found: SessionFound) -> dict[str, Any] | None:
    if found.finished_at is not None:
        reason = {"type": found.finish_reason} if found.finish_reason else None
        return {"type": "client_finished", "reason": reason, "detail": found.finish_detail}
    return {"type": "active"} if found.active else None


def _summary(found: SessionFound) -> SessionSummary:
    return SessionSummary(
        session_id=found.id,
        created_at=found.created_at,
        owner=found.tenant_id,
        project_id="",
        status=_status(found),
        checkpoints_count=found.checkpoints,
        display_name=found.display_name,
        user_metadata=found.user_metadata or None,
        checkpoint_storage_bytes=found.checkpoint_bytes,
    )


@router.post("/sessions/search")
def search_sessions(
    body: SessionSearch, conn: ConnDep, caller: Caller, services: ServicesDep
) -> SessionSearchPage:
    if body.project_ids is not None:
        raise ApiError(
            400,
            "invalid_request",
            "loraforge has no projects: a search covers the tenant's sessions (leave "
            "project_ids out)",
            "project_ids",
        )
    if body.owner.type == "user":
        raise ApiError(
            400,
            "invalid_request",
            "loraforge has no users: a tenant's keys search the tenant's sessions (owner own "
            "or accessible)",
            "owner",
        )
    cursor = body.cursor
    page = interactive_sessions.search(
        conn,
        caller.tenant_id,
        timeout_seconds=services.settings.interactive_session_timeout_seconds,
        session_id=body.session_id,
        display_name=body.display_name,
        user_metadata=body.user_metadata,
        statuses=(
            None
            if body.statuses is None
            else [
                StatusQuery(q.type, tuple(q.reasons) if q.reasons else None) for q in body.statuses
            ]
        ),
        limit=body.limit,
        cursor=None if cursor is None else (cursor.last_created_at, cursor.last_session_id),
    )
    following = page.next_cursor
    return SessionSearchPage(
        sessions=[_summary(f) for f in page.sessions],
        next_cursor=(
            None
            if following is None
            else {"last_created_at": following[0], "last_session_id": following[1]}
        ),
    )


@router.get("/sessions/{session_id}/trace_export")
def trace_export(
    session_id: str, request: Request, conn: ConnDep, caller: Caller, services: ServicesDep
) -> dict[str, str]:
    """The trace is ready at once (it is built as it is downloaded): a URL for it, signed for
    an hour, that any HTTP client fetches without a key, as the SDK's poll expects."""
    with domain_errors():
        session_traces.check_session(conn, caller.tenant_id, session_id)
    api = signed_urls.api_base(request, services)
    token = signed_urls.sign(services, _TRACE_SALT, caller.tenant_id, session_id)
    return {"status": "ready", "url": f"{api}/api/v1/session_traces/{token}"}


@router.get("/session_traces/{token}", response_class=Response)
def session_trace(token: str, services: ServicesDep, __: DbSlot) -> Response:
    """The session's trace, by a URL `trace_export` signed: no key (the token is the proof)."""
    again = "ask for the trace again (export_session_trace)"
    tenant_id, session_id = signed_urls.read(
        services, _TRACE_SALT, token, count=2, what="trace URL", again=again
    )
    with services.engine.connect() as conn, domain_errors():
        return trace_download(conn, tenant_id, session_id)


def trace_download(conn: Connection, tenant_id: str, session_id: str) -> Response:
    """The session's trace as a file to save (NotFound for a session not the tenant's)."""
    calls = session_traces.session_calls(conn, tenant_id, session_id)
    return Response(
        session_traces.build(session_id, calls),
        media_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{session_id}.pftrace"'},
    )
