"""POST /v1/fine_tuning/jobs/cancel, /pause, /resume and /priority: move every job of the
caller's tenant whose metadata holds the given pairs (a sweep tagged at create) in one request.

OpenAI has no such calls; a platform whose tenants queue sweeps of thousands of jobs needs them
(Slurm's `scancel --name`, `scontrol hold` and `scontrol update ... priority`, a label selector in
Kubernetes). Each job moves as its own cancel, pause, resume or new priority would move it (`control_plane.sweeps`); jobs in a state the
move does not take are left as they are, and selecting none is not an error.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from control_plane import sweeps
from control_plane.api.deps import ConnDep, ServicesDep, Writer, allow_priority
from control_plane.api.schemas import MetadataKey, MetadataValue, Priority

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])


class JobsSelection(BaseModel):
    """Which of the caller's jobs to move: those whose metadata holds every pair."""

    model_config = ConfigDict(extra="forbid")

    # At least one pair: an empty selector would name every job of the tenant.
    metadata: dict[MetadataKey, MetadataValue] = Field(min_length=1, max_length=16)


class JobsPrioritySelection(JobsSelection):
    """Which of the caller's jobs take which priority."""

    priority: Priority


class JobsCancelledPublic(BaseModel):
    object: Literal["fine_tuning.jobs.cancelled"] = "fine_tuning.jobs.cancelled"
    metadata: dict[str, str]
    # validating, queued or paused: cancelled at once
    cancelled: int
    # running: `cancelling` until their trainers stop (at their next step)
    cancelling: int


class JobsPausedPublic(BaseModel):
    object: Literal["fine_tuning.jobs.paused"] = "fine_tuning.jobs.paused"
    metadata: dict[str, str]
    # queued: paused at once
    paused: int
    # running: asked to pause (each stops at its next step with a checkpoint, then `paused`)
    pausing: int


class JobsResumedPublic(BaseModel):
    object: Literal["fine_tuning.jobs.resumed"] = "fine_tuning.jobs.resumed"
    metadata: dict[str, str]
    # paused: queued again, each to go on from its newest checkpoint
    resumed: int
    # running and asked to pause: asked no more
    pause_withdrawn: int


class JobsPrioritizedPublic(BaseModel):
    object: Literal["fine_tuning.jobs.prioritized"] = "fine_tuning.jobs.prioritized"
    metadata: dict[str, str]
    priority: int
    # jobs that had another priority and took this one
    changed: int


@router.post("/cancel", response_model=JobsCancelledPublic)
def cancel_jobs(body: JobsSelection, caller: Writer, services: ServicesDep) -> JobsCancelledPublic:
    """Cancel the caller's unfinished jobs whose metadata holds every pair of `metadata`:
    validating, queued and paused ones at once, running ones at their trainer's next step.
    Jobs already over, or already cancelling, are left as they are."""
    moved = sweeps.cancel_matching(services.engine, caller.tenant_id, body.metadata)
    return JobsCancelledPublic(metadata=body.metadata, cancelled=moved.now, cancelling=moved.asked)


@router.post("/pause", response_model=JobsPausedPublic)
def pause_jobs(body: JobsSelection, caller: Writer, services: ServicesDep) -> JobsPausedPublic:
    """Pause the caller's queued and running jobs whose metadata holds every pair: queued ones
    at once (out of the queue), running ones at their next step, with a checkpoint. Others
    (validating, paused, asked already, cancelling, over) are left as they are."""
    moved = sweeps.pause_matching(services.engine, caller.tenant_id, body.metadata)
    return JobsPausedPublic(metadata=body.metadata, paused=moved.now, pausing=moved.asked)


@router.post("/resume", response_model=JobsResumedPublic)
def resume_jobs(body: JobsSelection, caller: Writer, services: ServicesDep) -> JobsResumedPublic:
    """Resume the caller's paused jobs whose metadata holds every pair (queued again, each to
    go on from its newest checkpoint; idle trainers are woken), and withdraw the pause of the
    running ones asked to pause."""
    moved = sweeps.resume_matching(services.engine, caller.tenant_id, body.metadata)
    return JobsResumedPublic(metadata=body.metadata, resumed=moved.now, pause_withdrawn=moved.asked)


@router.post("/priority", response_model=JobsPrioritizedPublic)
def prioritize_jobs(
    body: JobsPrioritySelection, conn: ConnDep, caller: Writer, services: ServicesDep
) -> JobsPrioritizedPublic:
    """Give `priority` to the caller's jobs whose metadata holds every pair and that are not
    over or cancelling: queued ones move in the claim's order at once (priority goes before
    the fair share), validating, paused and running ones keep it for when they are queued.
    403, nothing changed, above the tenant's cap (`max_priority`)."""
    allow_priority(conn, caller, body.priority, services)
    changed = sweeps.prioritize_matching(
        services.engine, caller.tenant_id, body.metadata, body.priority
    )
    return JobsPrioritizedPublic(metadata=body.metadata, priority=body.priority, changed=changed)
