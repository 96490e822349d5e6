"""POST /v1/fine_tuning/jobs/cancel: cancel every unfinished job of the caller's tenant whose
metadata holds the given pairs (a sweep tagged at create), in one request.

OpenAI has no such call; a platform whose tenants queue sweeps of thousands of jobs needs one
(Slurm's `scancel --name`, a label selector in Kubernetes). Each job moves as its own cancel
would move it (`control_plane.sweeps`).
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from control_plane import sweeps
from control_plane.api.deps import ServicesDep, Writer
from control_plane.api.schemas import MetadataKey, MetadataValue

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])


class JobsCancel(BaseModel):
    """Which of the caller's jobs to cancel: those whose metadata holds every pair."""

    model_config = ConfigDict(extra="forbid")

    # At least one pair: an empty selector would name every job of the tenant.
    metadata: dict[MetadataKey, MetadataValue] = Field(min_length=1, max_length=16)


class JobsCancelledPublic(BaseModel):
    object: Literal["fine_tuning.jobs.cancelled"] = "fine_tuning.jobs.cancelled"
    metadata: dict[str, str]
    # validating, queued or paused: cancelled at once
    cancelled: int
    # running: `cancelling` until their trainers stop (at their next step)
    cancelling: int


@router.post("/cancel", response_model=JobsCancelledPublic)
def cancel_jobs(body: JobsCancel, caller: Writer, services: ServicesDep) -> JobsCancelledPublic:
    """Cancel the caller's unfinished jobs whose metadata holds every pair of `metadata`:
    validating, queued and paused ones at once, running ones at their trainer's next step.
    Jobs already over, or already cancelling, are left as they are; matching none is not an
    error (both counts are 0)."""
    moved = sweeps.cancel_matching(services.engine, caller.tenant_id, body.metadata)
    return JobsCancelledPublic(
        metadata=body.metadata, cancelled=moved.cancelled, cancelling=moved.cancelling
    )
