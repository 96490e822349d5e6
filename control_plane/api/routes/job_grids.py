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

import dataclasses
import hashlib
import itertools
import json
import re
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from control_plane import jobs
from control_plane.api.deps import ConnDep, ServicesDep, Writer
from control_plane.api.errors import ApiError
from control_plane.api.job_requests import dispatch_validations, new_job
from control_plane.api.openapi import refusals
from control_plane.api.routes.fine_tuning import public_job
from control_plane.api.schemas import NAME_PATTERN, JobCreate, JobPublic
from control_plane.hyperparameters import Hyperparameters
from control_plane.sweeps import SWEEP_KEY

router = APIRouter(prefix="/v1/fine_tuning/sweeps", tags=["fine-tuning"])

MAX_SWEEP_JOBS = 64  # points in one request
MAX_GRID_VALUES = 16  # values of one hyperparameter


class SweepCreate(BaseModel):
    """One job's body and the hyperparameter values to sweep over it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        min_length=1,
        max_length=128,
        pattern=NAME_PATTERN.pattern,
        description="the sweep's name: each job's metadata holds sweep=<name>",
    )
    job: JobCreate = Field(description="one job's create body, which every point shares")
    grid: dict[str, list[Any]] = Field(
        min_length=1,
        max_length=4,
        description="hyperparameter name: the values it takes, as `hyperparameters` takes "
        f"them; one job per point of the grid, the first name varying slowest (at most "
        f"{MAX_GRID_VALUES} values a name, {MAX_SWEEP_JOBS} points)",
    )

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
            if "auto" in values:
                raise ValueError(f"{name}: 'auto' is the default, not a value: give the values")
            stored = {json.dumps(_as_stored(name, v), sort_keys=True) for v in values}
            if len(stored) < len(values):
                raise ValueError(f"{name}: a value is given twice (as the job would store it)")
        points = 1
        for values in grid.values():
            points *= len(values)
        if points > MAX_SWEEP_JOBS:
            raise ValueError(
                f"the grid has {points} points: at most {MAX_SWEEP_JOBS} jobs a request (send "
                "the rest under the same name)"
            )
        return grid

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


def _as_stored(name: str, value: Any) -> Any:
    """A grid value as a job would store it (8.0 and "8" are 8 for an integer), or as given
    where it is not valid (its job's check then refuses it, naming the point)."""
    try:
        kind: Any = Hyperparameters.model_fields[name].annotation
        return TypeAdapter(kind).validate_python(value)
    except ValidationError:
        return value


def _apart_from_the_job(body: SweepCreate) -> None:
    """400 for a grid that the job's own body contradicts."""
    job, grid = body.job, body.grid
    own = job.method.own_hyperparameters() if job.method else {}  # "auto" included
    set_by_job = set(job.hyperparameters or {}) | set(own)
    if job.seed is not None:
        set_by_job.add("seed")
    refusals = [
        (
            sorted(set(grid) & set_by_job),
            "set by the job (its hyperparameters, method or seed) and swept by the grid: keep one",
            "grid",
        ),
        (
            "dpo_beta" in grid and (job.method is None or job.method.type != "dpo"),
            'dpo_beta is DPO\'s beta: sweep it for a job of method {"type": "dpo"}',
            "grid.dpo_beta",
        ),
        (
            SWEEP_KEY in (job.metadata or {}),
            f"{SWEEP_KEY!r} is the sweep's name, which it adds: leave it out",
            f"job.metadata.{SWEEP_KEY}",
        ),
        (len(job.metadata or {}) > 15, "at most 15 pairs: the sweep adds its name", "job.metadata"),
    ]
    for wrong, why, param in refusals:
        if wrong:
            said = f"{wrong}: {why}" if isinstance(wrong, list) else why
            raise ApiError(400, "invalid_request", f"{param}: {said}", param)


@router.post("", response_model=SweepPublic, responses=refusals(409))
def create_sweep(
    body: SweepCreate,
    conn: ConnDep,
    caller: Writer,
    services: ServicesDep,
    idempotency_key: Annotated[str | None, Header(max_length=250)] = None,
) -> SweepPublic:
    _apart_from_the_job(body)
    points = body.points()
    # The whole request, in each point's request hash: the key replays only this very sweep.
    whole = hashlib.sha256(body.model_dump_json().encode()).hexdigest()
    metadata = {**(body.job.metadata or {}), SWEEP_KEY: body.name}
    news = []
    for index, point in enumerate(points):
        job = body.job.model_copy(
            update={
                "hyperparameters": {**(body.job.hyperparameters or {}), **point},
                "metadata": metadata,
            }
        )
        # A header cannot hold a line break: no single job's key is a point's.
        key = None if idempotency_key is None else f"{idempotency_key}\n{index}"
        try:
            made = new_job(job, conn, caller, services, key, check_priority=index == 0)
            news.append(dataclasses.replace(made, request_extra=whole))
        except ApiError as exc:
            where = ", ".join(f"{k}={_clipped(_shown(v))}" for k, v in point.items())
            raise ApiError(
                exc.status,
                exc.code,
                f"grid point {index + 1} of {len(points)} ({where}): {exc.message}; no job of "
                "the sweep was created",
                _param(exc.param, point),
            ) from None
    try:
        created = [jobs.create_job(conn, new) for new in news]
    except jobs.IdempotencyConflictError:
        raise ApiError(
            409,
            "idempotency_key_reused",
            "this Idempotency-Key was already used for another sweep; use a new key for a new one",
            "Idempotency-Key",
        ) from None
    answer = SweepPublic(
        name=body.name,
        metadata={SWEEP_KEY: body.name},
        jobs=[public_job(conn, j) for j, _ in created],
    )
    if fresh := [j.id for j, new in created if new]:
        conn.commit()
        dispatch_validations(services, fresh)
    return answer


def _shown(value: Any) -> str:
    """A grid value as a person typed it: a string as is (a form sends every value as one)."""
    return value if isinstance(value, str) else json.dumps(value)


def _clipped(text: str) -> str:
    return text if len(text) <= 80 else text[:79] + "…"


def _param(param: str | None, point: dict[str, Any]) -> str:
    """Where in the sweep's body a refused job's `param` is: the grid for a swept value."""
    name = re.split(r"[.\[]", (param or "").removeprefix("hyperparameters."))[0]
    if param and param.startswith("hyperparameters.") and name in point:
        return f"grid.{name}"
    return f"job.{param}" if param else "job"
