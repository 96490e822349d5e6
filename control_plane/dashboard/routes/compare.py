"""Jobs side by side: the page (`/jobs/compare`), its curves (`/jobs/compare/metrics.json`) and
its stream (`/jobs/compare/stream`), which keeps both current while the jobs train; each selects
its jobs as `control_plane.dashboard.comparison.chosen_jobs` reads the address."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from sqlalchemy import Connection
from starlette.concurrency import run_in_threadpool

from control_plane.api import sse
from control_plane.api.deps import ServicesDep
from control_plane.api.stream_watch import StreamWatchDep
from control_plane.dashboard import comparison
from control_plane.dashboard.render import PageNotFound, page, render
from control_plane.dashboard.sessions import CurrentSession, PageConn, stream_gone
from control_plane.job_status import TERMINAL
from control_plane.records import JobRecord

router = APIRouter()

JobIds = Annotated[list[str], Query(alias="job", max_length=comparison.MAX_COMPARED * 4)]
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
        chosen = comparison.chosen_jobs(conn, session.principal.tenant_id, job, q)
    except comparison.JobsNotFound:
        raise PageNotFound() from None
    except comparison.CompareRefused as refused:
        return page(request, "compare.html", session, status_code=400, error=str(refused))
    table = _table(conn, chosen.jobs)
    table_html = render("_compare_table.html", **table)
    by_id = urlencode([("job", found.id) for found in chosen.jobs])
    return page(
        request,
        "compare.html",
        session,
        **table,
        table_html=table_html,
        truncated=chosen.truncated,
        q=(q or "").strip(),
        max_compared=comparison.MAX_COMPARED,
        finished=all(found.status in TERMINAL for found in chosen.jobs),
        # The jobs the table shows, by id: a job that joins the search meanwhile does not join
        # the chart.
        metrics_url=f"/jobs/compare/metrics.json?{by_id}",
        # The stream sends the table once it differs from the one drawn here (a change before
        # it connected, or while it reconnected, included).
        stream_url=f"/jobs/compare/stream?{by_id}&drawn={_version(table_html)}",
    )


def _version(html: str) -> str:
    return hashlib.sha256(html.encode()).hexdigest()[:16]


def _table(conn: Connection, jobs: list[JobRecord]) -> dict[str, Any]:
    """What `_compare_table.html` draws of `jobs`."""
    apart = comparison.differences(jobs)
    outcomes = [comparison.outcome(conn, found) for found in jobs]
    rows = [
        {"job": found, "values": apart.values(found), "outcome": outcome}
        for found, outcome in zip(jobs, outcomes, strict=True)
    ]
    evaluated = [
        (o.best_eval_loss, j.id)
        for j, o in zip(jobs, outcomes, strict=True)
        if o.best_eval_loss is not None
    ]
    return {
        "rows": rows,
        "columns": apart.columns,
        "common": apart.common,
        "has_eval": bool(evaluated),
        # The job of the lowest eval loss (the first, on a tie), once two jobs have one.
        "lowest": min(evaluated, key=lambda e: e[0])[1] if len(evaluated) > 1 else None,
    }


@router.get("/jobs/compare/metrics.json")
def compare_metrics(
    session: CurrentSession,
    conn: PageConn,
    job: JobIds = [],  # noqa: B006
    q: Search = None,
) -> JSONResponse:
    try:
        chosen = comparison.chosen_jobs(conn, session.principal.tenant_id, job, q)
    except comparison.JobsNotFound:
        return _error(404, "No such job among yours.")
    except comparison.CompareRefused as refused:
        return _error(400, str(refused))
    apart = comparison.differences(chosen.jobs)
    return JSONResponse(
        comparison.curves(conn, chosen.jobs, apart), headers={"Cache-Control": "no-store"}
    )


def _error(status: int, message: str) -> JSONResponse:
    body: dict[str, Any] = {"error": {"message": message}}
    return JSONResponse(body, status_code=status, headers={"Cache-Control": "no-store"})


REFRESH_SECONDS = 5.0
"""A comparison's stream reads its jobs again at most this often: a sweep of a dozen running
jobs moves every step, and each read takes each job's lowest evaluation."""


@router.get("/jobs/compare/stream")
async def compare_stream(
    request: Request,
    session: CurrentSession,
    services: ServicesDep,
    watch: StreamWatchDep,
    job: JobIds = [],  # noqa: B006
    drawn: Annotated[str, Query(max_length=64)] = "",
) -> StreamingResponse:
    """`table` (the table's new HTML) and `curves` (the curves moved: read them again) while
    the compared jobs train, at most every `REFRESH_SECONDS`, the first time as soon as the
    table differs from the one the page drew (`drawn`, its version); `end` once every job is
    over; `gone` when one of them is not (or no longer) the tenant's."""
    tenant_id = session.principal.tenant_id
    gone = stream_gone(services, session, request)

    def read() -> tuple[str, bool, tuple[str, ...]] | None:
        with services.engine.connect() as conn:
            try:
                chosen = comparison.chosen_jobs(conn, tenant_id, job, None)
            except (comparison.JobsNotFound, comparison.CompareRefused):
                return None
            html = render("_compare_table.html", **_table(conn, chosen.jobs))
            over = all(found.status in TERMINAL for found in chosen.jobs)
            return html, over, tuple(found.id for found in chosen.jobs)

    async def body() -> AsyncIterator[str]:
        quiet_since = time.monotonic()
        ends_at = quiet_since + sse.MAX_STREAM_SECONDS
        found = await run_in_threadpool(read)
        if found is None:
            yield sse.frame("", event="gone")  # an EventSource ended without it reconnects
            return
        sent = drawn
        with watch.watching(job_ids=found[2]) as watcher:
            while True:
                html, over, _ = found
                if (version := _version(html)) != sent:
                    # A new step moves a job's last loss: the curves moved with the table.
                    yield sse.frame(html, event="table")
                    yield sse.frame("", event="curves")
                    sent = version
                    quiet_since = time.monotonic()
                if over:
                    yield sse.frame("", event="end")
                    return
                await asyncio.sleep(REFRESH_SECONDS)
                # A job that moves more often than the refresh leaves the watcher woken: its
                # end and its client are looked at here too, not only while it waits.
                if time.monotonic() >= ends_at or await gone():
                    return
                while (
                    why := await sse.next_move(
                        watcher, ends_at, quiet_since + sse.KEEPALIVE_SECONDS, gone
                    )
                ) == "keepalive":
                    quiet_since = time.monotonic()
                    yield sse.comment()
                if why == "over":
                    return
                found = await run_in_threadpool(read)
                if found is None:
                    yield sse.frame("", event="gone")
                    return

    return StreamingResponse(body(), media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)
