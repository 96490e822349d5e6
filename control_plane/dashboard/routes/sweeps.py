"""The jobs table's sweep moves: with the table filtered by metadata (`sweep=lr-grid`), a
writer cancels, pauses or resumes every job the filter selects that the move takes, by the
same `control_plane.sweeps` moves and the same body check as `POST /v1/fine_tuning/jobs/cancel`,
`/pause` and `/resume` (the same rules, the same events)."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Form
from fastapi.responses import RedirectResponse, Response
from pydantic import ValidationError

from control_plane import sweeps
from control_plane.api.deps import ServicesDep, require_writer
from control_plane.api.errors import ApiError
from control_plane.api.routes.job_sweeps import JobsSelection
from control_plane.dashboard import queries
from control_plane.dashboard.render import PageForbidden
from control_plane.dashboard.sessions import CheckedSession

router = APIRouter()


@router.post("/jobs/sweep")
def move_sweep(
    session: CheckedSession,
    services: ServicesDep,
    action: Annotated[sweeps.Action, Form()],
    q: Annotated[str, Form(max_length=200)] = "",
) -> Response:
    """Move the jobs whose metadata holds the pairs of the table's search `q`; back to the
    table, filtered the same way, saying how many moved."""
    try:
        require_writer(session.principal)
    except ApiError as exc:
        raise PageForbidden(exc.message) from None
    selector = queries.metadata_selector(q)
    if not selector:  # not a metadata filter: nothing is selected, nothing moves
        return RedirectResponse(f"/jobs?{urlencode({'q': q})}", status_code=303)
    try:
        body = JobsSelection(metadata=selector)
    except ValidationError:  # more pairs, or longer ones, than a job's metadata can hold
        return RedirectResponse(f"/jobs?{urlencode({'q': q, 'refused': 1})}", status_code=303)
    moved = sweeps.move_matching(
        action, services.engine, session.principal.tenant_id, body.metadata
    )
    query = {"q": q, "swept": action, "now": moved.now, "asked": moved.asked}
    return RedirectResponse(f"/jobs?{urlencode(query)}", status_code=303)
