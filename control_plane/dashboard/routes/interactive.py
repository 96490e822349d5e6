"""The Sessions pages: the tenant's interactive (Tinker-compatible) sessions, fifty a page, each
with its display name and status (active, finished as its client said, or ended), its models
and calls counted, searched by name or id, status and metadata as the SDK searches them
(`session_search`), under what the tenant's checkpoints hold in storage (and the cap on it, if
any); and a session's page: its models (who holds their weights, their calls, the last
failure's message, and whether their calls wait on a base no executor holds) and the weights they saved, each with the adapter version it became, or, for
a writer, a form that publishes it as one; each training model's curves by step (train
loss, eval loss, gradient norm) from its `metrics.json`, drawn as the job page's chart is; and
what its models used, as the billing report counts it (`session_usage`).

Publishing calls `POST /v1/adapters/{name}/versions`' own function (the same name rules, the
same refusal of a name bound to another base, the same "a checkpoint becomes one version"), so
the page and the REST API cannot drift; as that function's `Writer` dependency does not run
when it is called from here, the role is checked here first. The module is not `sessions.py`:
`control_plane.dashboard.sessions` is the sign-in session, a different thing.
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from pydantic import ValidationError
from sqlalchemy import Connection

from control_plane import trainers
from control_plane.api.adapter_schemas import VersionFromCheckpoint
from control_plane.api.deps import ServicesDep, require_writer
from control_plane.api.errors import ApiError, describe_validation_errors
from control_plane.api.routes import adapters as adapters_api
from control_plane.api.routes.tinker_sessions import trace_download
from control_plane.dashboard import interactive_queries as queries
from control_plane.dashboard import session_search, session_usage
from control_plane.dashboard.queries import MAX_CHART_POINTS
from control_plane.dashboard.render import PageForbidden, PageNotFound, page
from control_plane.dashboard.sessions import CheckedSession, CurrentSession, PageConn, Session
from control_plane.interactive_storage import storage
from control_plane.tenants import Principal

router = APIRouter()

SESSIONS_PAGE = 50
MODELS_SHOWN = 100
CHECKPOINTS_SHOWN = 100
ID_MAX = 64  # longer than any session id
ACTIVE_MINUTES = int(queries.ACTIVE_WITHIN.total_seconds() // 60)

NOTICES = {
    "published": "Published {path} as {version}: the adapter's new version, with this session "
    "and model in its lineage.",
    "already": "Nothing new was published: {path} was published already, as {version}. Saved "
    "weights become one version, whatever name is asked for.",
}


def _writer(session: Session) -> Principal:
    """The session's principal, if it may publish: else the 403 page with the reason."""
    try:
        return require_writer(session.principal)
    except ApiError as exc:
        raise PageForbidden(
            f"Publishing an adapter version needs a writer. {exc.message}"
        ) from None


def _session(conn: Connection, session: Session, session_id: str) -> queries.SessionLine:
    """One of the tenant's sessions; another tenant's, or none, is the 404 page."""
    found = queries.session_line(conn, session.principal.tenant_id, session_id)
    if found is None:
        raise PageNotFound()
    return found


@router.get("/sessions")
def sessions_page(
    request: Request,
    session: CurrentSession,
    conn: PageConn,
    services: ServicesDep,
    after: Annotated[str | None, Query(max_length=ID_MAX)] = None,
    q: str = "",
    status: str = "",
    meta: str = "",
    before_created: str = "",
    before_id: str = "",
) -> Response:
    """The tenant's sessions, newest first, `SESSIONS_PAGE` a page (`after`: the last session
    of the page before), under what its checkpoints hold and the cap that applies; searched
    (`q`, `status`, `meta`: `session_search`), the sessions found, paged by the search's
    cursor (`before_created`, `before_id`) with the filter kept in each link."""
    tenant_id = session.principal.tenant_id
    wanted = session_search.read_filter(q, status, meta)
    cursor = session_search.read_cursor(before_created, before_id)
    if wanted.given or cursor is not None:
        rows, following = session_search.search_sessions(
            conn, tenant_id, wanted, cursor, limit=SESSIONS_PAGE
        )
        newest = wanted.address() if cursor is not None else None
        older = wanted.address(following) if following is not None else None
    else:
        try:
            rows, more = queries.sessions_page(
                conn, tenant_id, after=after or None, limit=SESSIONS_PAGE
            )
        except LookupError:  # `after` is none of the tenant's sessions
            raise PageNotFound() from None
        newest = "/sessions" if after else None
        older = f"/sessions?{urlencode({'after': rows[-1].id})}" if more and rows else None
    stored = storage(conn, tenant_id)
    return page(
        request,
        "sessions.html",
        session,
        stored=stored,
        storage_cap=stored.cap(services.settings.max_checkpoint_bytes_per_tenant),
        rows=rows,
        wanted=wanted,
        statuses={value: label for value, (label, _) in session_search.STATUSES.items()},
        newest=newest,
        older=older,
        active_minutes=ACTIVE_MINUTES,
    )


def _session_page(
    request: Request,
    session: Session,
    conn: Connection,
    found: queries.SessionLine,
    lease_seconds: float,
    *,
    status_code: int = 200,
    notice: str | None = None,
    refused: bool = False,
    typed: dict[str, str] | None = None,
) -> Response:
    tenant_id = session.principal.tenant_id
    models, more_models = queries.session_models(conn, tenant_id, found.id, limit=MODELS_SHOWN)
    checkpoints, more_checkpoints = queries.session_checkpoints(
        conn, tenant_id, found.id, limit=CHECKPOINTS_SHOWN
    )
    used = session_usage.session_usage(conn, tenant_id, found.id, limit=MODELS_SHOWN)
    # What waits on a base no live executor holds waits until one starts: said, as the SDK's
    # polls say it (`queue_state` paused_capacity).
    served = trainers.served_bases(conn, lease_seconds)
    unserved = sorted({m.base_model_name for m in models if m.calls.pending} - served)
    return page(
        request,
        "session.html",
        session,
        status_code=status_code,
        found=found,
        models=models,
        more_models=more_models,
        checkpoints=checkpoints,
        more_checkpoints=more_checkpoints,
        used=used,
        unserved=unserved,
        may_publish=session.principal.can_write(),
        active_minutes=ACTIVE_MINUTES,
        notice=notice,
        refused=refused,
        typed=typed or {},
    )


@router.get("/sessions/{session_id}")
def session_page(
    session_id: str,
    request: Request,
    session: CurrentSession,
    conn: PageConn,
    services: ServicesDep,
    notice: str | None = None,
    checkpoint: Annotated[str, Query(max_length=1000)] = "",
) -> Response:
    """A session's models and saved weights; after a publication, what it did (`notice` and
    the `checkpoint` path it was about)."""
    found = _session(conn, session, session_id)
    said = None
    if notice in NOTICES and checkpoint:
        saved = queries.session_checkpoint(conn, session.principal.tenant_id, found.id, checkpoint)
        if saved is not None and saved.published_as:
            said = NOTICES[notice].format(path=saved.path, version=saved.published_as)
    lease = services.settings.lease_seconds
    return _session_page(request, session, conn, found, lease, notice=said)


@router.get("/sessions/{session_id}/trace.pftrace")
def session_trace(session_id: str, session: CurrentSession, conn: PageConn) -> Response:
    """The session's timeline as a Perfetto trace (`control_plane.session_traces`), the file the
    SDK's `export_session_trace` downloads; another tenant's session is the 404 page."""
    found = _session(conn, session, session_id)
    return trace_download(conn, session.principal.tenant_id, found.id)


@router.get("/sessions/{session_id}/models/{model_id}/metrics.json")
def model_metrics(
    session_id: str, model_id: str, session: CurrentSession, conn: PageConn
) -> JSONResponse:
    """A training model's curves by step (`queries.model_curves`) in the job chart's shape, the
    optim_steps' gradient norm beside its losses, downsampled past `MAX_CHART_POINTS` as the job
    chart's are (`downsampled` says so); a model not of this tenant's session, or none, is the
    404 page."""
    found = _session(conn, session, session_id)
    curves = queries.model_curves(conn, session.principal.tenant_id, found.id, model_id)
    if curves is None:
        raise PageNotFound()
    series = {"train": curves.train, "eval": curves.eval, "grad_norm": curves.grad_norm}
    return JSONResponse(
        {name: {"steps": s.steps, "values": s.values} for name, s in series.items()}
        | {"downsampled": curves.downsampled, "max_points": MAX_CHART_POINTS},
        headers={"Cache-Control": "no-store"},
    )


@router.post("/sessions/{session_id}/publish")
def publish_checkpoint(
    session_id: str,
    request: Request,
    session: CheckedSession,
    conn: PageConn,
    services: ServicesDep,
    checkpoint: Annotated[str, Form()] = "",
    adapter_name: Annotated[str, Form()] = "",
) -> Response:
    """Publish one of the session's checkpoints as the next version of `adapter_name` through
    `POST /v1/adapters/{name}/versions`' function; back to the session's page, saying which
    version it became (or already was). A name the registry refuses, a name bound to another
    base, or a path no model of this session saved is the session's page again with the
    refusal's message and the name as typed; nothing is written."""
    caller = _writer(session)
    found = _session(conn, session, session_id)
    saved = queries.session_checkpoint(conn, caller.tenant_id, found.id, checkpoint)

    def refused(message: str, status_code: int) -> Response:
        return _session_page(
            request,
            session,
            conn,
            found,
            services.settings.lease_seconds,
            status_code=status_code,
            notice=f"No version was published: {message}",
            refused=True,
            typed={checkpoint: adapter_name},
        )

    if saved is None:
        return refused(f"no model of this session saved weights at {checkpoint!r}.", 404)
    # The route answers 201 for a new version and sets its `response` to 200 for one the
    # checkpoint already became; a plain call gets the same signal through this object.
    answer = Response(status_code=201)
    try:
        body = VersionFromCheckpoint(from_checkpoint=saved.path)
        adapters_api.publish_from_checkpoint(adapter_name.strip(), body, answer, caller, services)
    except ValidationError as exc:  # a stored path the REST body would not take
        message, _ = describe_validation_errors(list(exc.errors()))
        return refused(message, 400)
    except ApiError as exc:  # a bad name, one bound to another base, the store down, gone
        return refused(exc.message, exc.status)
    notice = "published" if answer.status_code == 201 else "already"
    return _back(found.id, notice, saved.path)


def _back(session_id: str, notice: str, path: str) -> Response:
    query = urlencode({"notice": notice, "checkpoint": path})
    return RedirectResponse(
        f"/sessions/{quote(session_id, '')}?{query}#checkpoints", status_code=303
    )
