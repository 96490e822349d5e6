"""/v1/fine_tuning/jobs: create, list, retrieve, cancel, pause, resume, a new priority, events,
checkpoints, and a queued job's standing in the queue."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Request
from pydantic import BaseModel, Field
from sqlalchemy import Connection

from control_plane import base_catalog, jobs, queue_standing, registry
from control_plane import events as event_repo
from control_plane.api import sse
from control_plane.api.deps import Caller, ConnDep, ServicesDep, Writer, allow_priority
from control_plane.api.errors import ApiError, not_found
from control_plane.api.job_requests import dispatch_validations, new_job
from control_plane.api.openapi import refusals
from control_plane.api.schemas import (
    CheckpointPublic,
    EventPublic,
    JobCreate,
    JobPriority,
    JobPublic,
    Page,
    page_of,
)
from control_plane.pagination import trim
from control_plane.queue import JobStateError
from control_plane.records import JobRecord
from control_plane.tenants import Principal

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])


def public_job(conn: ConnDep, job: JobRecord) -> JobPublic:
    base = base_catalog.get_base_model(conn, job.base_model_id)
    parent = (
        registry.get_version_by_id(conn, job.parent_version_id) if job.parent_version_id else None
    )
    return JobPublic.of(
        job, base.name if base else job.base_model_id, parent.model_id if parent else None
    )


def _id(item: JobPublic | EventPublic | CheckpointPublic) -> str:
    """An item's cursor: the id that `after` takes."""
    return item.id


def _owned_job(conn: ConnDep, caller: Caller, job_id: str) -> JobRecord:
    job = jobs.get_job(conn, caller.tenant_id, job_id)
    if job is None:
        raise not_found("fine_tuning_job", job_id)
    return job


@router.post("", response_model=JobPublic, responses=refusals(404, 409))
def create_job(
    body: JobCreate,
    conn: ConnDep,
    caller: Writer,
    services: ServicesDep,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> JobPublic:
    new = new_job(body, conn, caller, services, idempotency_key)
    try:
        job, created = jobs.create_job(conn, new)
    except jobs.IdempotencyConflictError as exc:
        raise ApiError(409, "idempotency_key_reused", str(exc), "Idempotency-Key") from None
    public = public_job(conn, job)
    if created:
        conn.commit()
        dispatch_validations(services, [job.id])
    return public


_METADATA_KEY = re.compile(r"^metadata\[(.*)\]$", re.DOTALL)


def _metadata_filter(request: Request) -> dict[str, str] | None:
    """OpenAI's filter: `metadata[k]=v` pairs, every one of which a job's metadata must hold
    (`metadata[k]=` matches an empty value), or `metadata=null` for the jobs without metadata
    ({} then); None when the query has neither."""
    pairs: dict[str, str] = {}
    without = False
    for name, value in request.query_params.multi_items():
        if name == "metadata":
            if value != "null":
                raise ApiError(
                    400,
                    "invalid_request",
                    "metadata: filter with metadata[key]=value (a parameter a pair), or "
                    "metadata=null for the jobs without metadata",
                    "metadata",
                )
            without = True
        elif found := _METADATA_KEY.match(name):
            key = found.group(1)
            if pairs.get(key, value) != value:
                raise ApiError(
                    400,
                    "invalid_request",
                    f"metadata[{key}]: given twice with different values; no job holds both",
                    f"metadata[{key}]",
                )
            pairs[key] = value
    if without and pairs:
        raise ApiError(
            400,
            "invalid_request",
            "metadata: metadata=null selects the jobs without metadata; it cannot be combined "
            "with metadata[key]=value",
            "metadata",
        )
    return {} if without else (pairs or None)


# Read off the query by `_metadata_filter` (FastAPI has no deep-object parameter); documented.
_METADATA_PARAMETER = {
    "name": "metadata",
    "in": "query",
    "required": False,
    "style": "deepObject",
    "explode": True,
    "schema": {"type": "object", "additionalProperties": {"type": "string"}},
    "description": "Only the jobs whose metadata holds every pair: metadata[k]=v (one "
    "parameter a pair); metadata=null for the jobs without metadata.",
}


@router.get(
    "",
    response_model=Page[JobPublic],
    responses=refusals(404),
    openapi_extra={"parameters": [_METADATA_PARAMETER]},
)
def list_jobs(
    request: Request,
    conn: ConnDep,
    caller: Caller,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> Page[JobPublic]:
    metadata = _metadata_filter(request)
    try:
        found, more = jobs.list_jobs(
            conn, caller.tenant_id, after=after, limit=limit, metadata=metadata
        )
    except LookupError:
        raise not_found("fine_tuning_job", after or "", "after") from None
    return page_of([public_job(conn, j) for j in found], has_more=more, cursor=_id)


@router.get("/{job_id}", response_model=JobPublic)
def retrieve_job(job_id: str, conn: ConnDep, caller: Caller) -> JobPublic:
    return public_job(conn, _owned_job(conn, caller, job_id))


@router.post("/{job_id}/cancel", response_model=JobPublic, responses=refusals(409))
def cancel_job(job_id: str, conn: ConnDep, caller: Writer, services: ServicesDep) -> JobPublic:
    return _move(conn, caller, job_id, services.queue.request_cancel, "cancelled")


@router.post("/{job_id}/pause", response_model=JobPublic, responses=refusals(409))
def pause_job(job_id: str, conn: ConnDep, caller: Writer, services: ServicesDep) -> JobPublic:
    """A queued job is `paused` at once; a running one stops at its next step with a
    checkpoint (until then it answers `running`, and its events say the pause was asked for)."""
    return _move(conn, caller, job_id, services.queue.request_pause, "paused")


@router.post("/{job_id}/resume", response_model=JobPublic, responses=refusals(409))
def resume_job(job_id: str, conn: ConnDep, caller: Writer, services: ServicesDep) -> JobPublic:
    """A paused job is queued again and goes on from its newest checkpoint; a running job asked
    to pause is asked no more."""
    return _move(conn, caller, job_id, services.queue.resume, "resumed")


@router.post("/{job_id}/priority", response_model=JobPublic, responses=refusals(409))
def set_job_priority(
    job_id: str, body: JobPriority, conn: ConnDep, caller: Writer, services: ServicesDep
) -> JobPublic:
    """A queued job takes its new place in the claim's order at once (priority goes before
    the fair share); a validating, paused or running job keeps it for when it is queued. 403
    above the tenant's cap (`max_priority`), 409 for a job cancelling or over."""

    def move(owned: str) -> JobRecord:  # the job is the caller's (404 before 403)
        allow_priority(conn, caller, body.priority, services)
        return services.queue.set_priority(owned, body.priority)

    return _move(conn, caller, job_id, move, "reprioritized")


# Each move's refusal: its code and what the job would have to be.
_REFUSED = {
    "cancelled": ("job_not_cancellable", "only unfinished jobs can be cancelled"),
    "paused": ("job_not_pausable", "only queued and running jobs can be paused"),
    "resumed": (
        "job_not_resumable",
        "only paused jobs (and running ones asked to pause) can be resumed",
    ),
    "reprioritized": (
        "job_not_prioritizable",
        "only jobs not yet over and not cancelling take a new priority",
    ),
}


def _move(
    conn: Connection, caller: Principal, job_id: str, move: Callable[[str], JobRecord], done: str
) -> JobPublic:
    """`move` the caller's job, or 409 when its state does not allow it."""
    _owned_job(conn, caller, job_id)
    try:
        job = move(job_id)
    except JobStateError as exc:
        code, rule = _REFUSED[done]
        raise ApiError(409, code, f"Job {job_id} is {exc.status}; {rule}.") from None
    return public_job(conn, job)


class QueueStandingPublic(BaseModel):
    """A queued job's place in the queue, as the claim ranks it now."""

    object: Literal["fine_tuning.job.queue_standing"] = "fine_tuning.job.queue_standing"
    fine_tuning_job_id: str
    waiting_for: queue_standing.WaitingFor = Field(
        description="retry_backoff: a retry waiting until run_after; tenant_limit: the tenant "
        "runs as many jobs as its limit allows; own_jobs: own_jobs_ahead of the tenant's own "
        "jobs go first; other_tenants: it is the tenant's next job and tenants_ahead other "
        "tenants' next jobs go first; trainer: the next claim takes it."
    )
    message: str = Field(description="What it waits for, in a sentence.")
    own_jobs_ahead: int = Field(
        description="The tenant's claimable queued jobs the claim takes before this one."
    )
    tenants_ahead: int | None = Field(
        description="Other tenants whose next job goes first (only when this is the tenant's "
        "next job, claimable, and the tenant under its limit)."
    )
    share: int = Field(
        description="Its fair share: the tenant's running jobs + its rank among the tenant's "
        "claimable jobs. Within a priority, lower shares go first."
    )
    tenant_running: int
    tenant_limit: int
    run_after: int | None = Field(description="When a retry backing off may be claimed.")
    trainers_alive: int = Field(description="Trainers heard from within a lease.")
    trainers_idle: int = Field(description="Of those, the ones training no job.")

    @classmethod
    def of(cls, s: queue_standing.Standing) -> QueueStandingPublic:
        return cls(
            fine_tuning_job_id=s.job_id,
            waiting_for=s.waiting_for,
            message=s.message,
            own_jobs_ahead=s.own_jobs_ahead,
            tenants_ahead=s.tenants_ahead,
            share=s.share,
            tenant_running=s.tenant_running,
            tenant_limit=s.tenant_limit,
            run_after=int(s.run_after.timestamp()) if s.run_after else None,
            trainers_alive=s.trainers_alive,
            trainers_idle=s.trainers_idle,
        )


@router.get("/{job_id}/queue", response_model=QueueStandingPublic, responses=refusals(409))
def job_queue_standing(
    job_id: str, conn: ConnDep, caller: Caller, services: ServicesDep
) -> QueueStandingPublic:
    """Why a queued job waits and what goes before it, ranked as the claim ranks now (a
    trainer's resident base only breaks ties on priority, share and served time). 409 for a job
    that is not queued."""
    job = _owned_job(conn, caller, job_id)
    found = queue_standing.standing(conn, job_id, services.queue)
    if found is None:
        raise ApiError(
            409,
            "job_not_queued",
            f"Job {job_id} is {job.status}; only a queued job has a place in the queue.",
        )
    return QueueStandingPublic.of(found)


@router.get("/{job_id}/events", response_model=Page[EventPublic])
def list_events(
    job_id: str,
    conn: ConnDep,
    caller: Caller,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    order: Annotated[str, Query(pattern="^(asc|desc)$")] = "desc",
) -> Page[EventPublic]:
    """Newest first (OpenAI's order) unless `order=asc`; `after` is an event id."""
    _owned_job(conn, caller, job_id)
    after_id = sse.parse_event_id(after)
    if after is not None and after_id is None:
        raise ApiError(400, "invalid_cursor", f"after: {after!r} is not an event id", "after")
    found = event_repo.list_events(
        conn, job_id, after=after_id, limit=limit + 1, newest_first=order == "desc"
    )
    page, more = trim(found, limit)
    return page_of([EventPublic.of(e) for e in page], has_more=more, cursor=_id)


@router.get("/{job_id}/checkpoints", response_model=Page[CheckpointPublic])
def list_checkpoints(
    job_id: str,
    conn: ConnDep,
    caller: Caller,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
) -> Page[CheckpointPublic]:
    _owned_job(conn, caller, job_id)
    try:
        found, more = jobs.list_checkpoints(conn, job_id, after=after, limit=limit)
    except LookupError:
        raise not_found("checkpoint", after or "", "after") from None
    return page_of([CheckpointPublic.of(c) for c in found], has_more=more, cursor=_id)
