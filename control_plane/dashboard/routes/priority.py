"""The job page's priority: a writer gives one of the tenant's jobs a new place in the queue
through `POST /v1/fine_tuning/jobs/{id}/priority`'s own function (the same rules, the same
event), and is sent back to the page, which shows the new priority and, for a queued job, its
new standing. A priority the REST body would refuse (not a whole number from -100 to 100) is a
notice on the page, not an error."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form
from fastapi.responses import RedirectResponse, Response
from pydantic import ValidationError

from control_plane import jobs
from control_plane.api.deps import ServicesDep, require_writer
from control_plane.api.errors import ApiError
from control_plane.api.routes import fine_tuning
from control_plane.api.schemas import JobPriority
from control_plane.dashboard.render import PageForbidden, PageNotFound
from control_plane.dashboard.sessions import CheckedSession, PageConn
from control_plane.job_status import JobStatus

router = APIRouter()


@router.post("/jobs/{job_id}/priority")
def set_priority(
    job_id: str,
    session: CheckedSession,
    conn: PageConn,
    services: ServicesDep,
    priority: Annotated[str, Form()] = "",
) -> Response:
    """Give the job the form's priority; back to its page, with a notice saying what it did
    (`control_plane.dashboard.routes.jobs.NOTICES`)."""
    job = jobs.get_job(conn, session.principal.tenant_id, job_id)
    if job is None:
        raise PageNotFound()
    try:
        require_writer(session.principal)
    except ApiError as exc:
        raise PageForbidden(exc.message) from None
    try:
        body = JobPriority.model_validate({"priority": priority.strip()})
    except ValidationError:
        return _back(job.id, "bad-priority")
    try:
        moved = fine_tuning.set_job_priority(job.id, body, conn, session.principal, services)
    except ApiError as exc:
        if exc.status == 404:
            raise PageNotFound() from None
        return _back(job.id, "priority-capped" if exc.status == 403 else "not-prioritizable")
    return _back(job.id, "prioritized" if moved.status == JobStatus.QUEUED else "prioritized-later")


def _back(job_id: str, notice: str) -> Response:
    return RedirectResponse(f"/jobs/{job_id}?notice={notice}", status_code=303)
