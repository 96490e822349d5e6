"""The platform as a tenant sees it: the queue (queued and running jobs per tenant, busiest
first: the fifty busiest listed, the rest counted; each tenant's running limit, and whether its
queued jobs wait on it rather than on a trainer), the trainers (host, device, resident base,
current job, tokens/s, last heartbeat; one silent past its lease shows as gone), the interactive
executors (the base each holds, the models it holds, the calls it ran; for an operator, each
base's calls waiting and the oldest's wait), and the base models.

A platform operator's admin (an admin of a tenant in `platform_operator_tenants`) sees every
tenant's counts and every trainer's job; anyone else sees their own tenant's counts, and a
trainer busy with another tenant's job shows only that it is busy.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlalchemy import Connection

from control_plane import base_catalog, interactive_calls, queue_stats, tenants, trainers
from control_plane.api.deps import ServicesDep
from control_plane.api.schemas import BaseModelPublic
from control_plane.dashboard import queries
from control_plane.dashboard.render import page
from control_plane.dashboard.sessions import CurrentSession, PageConn, Session
from control_plane.services import Services

router = APIRouter()

# The queue page lists this many tenants, busiest first; the rest are counted, not listed (a
# platform of thousands of tenants draws a page of fifty rows).
QUEUE_PAGE_TENANTS = 50


def _operator(conn: Connection, session: Session, services: Services) -> bool:
    return tenants.is_operator_tenant(
        conn, session.principal.tenant_id, services.settings.platform_operator_tenants
    )


@router.get("/queue")
def queue_page(
    request: Request, session: CurrentSession, conn: PageConn, services: ServicesDep
) -> Response:
    sees_all = session.principal.is_admin() and _operator(conn, session, services)
    busy = queue_stats.busiest_tenants(
        conn, QUEUE_PAGE_TENANTS, None if sees_all else session.principal.tenant_id
    )
    lines = queries.queue_lines(conn, busy.tenants, services.settings.max_running_jobs_per_tenant)
    workers = trainers.list_trainers(conn, services.settings.lease_seconds)
    own_jobs = {
        j.id
        for j in queries.jobs_by_id(
            conn,
            session.principal.tenant_id,
            [t.current_job_id for t in workers if t.current_job_id],
        )
    }
    lease = services.settings.lease_seconds
    return page(
        request,
        "queue.html",
        session,
        lines=lines,
        busy=busy,
        sees_all=sees_all,
        trainers=workers,
        own_jobs=own_jobs,
        executors=trainers.list_trainers(conn, lease, kind="interactive"),
        held=interactive_calls.held_counts(conn, None if sees_all else session.principal.tenant_id),
        backlog=interactive_calls.backlog(conn, lease) if sees_all else [],
        bases={b.id: b.name for b in base_catalog.list_base_models(conn)},
        lease_seconds=lease,
    )


@router.get("/bases")
def bases_page(
    request: Request, session: CurrentSession, conn: PageConn, services: ServicesDep
) -> Response:
    operator = _operator(conn, session, services)
    bases = [
        BaseModelPublic.of(b, platform_operator=operator)
        for b in base_catalog.list_base_models(conn)
    ]
    return page(request, "bases.html", session, bases=bases, operator=operator)
