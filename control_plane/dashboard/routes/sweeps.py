"""The jobs table's sweep moves: with the table filtered by metadata (`sweep=lr-grid`), a
writer cancels, pauses or resumes every job the filter selects that the move takes, through
the REST routes' own functions (`POST /v1/fine_tuning/jobs/cancel`, `/pause`, `/resume`: the
same rules, the same events)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Literal
from urllib.parse import urlencode

from fastapi import APIRouter, Form
from fastapi.responses import RedirectResponse, Response
from pydantic import ValidationError

from control_plane.api.deps import ServicesDep, require_writer
from control_plane.api.errors import ApiError
from control_plane.api.routes import job_sweeps
from control_plane.api.routes.job_sweeps import JobsSelection
from control_plane.dashboard import queries
from control_plane.dashboard.render import PageForbidden
from control_plane.dashboard.sessions import CheckedSession
from control_plane.services import Services
from control_plane.tenants import Principal

router = APIRouter()

Move = Callable[[JobsSelection, Principal, Services], tuple[int, int]]

# Each move through its REST function: what it moved at once, and what it asked of running jobs.
_MOVES: dict[str, Move] = {
    "cancel": lambda body, caller, services: (
        (moved := job_sweeps.cancel_jobs(body, caller, services)).cancelled,
        moved.cancelling,
    ),
    "pause": lambda body, caller, services: (
        (moved := job_sweeps.pause_jobs(body, caller, services)).paused,
        moved.pausing,
    ),
    "resume": lambda body, caller, services: (
        (moved := job_sweeps.resume_jobs(body, caller, services)).resumed,
        moved.pause_withdrawn,
    ),
}


@router.post("/jobs/sweep")
def move_sweep(
    session: CheckedSession,
    services: ServicesDep,
    action: Annotated[Literal["cancel", "pause", "resume"], Form()],
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
    now, asked = _MOVES[action](body, session.principal, services)
    query = {"q": q, "swept": action, "now": now, "asked": asked}
    return RedirectResponse(f"/jobs?{urlencode(query)}", status_code=303)
