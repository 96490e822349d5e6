"""Jobs side by side (`/jobs/compare`): a sweep's jobs, or any few of a tenant's, with the
hyperparameters and metadata that differ between them, how each ended, and their loss curves
on one chart.

A comparison names its jobs (`job=` repeated, in that order) or a metadata search (`q`, the jobs
table's `key=value` search: the newest jobs whose metadata holds every pair). Hyperparameters
equal in every job are listed once, not as columns, so a learning-rate grid reads as one
column of learning rates beside the losses they gave.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Connection, Table, func, select, text

from control_plane.dashboard import queries
from control_plane.db.tables import EVALUATION, JobEvent
from control_plane.hyperparameters import FIELD_ORDER, Hyperparameters
from control_plane.records import JobRecord

MAX_COMPARED = 12
"""The most jobs one comparison holds (a chart of more curves is not read, only looked at)."""

_events = cast(Table, JobEvent.__table__)
LABEL_VALUE_CHARS = 40
"""A chart's series name shows each value that sets its job apart up to this many characters."""


class CompareRefused(Exception):
    """A selection no comparison can be made of: 400 with what to change."""


class JobsNotFound(Exception):
    """An id that is not one of the tenant's jobs (missing or another's: the same either way)."""


@dataclass(frozen=True)
class Selection:
    jobs: list[JobRecord]
    truncated: bool
    """`q` matched more jobs than a comparison holds: the newest `MAX_COMPARED` are shown."""


def chosen_jobs(
    conn: Connection, tenant_id: str, job_ids: Sequence[str], q: str | None
) -> Selection:
    """The jobs a comparison's address names, in its order (`CompareRefused`, `JobsNotFound`)."""
    search = (q or "").strip()
    wanted = list(dict.fromkeys(i.strip() for i in job_ids if i.strip()))
    if wanted and search:
        raise CompareRefused(
            "Give either job ids (job=...) or a metadata search (q=...), not both."
        )
    if search:
        return _by_metadata(conn, tenant_id, search)
    if not wanted:
        raise CompareRefused(
            "Pick the jobs to compare: search the jobs table for key=value (a sweep) and follow "
            "its Compare link, or give two or more job ids (job=ftjob-...&job=ftjob-...)."
        )
    if len(wanted) > MAX_COMPARED:
        raise CompareRefused(
            f"{len(wanted)} jobs were given; a comparison holds at most {MAX_COMPARED}: "
            "leave some out."
        )
    if len(wanted) < 2:
        raise CompareRefused("A comparison needs at least two jobs: add another job id.")
    found = {job.id: job for job in queries.jobs_by_id(conn, tenant_id, wanted)}
    if len(found) != len(wanted):
        raise JobsNotFound()
    return Selection([found[i] for i in wanted], truncated=False)


def _by_metadata(conn: Connection, tenant_id: str, search: str) -> Selection:
    selector = queries.metadata_selector(search)
    if selector is None:
        raise CompareRefused(
            f"q={search!r} is not a metadata search: give key=value pairs (sweep=lr-grid), "
            "several separated by spaces."
        )
    found, more = queries.jobs_page(
        conn,
        tenant_id,
        status=None,
        search=None,
        after=None,
        limit=MAX_COMPARED,
        metadata=selector,
    )
    if len(found) < 2:
        raise CompareRefused(
            f"{len(found)} of your jobs hold{'s' if len(found) == 1 else ''} {search} in their "
            "metadata; a comparison needs at least two."
        )
    return Selection(found, truncated=more)


def _shown(value: Any) -> str:
    if value is None:
        return "—"
    return value if isinstance(value, str) else json.dumps(value)


@dataclass(frozen=True)
class Differences:
    columns: list[str]
    """Hyperparameters (in `Hyperparameters`' order) then `metadata.<key>`s whose values
    differ between the jobs."""
    common: list[tuple[str, str]]
    """Hyperparameters with one value in every job, and that value as shown."""

    def values(self, job: JobRecord) -> dict[str, str]:
        return {column: _shown(_value(job, column)) for column in self.columns}

    def label(self, job: JobRecord) -> str:
        """The job's id, and after it what sets it apart (a chart's series name)."""
        apart = ", ".join(f"{column}={_clipped(text)}" for column, text in self.values(job).items())
        return f"{job.id} ({apart})" if apart else job.id


def _clipped(text: str) -> str:
    return text if len(text) <= LABEL_VALUE_CHARS else text[: LABEL_VALUE_CHARS - 1] + "…"


_DEFAULTS = Hyperparameters().model_dump(mode="json")


def _value(job: JobRecord, column: str) -> Any:
    if column.startswith("metadata."):
        return (job.user_metadata or {}).get(column.removeprefix("metadata."))
    # A job stored before a hyperparameter was added ran with its default.
    return job.hyperparameters.get(column, _DEFAULTS.get(column))


def differences(jobs: Sequence[JobRecord]) -> Differences:
    names = sorted(
        {name for job in jobs for name in job.hyperparameters},
        key=lambda n: (FIELD_ORDER.get(n, len(FIELD_ORDER)), n),
    )
    keys = sorted({key for job in jobs for key in job.user_metadata or {}})
    columns: list[str] = []
    common: list[tuple[str, str]] = []
    for column in [*names, *(f"metadata.{key}" for key in keys)]:
        seen = {json.dumps(_value(job, column), sort_keys=True) for job in jobs}
        if len(seen) > 1:
            columns.append(column)
        elif not column.startswith("metadata."):
            common.append((column, _shown(_value(jobs[0], column))))
    return Differences(columns, common)


@dataclass(frozen=True)
class Outcome:
    """How a job's training went, as the comparison's table shows it."""

    last_train_loss: float | None
    best_eval_loss: float | None


def outcome(conn: Connection, job: JobRecord) -> Outcome:
    """The train loss of the job's last step and its lowest eval loss."""
    last = queries.latest_training_metrics(conn, job.id) or {}
    train_loss = last.get("train_loss")
    return Outcome(
        float(train_loss) if isinstance(train_loss, int | float) else None,
        lowest_eval_loss(conn, job.id),
    )


def lowest_eval_loss(conn: Connection, job_id: str) -> float | None:
    """The job's lowest eval loss, of every evaluation it reported (not the chart's bucket
    means: a long job's chart averages evaluations a few steps apart), read off its
    evaluations alone (`ix_job_events_evaluations`: the statement holds the index's predicate,
    its key a constant, so the planner can use it)."""
    eval_loss = queries.json_number(_events.c.data["eval_loss"])
    best = conn.execute(
        select(func.min(eval_loss)).where(
            _events.c.job_id == job_id, _events.c.type == "metrics", text(EVALUATION)
        )
    ).scalar()
    return None if best is None else float(best)


def curves(conn: Connection, jobs: Sequence[JobRecord], apart: Differences) -> dict[str, Any]:
    """Every job's loss curves, as `/jobs/compare/metrics.json` answers them."""
    answer: list[dict[str, Any]] = []
    for job in jobs:
        found = queries.loss_curves(conn, job.id)
        answer.append(
            {
                "id": job.id,
                "label": apart.label(job),
                "train": {"steps": found.train.steps, "values": found.train.values},
                "eval": {"steps": found.eval.steps, "values": found.eval.values},
                "downsampled": found.downsampled,
            }
        )
    return {"jobs": answer}
