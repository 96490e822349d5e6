"""The jobs table's sweep moves: with the table filtered by metadata (`sweep=lr-grid`), a
writer cancels, pauses or resumes every job the filter selects that the move takes, or gives
them all a new priority, by the same `control_plane.sweeps` moves and the same body checks as
`POST /v1/fine_tuning/jobs/cancel`, `/pause`, `/resume` and `/priority` (the same rules, the
same events)."""

from __future__ import annotations

from typing import Annotated, Literal
from urllib.parse import urlencode

from fastapi import APIRouter, Form
from fastapi.responses import RedirectResponse, Response
from pydantic import ValidationError

from control_plane import sweeps
from control_plane.api.deps import ServicesDep, require_writer
from control_plane.api.errors import ApiError
from control_plane.api.routes import job_sweeps
from control_plane.api.routes.job_sweeps import JobsPrioritySelection, JobsSelection
from control_plane.dashboard import queries
from control_plane.dashboard.render import PageForbidden
from control_plane.dashboard.sessions import CheckedSession, PageConn

router = APIRouter()


@router.post("/jobs/sweep")
def move_sweep(
    session: CheckedSession,
    conn: PageConn,
    services: ServicesDep,
    action: Annotated[sweeps.Action | Literal["priority"], Form()],
    q: Annotated[str, Form(max_length=200)] = "",
    priority: Annotated[str, Form()] = "",
) -> Response:
    """Move the jobs whose metadata holds the pairs of the table's search `q` (for `priority`,
    give them the form's `priority`); back to the table, filtered the same way, saying how many
    moved, or what to change when the filter or the priority is one the REST body refuses."""
    try:
        require_writer(session.principal)
    except ApiError as exc:
        raise PageForbidden(exc.message) from None
    selector = queries.metadata_selector(q)
    if not selector:  # not a metadata filter: nothing is selected, nothing moves
        return _back({"q": q})
    try:
        body = JobsSelection(metadata=selector)
    except ValidationError:  # more pairs, or longer ones, than a job's metadata can hold
        return _back({"q": q, "refused": "filter"})
    tenant_id = session.principal.tenant_id
    if action != "priority":
        moved = sweeps.move_matching(action, services.engine, tenant_id, body.metadata)
        return _back({"q": q, "swept": action, "now": moved.now, "asked": moved.asked})
    try:
        given = JobsPrioritySelection.model_validate(
            {"metadata": body.metadata, "priority": priority.strip()}
        )
    except ValidationError:  # not a whole number from -100 to 100
        return _back({"q": q, "refused": "priority"})
    try:
        done = job_sweeps.prioritize_jobs(given, conn, session.principal, services)
    except ApiError:  # above the tenant's cap (`max_priority`)
        return _back({"q": q, "refused": "cap"})
    return _back({"q": q, "swept": "priority", "now": done.changed, "priority": given.priority})


def _back(query: dict[str, str | int]) -> Response:
    return RedirectResponse(f"/jobs?{urlencode(query)}", status_code=303)
