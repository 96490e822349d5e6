"""POST /v1/fine_tuning/sweeps: a grid of fine-tuning jobs in one request, all of them or none.

A sweep is how a tenant searches hyperparameters: one job per point of a grid (three learning
rates by two ranks: six jobs), compared side by side once they have trained. Sent one job at a
time, a grid is as many requests, and one refused half-way leaves the sweep half-submitted. Here
the body is one job (`job`, checked as `POST /v1/fine_tuning/jobs` checks it) and a `grid` of
hyperparameter values; every point is checked first (`job_requests.new_job`), and the jobs are
written in one transaction only when none is refused. Each job's metadata holds the template's
pairs and `sweep=<name>`, which is what the sweep's moves (`POST /v1/fine_tuning/jobs/cancel`,
`/pause`, `/resume`, `/priority`), the jobs list's `?metadata[sweep]=` and the dashboard's
comparison (`/jobs/compare?q=sweep=<name>`) select it by. A name used before adds the new jobs to
that sweep (a second grid refining the first), as a sweep's agent adds runs to it.

With an `Idempotency-Key`, point `i` is created under `<key>:<i>`: the same request again answers
the same jobs, and another request under the key is 409, as for one job.
"""

from __future__ import annotations

import itertools
import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from control_plane import jobs
from control_plane.api.deps import ConnDep, ServicesDep, Writer, allow_priority
from control_plane.api.errors import ApiError
from control_plane.api.job_requests import new_job
from control_plane.api.openapi import refusals
from control_plane.api.routes.fine_tuning import public_job
from control_plane.api.schemas import NAME_PATTERN, JobCreate, JobPublic
from control_plane.hyperparameters import Hyperparameters

router = APIRouter(prefix="/v1/fine_tuning/sweeps", tags=["fine-tuning"])

MAX_SWEEP_JOBS = 64  # points in one request
MAX_GRID_VALUES = 16  # values of one hyperparameter
SWEEP_KEY = "sweep"  # the metadata key each job of the sweep holds its name under


class SweepCreate(BaseModel):
    """One job's body and the hyperparameter values to sweep over it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128, pattern=NAME_PATTERN.pattern)
    job: JobCreate
    # Hyperparameter name: the values it takes, one job per point of the grid (the first name
    # varies slowest). A value is what `hyperparameters` would take for that name.
    grid: dict[str, list[Any]] = Field(min_length=1, max_length=4)

    @field_validator("grid")
    @classmethod
    def _grid(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        if "method" in grid:
            raise ValueError(
                "method cannot be swept: a sweep's jobs share job.method (one sweep per method)"
            )
        unknown = sorted(set(grid) - set(Hyperparameters.model_fields))
        if unknown:
            raise ValueError(f"{unknown}: not hyperparameters (a DPO job's beta is dpo_beta)")
        for name, values in grid.items():
            if not 1 <= len(values) <= MAX_GRID_VALUES:
                raise ValueError(f"{name}: give 1 to {MAX_GRID_VALUES} values")
            if len({json.dumps(v, sort_keys=True) for v in values}) < len(values):
                raise ValueError(f"{name}: a value is given twice")
        points = 1
        for values in grid.values():
            points *= len(values)
        if points > MAX_SWEEP_JOBS:
            raise ValueError(
                f"the grid has {points} points: at most {MAX_SWEEP_JOBS} jobs a request (send "
                "the rest under the same name)"
            )
        return grid

    @model_validator(mode="after")
    def _apart_from_the_job(self) -> SweepCreate:
        both = sorted(set(self.grid) & (set(self.job.merged_hyperparameters()) - {"method"}))
        if both:
            raise ValueError(f"{both}: set by the job and swept by the grid: keep one")
        if "dpo_beta" in self.grid and (self.job.method is None or self.job.method.type != "dpo"):
            raise ValueError('dpo_beta: sweep DPO\'s beta for a job of method {"type": "dpo"}')
        metadata = self.job.metadata or {}
        if SWEEP_KEY in metadata:
            raise ValueError(f"job.metadata: {SWEEP_KEY!r} is the sweep's name: leave it out")
        if len(metadata) > 15:
            raise ValueError("job.metadata: at most 15 pairs (the sweep adds its name)")
        return self

    def points(self) -> list[dict[str, Any]]:
        names = list(self.grid)
        return [
            dict(zip(names, values, strict=True))
            for values in itertools.product(*self.grid.values())
        ]


class SweepPublic(BaseModel):
    object: Literal["fine_tuning.sweep"] = "fine_tuning.sweep"
    name: str
    # What selects the sweep's jobs: the moves' `metadata`, `?metadata[sweep]=<name>`.
    metadata: dict[str, str]
    # One per point, in the grid's order.
    jobs: list[JobPublic]


@router.post("", response_model=SweepPublic, responses=refusals(404, 409))
def create_sweep(
    body: SweepCreate,
    conn: ConnDep,
    caller: Writer,
    services: ServicesDep,
    idempotency_key: Annotated[str | None, Header(max_length=250)] = None,
) -> SweepPublic:
    allow_priority(conn, caller, body.job.priority, services)
    points = body.points()
    metadata = {**(body.job.metadata or {}), SWEEP_KEY: body.name}
    news = []
    for index, point in enumerate(points):
        job = body.job.model_copy(
            update={
                "hyperparameters": {**(body.job.hyperparameters or {}), **point},
                "metadata": metadata,
            }
        )
        key = None if idempotency_key is None else f"{idempotency_key}:{index}"
        try:
            news.append(new_job(job, conn, caller, services, key))
        except ApiError as exc:
            where = ", ".join(f"{k}={json.dumps(v)}" for k, v in point.items())
            raise ApiError(
                exc.status,
                exc.code,
                f"grid point {index + 1} of {len(points)} ({where}): {exc.message}; no job of "
                "the sweep was created",
                _param(exc.param, point),
            ) from None
    try:
        made = [jobs.create_job(conn, new) for new in news]
    except jobs.IdempotencyConflictError as exc:
        raise ApiError(409, "idempotency_key_reused", str(exc), "Idempotency-Key") from None
    answer = SweepPublic(
        name=body.name, metadata={SWEEP_KEY: body.name}, jobs=[public_job(conn, j) for j, _ in made]
    )
    if any(created for _, created in made):
        conn.commit()
        for job_record, created in made:
            if created:
                services.dispatch_validation(job_record.id)
    return answer


def _param(param: str | None, point: dict[str, Any]) -> str:
    """Where in the sweep's body a refused job's `param` is: the grid for a swept value."""
    name = (param or "").removeprefix("hyperparameters.")
    if param and param.startswith("hyperparameters.") and name in point:
        return f"grid.{name}"
    return f"job.{param}" if param else "job"
