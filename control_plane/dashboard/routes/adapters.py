"""The adapters list and an adapter's page: versions with their lineage and size, aliases with
their history, moving an alias (through the REST route's own function), and the command that
pulls a version."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy import Connection

from control_plane import registry
from control_plane.api.adapter_schemas import AliasUpdate
from control_plane.api.deps import ServicesDep, require_writer
from control_plane.api.errors import ApiError
from control_plane.api.routes import adapters as adapter_routes
from control_plane.dashboard.render import PageForbidden, PageNotFound, page
from control_plane.dashboard.sessions import CheckedSession, CurrentSession, PageConn, Session

router = APIRouter()


@router.get("/adapters")
def adapters_page(request: Request, session: CurrentSession, conn: PageConn) -> Response:
    found, more = registry.list_adapters(conn, session.principal.tenant_id, limit=100)
    return page(request, "adapters.html", session, adapters=found, more=more)


def _adapter_page(
    request: Request,
    session: Session,
    conn: Connection,
    name: str,
    *,
    error: str | None = None,
    moved: str | None = None,
    status_code: int = 200,
) -> Response:
    tenant_id = session.principal.tenant_id
    try:
        adapter = registry.get_adapter(conn, tenant_id, name)
        versions, more = registry.list_versions(conn, tenant_id, name, limit=100)
        aliases = registry.list_aliases(conn, tenant_id, name)
        history = registry.alias_history(conn, tenant_id, name)
    except registry.RegistryError:
        raise PageNotFound() from None
    return page(
        request,
        "adapter.html",
        session,
        status_code=status_code,
        adapter=adapter,
        versions=versions,
        more_versions=more,
        aliases=aliases,
        history=list(reversed(history)),
        sizes={v.id: sum(int(f["size"]) for f in v.files) for v in versions},
        error=error,
        moved=moved if any(a.name == moved for a in aliases) else None,
    )


@router.get("/adapters/{name}")
def adapter_page(
    name: str,
    request: Request,
    session: CurrentSession,
    conn: PageConn,
    moved: str | None = None,
) -> Response:
    return _adapter_page(request, session, conn, name, moved=moved)


@router.post("/adapters/{name}/aliases")
def move_alias(
    name: str,
    request: Request,
    session: CheckedSession,
    conn: PageConn,
    services: ServicesDep,
    alias: Annotated[str, Form(max_length=200)],
    version: Annotated[int, Form(ge=1, le=registry.MAX_VERSION)],
) -> Response:
    """Point `alias` at `version` (creating it if new); recorded in its history."""
    try:
        caller = require_writer(session.principal)
    except ApiError as exc:
        raise PageForbidden(exc.message) from None
    alias = alias.strip()
    try:
        adapter_routes.set_alias(name, alias, AliasUpdate(version=version), conn, caller, services)
    except ApiError as exc:
        if exc.code == "adapter_not_found":
            raise PageNotFound() from None
        return _adapter_page(request, session, conn, name, error=exc.message, status_code=400)
    return RedirectResponse(f"/adapters/{name}?moved={alias}#aliases", status_code=303)
