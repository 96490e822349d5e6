"""The tenants page, the platform operators' own: every tenant by name, fifty a page, with its
jobs by status, its limits and the limits that apply, when the queue last served it and its
live keys; a form on each row sets its limits and one on the page onboards a new tenant.

Every form calls `/v1/tenants`' own route functions (the same rules, the same wake-ups when a
running limit leaves room), so the page and the REST API cannot drift. Only a platform
operator's admin (an admin of a tenant that `platform_operator_tenants` names) sees the page or
may post to it; anyone else gets the 403 page with the reason. A new tenant's admin key is
shown on the page that answers the post, never in a redirect: a key in an address would stay
in the browser's history and in access logs.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import ValidationError
from sqlalchemy import Connection

from control_plane.api.deps import ServicesDep
from control_plane.api.errors import ApiError, describe_validation_errors
from control_plane.api.routes import tenants as tenants_api
from control_plane.api.tenant_schemas import TenantCreate, TenantLimits
from control_plane.dashboard.operators import refuse_unless_operator
from control_plane.dashboard.render import PageNotFound, page
from control_plane.dashboard.sessions import CheckedSession, CurrentSession, PageConn, Session
from control_plane.services import Services
from control_plane.sizes import parse_size

router = APIRouter()

TENANTS_PAGE = 50
NAME_MAX = 128  # `TenantName`'s longest
ADMINISTERING = "Administering tenants (their limits and keys)"

NOTICES = {
    "limits-saved": "New limits saved for {tenant}: a running limit holds its next claims (the "
    "jobs running go on), a priority cap its next requests, an interactive models cap its next "
    "training models (those loaded stay), a checkpoint storage cap its next saves (what is "
    "stored stays).",
    "bad-limits": "Nothing changed for {tenant}: a running limit is a whole number from 0 to "
    "10,000, a priority cap one from -100 to 100, an interactive models cap one from 1 to "
    "10,000 and a checkpoint storage cap a size from 1 byte, in bytes or with a decimal unit "
    "(500M, 20G, 1T); leave a field empty for the platform's default.",
}


def _at(timestamp: int | None) -> datetime | None:
    return datetime.fromtimestamp(timestamp, UTC) if timestamp is not None else None


def _limit(field: str) -> str | None:
    """A limit field as the REST body takes it: empty is null (the platform's default)."""
    return field.strip() or None


def _size(field: str) -> int | None:
    """A cap on bytes as the REST body takes it: empty is null, else the bytes that `20G`,
    `500M` or plain digits write (decimal units; ValueError saying what is taken)."""
    field = field.strip()
    return parse_size(field) if field else None


def _tenants_page(
    request: Request,
    session: Session,
    conn: Connection,
    services: Services,
    *,
    after: str | None = None,
    status_code: int = 200,
    **context: Any,
) -> Response:
    listed = tenants_api.list_tenants(conn, session.principal, services, after, TENANTS_PAGE)
    settings = services.settings
    return page(
        request,
        "tenants.html",
        session,
        status_code=status_code,
        rows=[(t, _at(t.last_served_at)) for t in listed.data],
        more=listed.has_more,
        after=after,
        next_after=listed.last_id,
        default_running=settings.max_running_jobs_per_tenant,
        default_priority=settings.max_priority_per_tenant,
        default_interactive=settings.max_interactive_models_per_tenant,
        default_checkpoint_bytes=settings.max_checkpoint_bytes_per_tenant,
        **context,
    )


@router.get("/tenants")
def tenants_page(
    request: Request,
    session: CurrentSession,
    conn: PageConn,
    services: ServicesDep,
    after: Annotated[str | None, Query(max_length=NAME_MAX)] = None,
    notice: str | None = None,
    tenant: Annotated[str, Query(max_length=NAME_MAX)] = "",
) -> Response:
    refuse_unless_operator(conn, session, services, ADMINISTERING)
    said = NOTICES.get(notice or "")
    return _tenants_page(
        request,
        session,
        conn,
        services,
        after=after or None,
        notice=said.format(tenant=tenant) if said else None,
        refused=notice == "bad-limits",
        new={},
    )


@router.post("/tenants/{name}/limits")
def set_limits(
    name: str,
    session: CheckedSession,
    conn: PageConn,
    services: ServicesDep,
    max_running_jobs: Annotated[str, Form()] = "",
    max_priority: Annotated[str, Form()] = "",
    max_interactive_models: Annotated[str, Form()] = "",
    max_checkpoint_bytes: Annotated[str, Form()] = "",
    after: Annotated[str, Form(max_length=NAME_MAX)] = "",
) -> Response:
    """Give the tenant the form's limits (an empty field: the platform's default) through
    `PATCH /v1/tenants/{name}`'s function; back to the page the form was on, saying what it
    did, or what to change when the REST body would refuse them. All are always set: FastAPI
    reads an empty form field as one not sent, so "not sent" cannot mean "leave it as it is"."""
    refuse_unless_operator(conn, session, services, ADMINISTERING)
    try:
        tenants_api.get_tenant(name, conn, session.principal, services)
    except ApiError:
        raise PageNotFound() from None
    try:
        body = TenantLimits.model_validate(
            {
                "max_running_jobs": _limit(max_running_jobs),
                "max_priority": _limit(max_priority),
                "max_interactive_models": _limit(max_interactive_models),
                "max_checkpoint_bytes": _size(max_checkpoint_bytes),
            }
        )
    except ValueError:  # a size unread, or a limit the body refuses (a ValidationError)
        return _back(name, "bad-limits", after)
    try:
        tenants_api.set_limits(name, body, conn, session.principal, services)
    except ApiError:  # gone since the look-up above
        raise PageNotFound() from None
    return _back(name, "limits-saved", after)


def _back(name: str, notice: str, after: str) -> Response:
    query = {"notice": notice, "tenant": name} | ({"after": after} if after else {})
    return RedirectResponse(f"/tenants?{urlencode(query)}", status_code=303)


@router.post("/tenants")
def create_tenant(
    request: Request,
    session: CheckedSession,
    conn: PageConn,
    services: ServicesDep,
    name: Annotated[str, Form()] = "",
    max_running_jobs: Annotated[str, Form()] = "",
    max_priority: Annotated[str, Form()] = "",
    max_interactive_models: Annotated[str, Form()] = "",
    max_checkpoint_bytes: Annotated[str, Form()] = "",
) -> Response:
    """Onboard a tenant through `POST /v1/tenants`' function: the answer is a page showing its
    first admin key, once. A name taken or one the REST body refuses, or a limit out of range,
    is the tenants page again with the REST API's message and the form as it was sent; nothing
    is created."""
    refuse_unless_operator(conn, session, services, ADMINISTERING)
    new = {
        "name": name,
        "max_running_jobs": max_running_jobs,
        "max_priority": max_priority,
        "max_interactive_models": max_interactive_models,
        "max_checkpoint_bytes": max_checkpoint_bytes,
    }
    try:
        checkpoint_bytes = _size(max_checkpoint_bytes)
    except ValueError as exc:
        message = f"max_checkpoint_bytes: {exc}"
        return _refused(request, session, conn, services, message, new, status_code=400)
    try:
        body = TenantCreate.model_validate(
            {
                "name": name.strip(),
                "max_running_jobs": _limit(max_running_jobs),
                "max_priority": _limit(max_priority),
                "max_interactive_models": _limit(max_interactive_models),
                "max_checkpoint_bytes": checkpoint_bytes,
            }
        )
    except ValidationError as exc:
        message, _ = describe_validation_errors(list(exc.errors()))
        return _refused(request, session, conn, services, message, new, status_code=400)
    try:
        created = tenants_api.create_tenant(body, conn, session.principal, services)
    except ApiError as exc:  # the name is taken
        return _refused(request, session, conn, services, exc.message, new, exc.status)
    return page(request, "tenant_created.html", session, tenant=created)


def _refused(
    request: Request,
    session: Session,
    conn: Connection,
    services: Services,
    message: str,
    new: dict[str, str],
    status_code: int,
) -> Response:
    return _tenants_page(
        request,
        session,
        conn,
        services,
        status_code=status_code,
        notice=f"No tenant was created: {message}",
        refused=True,
        new=new,
    )
