"""Jobs side by side: the page (`/jobs/compare`) and its curves (`/jobs/compare/metrics.json`),
both selecting their jobs as `control_plane.dashboard.compare.chosen_jobs` reads the address."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from control_plane.dashboard import compare
from control_plane.dashboard.render import PageNotFound, page
from control_plane.dashboard.sessions import CurrentSession, PageConn

router = APIRouter()

JobIds = Annotated[list[str], Query(alias="job", max_length=compare.MAX_COMPARED * 4)]
Search = Annotated[str | None, Query(max_length=200)]


@router.get("/jobs/compare")
def compare_page(
    request: Request,
    session: CurrentSession,
    conn: PageConn,
    job: JobIds = [],  # noqa: B006 (FastAPI copies a query list's default)
    q: Search = None,
) -> Response:
    try:
        chosen = compare.chosen_jobs(conn, session.principal.tenant_id, job, q)
    except compare.JobsNotFound:
        raise PageNotFound() from None
    except compare.CompareRefused as refused:
        return page(request, "compare.html", session, status_code=400, error=str(refused))
    apart = compare.differences(chosen.jobs)
    outcomes = [compare.outcome(conn, found) for found in chosen.jobs]
    rows = [
        {"job": found, "values": apart.values(found), "outcome": outcome}
        for found, outcome in zip(chosen.jobs, outcomes, strict=True)
    ]
    return page(
        request,
        "compare.html",
        session,
        rows=rows,
        columns=apart.columns,
        common=apart.common,
        truncated=chosen.truncated,
        q=(q or "").strip(),
        max_compared=compare.MAX_COMPARED,
        has_eval=any(outcome.best_eval_loss is not None for outcome in outcomes),
        # The jobs the table shows, by id: a job that joins the search meanwhile does not join
        # the chart.
        metrics_url="/jobs/compare/metrics.json?"
        + urlencode([("job", found.id) for found in chosen.jobs]),
    )


@router.get("/jobs/compare/metrics.json")
def compare_metrics(
    session: CurrentSession,
    conn: PageConn,
    job: JobIds = [],  # noqa: B006
    q: Search = None,
) -> JSONResponse:
    try:
        chosen = compare.chosen_jobs(conn, session.principal.tenant_id, job, q)
    except compare.JobsNotFound:
        return _error(404, "No such job among yours.")
    except compare.CompareRefused as refused:
        return _error(400, str(refused))
    apart = compare.differences(chosen.jobs)
    return JSONResponse(
        compare.curves(conn, chosen.jobs, apart), headers={"Cache-Control": "no-store"}
    )


def _error(status: int, message: str) -> JSONResponse:
    body: dict[str, Any] = {"error": {"message": message}}
    return JSONResponse(body, status_code=status, headers={"Cache-Control": "no-store"})
