"""The jobs table and the job page, and the streams that keep them live."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from sqlalchemy import Connection
from starlette.concurrency import run_in_threadpool

from control_plane import base_catalog, jobs, queue_standing, registry, sweeps
from control_plane import events as event_repo
from control_plane import files as file_repo
from control_plane.api import sse
from control_plane.api.deps import ServicesDep, require_writer
from control_plane.api.errors import ApiError
from control_plane.api.routes import fine_tuning
from control_plane.api.schemas import JobPublic
from control_plane.api.stream_watch import StreamWatchDep
from control_plane.dashboard import queries
from control_plane.dashboard.render import PageForbidden, PageNotFound, fragment, page, render
from control_plane.dashboard.sessions import (
    CheckedSession,
    CurrentSession,
    PageConn,
    Session,
    stream_gone,
)
from control_plane.hyperparameters import FIELD_ORDER, Hyperparameters
from control_plane.job_status import PAUSABLE, PRIORITIZABLE, TERMINAL, UNFINISHED, JobStatus
from control_plane.records import FileRecord, JobEventRecord, JobRecord
from control_plane.services import Services

router = APIRouter()

PAGE_SIZE = 20
LOG_PAGE = 50
NOTICES = {
    "cancel-requested": "Cancellation requested: the job stops within a few seconds.",
    "cancelled": "The job was cancelled.",
    "not-cancellable": "The job had already finished; there was nothing to cancel.",
    "paused": "The job is paused: it holds no trainer until you resume it.",
    "pause-requested": "Pause requested: the job stops at its next step, with a checkpoint.",
    "not-pausable": "Only a queued or running job can be paused.",
    "resumed": "The job goes on: queued again, from its newest checkpoint.",
    "pause-withdrawn": "Pause withdrawn: the job goes on running.",
    "not-resumable": "Only a paused job (or a running one asked to pause) can be resumed.",
    "prioritized": "New priority set: the job takes its new place in the queue at once.",
    "prioritized-later": "New priority set: the job is not queued now; it takes its place once it is.",
    "not-prioritizable": "Only a job not yet over and not cancelling takes a new priority.",
    "bad-priority": "Nothing changed: a priority is a whole number from -100 (last) to 100 (first).",
    "priority-capped": "Nothing changed: that is above the highest priority your tenant's jobs "
    "may ask for (the platform's operator sets it).",
}


def _base_names(conn: Connection) -> dict[str, str]:
    return {b.id: b.name for b in base_catalog.list_base_models(conn)}


def _row_html(job: JobRecord, bases: dict[str, str]) -> str:
    return render("_job_row.html", job=job, base=bases.get(job.base_model_id, job.base_model_id))


@router.get("/jobs")
def jobs_page(
    request: Request,
    session: CurrentSession,
    conn: PageConn,
    status: str | None = None,
    q: Annotated[str | None, Query(max_length=200)] = None,
    after: Annotated[str | None, Query(max_length=64)] = None,
    swept: sweeps.Action | Literal["priority"] | None = None,
    now: Annotated[int, Query(ge=0)] = 0,
    asked: Annotated[int, Query(ge=0)] = 0,
    priority: Annotated[int, Query(ge=-100, le=100)] = 0,
    refused: Literal["filter", "priority", "cap"] | None = None,
) -> Response:
    wanted = JobStatus(status) if status in set(JobStatus) else None
    search = (q or "").strip() or None
    # `key=value` pairs select jobs by their metadata (a sweep), which can be moved at once
    selector = queries.metadata_selector(search)
    try:
        found, more = queries.jobs_page(
            conn,
            session.principal.tenant_id,
            status=wanted,
            search=None if selector else search,
            after=after,
            limit=PAGE_SIZE,
            metadata=selector,
        )
    except LookupError:
        raise PageNotFound() from None
    filtered = wanted is not None or search is not None or after is not None
    # "New jobs submitted" counts from the tenant's newest job when the page was drawn: the
    # first row only on the unfiltered first page (an older or filtered page's first row has
    # newer jobs that were never new).
    newest = (
        found[0].id
        if found and not filtered
        else queries.newest_job_id(conn, session.principal.tenant_id)
    )
    bases = _base_names(conn)
    context: dict[str, Any] = {
        "jobs": found,
        "rows": [_row_html(j, bases) for j in found],
        "more": more,
        "status": wanted,
        "q": search or "",
        "after": after,
        "statuses": list(JobStatus),
        "filtered": filtered,
        "selector": selector,
        "sweep": (
            sweeps.counts_matching(conn, session.principal.tenant_id, selector)
            if selector and session.principal.can_write()
            else None
        ),
        "swept": (swept, now, asked) if swept else None,
        "priority": priority,
        "refused": refused,
        "stream_url": "/jobs/stream?"
        + "&".join([f"ids={j.id}" for j in found] + ([f"newest={newest}"] if newest else [])),
    }
    if request.headers.get("hx-request") and request.headers.get("hx-target") == "jobs-table":
        return fragment("_jobs_table.html", session=session, **context)
    return page(request, "jobs.html", session, **context)


def _row_state(job: JobRecord) -> tuple[Any, ...]:
    return (job.status, job.progress, job.trained_tokens, job.started_at, job.finished_at)


@router.get("/jobs/stream")
async def jobs_stream(
    request: Request,
    session: CurrentSession,
    services: ServicesDep,
    watch: StreamWatchDep,
    ids: Annotated[list[str], Query(max_length=64)] = [],  # noqa: B006 - FastAPI copies it
    newest: Annotated[str | None, Query(max_length=64)] = None,
) -> StreamingResponse:
    """`row` events (a table row's new HTML) when a listed job moves; `newer` (a count, or
    "100+") when jobs were submitted since the page was drawn (after the job `newest`)."""
    tenant_id = session.principal.tenant_id
    job_ids = ids[:PAGE_SIZE]
    gone = stream_gone(services, session, request)

    def poll() -> tuple[list[JobRecord], int, dict[str, str]]:
        with services.engine.connect() as conn:
            found = queries.jobs_by_id(conn, tenant_id, job_ids)
            return found, queries.newer_jobs(conn, tenant_id, newest), _base_names(conn)

    async def body() -> AsyncIterator[str]:
        sent: dict[str, tuple[Any, ...]] = {}
        newer_sent = 0
        quiet_since = time.monotonic()
        ends_at = quiet_since + sse.MAX_STREAM_SECONDS
        with watch.watching(job_ids=tuple(job_ids), tenant_ids=(tenant_id,)) as watcher:
            while True:
                found, newer, bases = await run_in_threadpool(poll)
                for job in found:
                    state = _row_state(job)
                    if sent.get(job.id) != state:
                        sent[job.id] = state
                        yield sse.frame(_row_html(job, bases), event="row", id=None)
                        quiet_since = time.monotonic()
                if newer != newer_sent:
                    newer_sent = newer
                    shown = f"{queries.NEWER_AT_MOST}+" if newer > queries.NEWER_AT_MOST else newer
                    yield sse.frame(str(shown), event="newer")
                    quiet_since = time.monotonic()
                while (
                    why := await sse.next_move(
                        watcher, ends_at, quiet_since + sse.KEEPALIVE_SECONDS, gone
                    )
                ) == "keepalive":
                    quiet_since = time.monotonic()
                    yield sse.comment()
                if why == "over":
                    return

    return StreamingResponse(body(), media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)


# --------------------------------------------------------------------------- the job page


def _owned(conn: Connection, session: Session, job_id: str) -> JobRecord:
    job = jobs.get_job(conn, session.principal.tenant_id, job_id)
    if job is None:
        raise PageNotFound()
    return job


def _file(conn: Connection, tenant_id: str, file_id: str | None) -> FileRecord | None:
    if file_id is None:
        return None
    record = file_repo.get_file_unscoped(conn, file_id)
    return record if record is not None and record.tenant_id == tenant_id else None


@dataclass(frozen=True)
class Summary:
    """What the live part of a job page shows."""

    job: JobRecord
    base_name: str
    timeline: list[JobEventRecord]
    checkpoints: list[Any]
    latest: dict[str, Any] | None
    adapter_link: str | None
    kept: dict[str, Any] | None = None  # its version's metrics, where early stopping acted


def _summary(conn: Connection, job: JobRecord) -> Summary:
    base = base_catalog.get_base_model(conn, job.base_model_id)
    checkpoints, _ = jobs.list_checkpoints(conn, job.id, limit=20)
    link = None
    if job.fine_tuned_model and "@" in job.fine_tuned_model:
        name, _, number = job.fine_tuned_model.rpartition("@")
        link = f"/adapters/{name}#v{number}"
    version = registry.version_for_job(conn, job.id) if job.status == JobStatus.SUCCEEDED else None
    kept = version.metrics if version and "weights_from_step" in version.metrics else None
    return Summary(
        job=job,
        base_name=base.name if base else job.base_model_id,
        timeline=queries.status_changes(conn, job.id),
        checkpoints=checkpoints,
        latest=queries.latest_training_metrics(conn, job.id),
        adapter_link=link,
        kept=kept
        if kept and (kept["early_stopped"] or kept["weights_from_step"] != kept["steps"])
        else None,
    )


def _summary_html(summary: Summary, session: Session) -> str:
    job, writer = summary.job, session.principal.can_write()
    return render(
        "_job_summary.html",
        s=summary,
        session=session,
        cancellable=writer and job.status in UNFINISHED,
        pausable=writer and job.status in PAUSABLE and not job.pause_requested,
        resumable=writer and (job.status == JobStatus.PAUSED or job.pause_requested),
        prioritizable=writer and job.status in PRIORITIZABLE,
    )


def _event_html(event: JobEventRecord) -> str:
    return render("_event.html", e=event)


def _standing(conn: Connection, job: JobRecord, services: Services) -> dict[str, Any]:
    """Why a queued job waits (its standing in the queue), polled while the job is unfinished."""
    found = (
        queue_standing.standing(conn, job.id, services.queue)
        if job.status == JobStatus.QUEUED
        else None
    )
    return {"job": job, "standing": found, "finished": job.status in TERMINAL}


@router.get("/jobs/{job_id}/standing")
def job_standing(
    job_id: str, session: CurrentSession, conn: PageConn, services: ServicesDep
) -> Response:
    """The job page's standing line (htmx polls it every few seconds)."""
    return fragment(
        "_job_standing.html", **_standing(conn, _owned(conn, session, job_id), services)
    )


@router.get("/jobs/{job_id}")
def job_page(
    job_id: str,
    request: Request,
    session: CurrentSession,
    conn: PageConn,
    services: ServicesDep,
    notice: str | None = None,
) -> Response:
    job = _owned(conn, session, job_id)
    summary = _summary(conn, job)
    recent = event_repo.list_events(conn, job.id, limit=LOG_PAGE + 1)
    events, older = recent[:LOG_PAGE], len(recent) > LOG_PAGE
    parent = (
        registry.get_version_by_id(conn, job.parent_version_id) if job.parent_version_id else None
    )
    defaults = Hyperparameters().model_dump(mode="json")
    return page(
        request,
        "job.html",
        session,
        job=job,
        summary_html=_summary_html(summary, session),
        standing_html=render("_job_standing.html", **_standing(conn, job, services)),
        events=[_event_html(e) for e in events],
        oldest_event=events[-1].id if events else None,
        older=older,
        stream_after=events[0].id if events else 0,
        finished=job.status in TERMINAL,
        hyperparameters=[
            (k, job.hyperparameters[k], job.hyperparameters[k] != defaults.get(k))
            for k in sorted(job.hyperparameters, key=lambda k: FIELD_ORDER.get(k, len(FIELD_ORDER)))
        ],
        training_file=_file(conn, job.tenant_id, job.training_file_id),
        validation_file=_file(conn, job.tenant_id, job.validation_file_id),
        parent=parent,
        base_name=summary.base_name,
        notice=NOTICES.get(notice or ""),
    )


@router.get("/jobs/{job_id}/events")
def older_events(
    job_id: str,
    session: CurrentSession,
    conn: PageConn,
    before: Annotated[int, Query(ge=0, le=sse.EVENT_ID_MAX)],
) -> Response:
    """The page of events before `before`, for the log's "older events" button."""
    job = _owned(conn, session, job_id)
    found = event_repo.list_events(conn, job.id, after=before, limit=LOG_PAGE + 1)
    events, older = found[:LOG_PAGE], len(found) > LOG_PAGE
    return fragment(
        "_older_events.html",
        job=job,
        events=[_event_html(e) for e in events],
        oldest_event=events[-1].id if events else None,
        older=older,
    )


@router.get("/jobs/{job_id}/metrics.json")
def job_metrics(job_id: str, session: CurrentSession, conn: PageConn) -> JSONResponse:
    """The loss curves, downsampled on the server (`queries.loss_curves`), and the id of the
    last event they include, from which the page's stream continues."""
    job = _owned(conn, session, job_id)
    last_event = queries.latest_event_id(conn, job.id)
    curves = queries.loss_curves(conn, job.id)
    return JSONResponse(
        {
            "train": {"steps": curves.train.steps, "values": curves.train.values},
            "eval": {"steps": curves.eval.steps, "values": curves.eval.values},
            "points_in_job": curves.points_in_job,
            "downsampled": curves.downsampled,
            "max_points": queries.MAX_CHART_POINTS,
            "last_event_id": last_event,
        },
        headers={"Cache-Control": "no-store"},
    )


def _metric_point(event: JobEventRecord) -> dict[str, Any] | None:
    data = event.data or {}
    if event.type != "metrics" or "step" not in data:
        return None
    if "train_loss" not in data and "eval_loss" not in data:
        return None
    return {
        "step": data["step"],
        "train_loss": data.get("train_loss"),
        "eval_loss": data.get("eval_loss"),
    }


@router.get("/jobs/{job_id}/stream")
async def job_stream(
    job_id: str,
    request: Request,
    session: CurrentSession,
    services: ServicesDep,
    watch: StreamWatchDep,
    after: Annotated[int, Query(ge=0, le=sse.EVENT_ID_MAX)] = 0,
) -> StreamingResponse:
    """The job page's stream: `log` (an event's HTML), `metric` (a chart point), `summary`
    (the live panel's HTML) and `end`."""
    cursor = sse.parse_event_id(request.headers.get("last-event-id")) or after
    gone = stream_gone(services, session, request)

    def summary_of(job: JobRecord) -> str:
        with services.engine.connect() as conn:
            return _summary_html(_summary(conn, job), session)

    async def body() -> AsyncIterator[str]:
        async for change in sse.follow_job(
            services, watch, session.principal.tenant_id, job_id, cursor, gone
        ):
            if change is None:
                yield sse.comment()
                continue
            for event in change.events:
                yield sse.frame(_event_html(event), event="log", id=event.id)
                point = _metric_point(event)
                if point is not None:
                    yield sse.json_frame(point, event="metric")
            yield sse.frame(await run_in_threadpool(summary_of, change.job), event="summary")
            if change.final:
                yield sse.frame(str(change.job.status), event="end")

    return StreamingResponse(body(), media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)


# The REST routes behind the job page's buttons, and the notice each outcome shows.
_MOVES: dict[str, Callable[..., JobPublic]] = {
    "cancel": fine_tuning.cancel_job,
    "pause": fine_tuning.pause_job,
    "resume": fine_tuning.resume_job,
}
_REFUSED_NOTICE = {"cancel": "not-cancellable", "pause": "not-pausable", "resume": "not-resumable"}


def _notice(action: str, before: JobRecord, after: JobPublic) -> str:
    if action == "cancel":
        return "cancelled" if after.status == JobStatus.CANCELLED else "cancel-requested"
    if action == "pause":
        return "paused" if after.status == JobStatus.PAUSED else "pause-requested"
    return "resumed" if before.status == JobStatus.PAUSED else "pause-withdrawn"


@router.post("/jobs/{job_id}/{action}")
def move(
    job_id: str,
    action: Literal["cancel", "pause", "resume"],
    session: CheckedSession,
    conn: PageConn,
    services: ServicesDep,
) -> Response:
    """Cancel, pause or resume through the REST route's own function (the same rules, the
    same events)."""
    job = _owned(conn, session, job_id)
    try:
        require_writer(session.principal)
    except ApiError as exc:
        raise PageForbidden(exc.message) from None
    try:
        notice = _notice(action, job, _MOVES[action](job.id, conn, session.principal, services))
    except ApiError as exc:
        if exc.status == 404:
            raise PageNotFound() from None
        notice = _REFUSED_NOTICE[action]
    return RedirectResponse(f"/jobs/{job.id}?notice={notice}", status_code=303)
