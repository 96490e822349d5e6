"""The reads only the dashboard makes, each one statement: the session's key by id, a page of
jobs filtered by status or searched, the jobs a live table shows, a job's status changes and
latest metrics, its loss curves downsampled (by the rule a model's curves share), and tenants'
names.

Everything else the pages show comes from the domain modules the REST API uses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    Connection,
    Float,
    Table,
    case,
    func,
    literal,
    or_,
    select,
    text,
    tuple_,
)

from control_plane.db.tables import STATUS_CHANGE, ApiKey, Job, JobEvent, JobMetricRollup, Tenant
from control_plane.events import in_job_order, of_job
from control_plane.job_status import JobStatus
from control_plane.metric_rollups import ROLLUP_WIDTHS
from control_plane.pagination import newest_first
from control_plane.queue_stats import QueueCounts
from control_plane.records import JobEventRecord, JobRecord
from control_plane.tenants import Principal

_keys = cast(Table, ApiKey.__table__)
_tenants = cast(Table, Tenant.__table__)
_jobs = cast(Table, Job.__table__)
_events = cast(Table, JobEvent.__table__)
_rollups = cast(Table, JobMetricRollup.__table__)

MAX_CHART_POINTS = 1000
"""A loss series sent to a page holds at most this many points, however long the job ran or the
interactive model trained."""


def principal_by_key_id(conn: Connection, key_id: str) -> tuple[Principal, str] | None:
    """The principal of an unrevoked key, with its tenant's name; None once it is revoked or
    deleted (the session cookie names keys by id)."""
    row = conn.execute(
        select(_keys.c.id, _keys.c.tenant_id, _keys.c.role, _tenants.c.name)
        .join(_tenants, _tenants.c.id == _keys.c.tenant_id)
        .where(_keys.c.id == key_id, _keys.c.revoked_at.is_(None))
    ).one_or_none()
    if row is None:
        return None
    return Principal(tenant_id=row.tenant_id, key_id=row.id, role=row.role), row.name


def _like(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def jobs_page(
    conn: Connection,
    tenant_id: str,
    *,
    status: JobStatus | None,
    search: str | None,
    after: str | None,
    limit: int,
    metadata: dict[str, str] | None = None,
) -> tuple[list[JobRecord], bool]:
    """Newest first, optionally only one status, optionally matching `search` (a job id, or
    part of an adapter name or model), optionally only jobs whose metadata holds every pair of
    `metadata`; `after` is the last job id of the previous page (`LookupError` when it is not
    one of the tenant's jobs)."""
    filters: list[ColumnElement[bool]] = []
    if metadata:
        filters.append(_jobs.c.user_metadata.contains(metadata))
    if status is not None:
        # Written into the statement, not bound: a page of one finished status is read off the
        # partial `ix_jobs_tenant_finished`, which a plan can use only when it sees the status
        # (a prepared statement's generic plan would not).
        filters.append(_jobs.c.status == literal(status.value, literal_execute=True))
    if search:
        filters.append(
            or_(
                _jobs.c.id == search,
                _jobs.c.adapter_name.ilike(_like(search)),
                _jobs.c.fine_tuned_model.ilike(_like(search)),
            )
        )
    rows, more = newest_first(
        conn,
        _jobs,
        scope=_jobs.c.tenant_id == tenant_id,
        filters=filters,
        after=after,
        limit=limit,
    )
    return [JobRecord.from_row(r) for r in rows], more


def metadata_selector(search: str | None) -> dict[str, str] | None:
    """The metadata pairs a search names (`sweep=lr-grid`, several separated by spaces), or
    None when it is not made of such pairs alone (a job id or an adapter name)."""
    tokens = (search or "").split()
    if not tokens or not all("=" in t and not t.startswith("=") for t in tokens):
        return None
    return dict(t.split("=", 1) for t in tokens)


def jobs_by_id(conn: Connection, tenant_id: str, job_ids: Sequence[str]) -> list[JobRecord]:
    """The tenant's jobs among `job_ids` (others' ids are left out as unknown)."""
    if not job_ids:
        return []
    rows = conn.execute(
        select(_jobs).where(_jobs.c.tenant_id == tenant_id, _jobs.c.id.in_(list(job_ids)))
    ).all()
    return [JobRecord.from_row(r) for r in rows]


NEWER_AT_MOST = 100
"""The live jobs table counts the jobs submitted since it was drawn up to this many ("100+"):
a tenant submitting a sweep costs each open table's poll a bounded read, not the sweep."""


def newest_job_id(conn: Connection, tenant_id: str) -> str | None:
    """The tenant's newest job (None before its first): what "submitted since" counts from."""
    return conn.execute(
        select(_jobs.c.id)
        .where(_jobs.c.tenant_id == tenant_id)
        .order_by(_jobs.c.created_at.desc(), _jobs.c.id.desc())
        .limit(1)
    ).scalar_one_or_none()


def newer_jobs(conn: Connection, tenant_id: str, than_job_id: str | None) -> int:
    """How many of the tenant's jobs were created after this one (all of them for None; none
    once it is deleted), counted up to NEWER_AT_MOST + 1: a seek in the tenant's
    `(tenant_id, created_at, id)` index that reads at most that many entries."""
    newer = select(_jobs.c.id).where(_jobs.c.tenant_id == tenant_id)
    if than_job_id is not None:
        created = (
            select(_jobs.c.created_at)
            .where(_jobs.c.id == than_job_id, _jobs.c.tenant_id == tenant_id)
            .scalar_subquery()
        )
        newer = newer.where(
            tuple_(_jobs.c.created_at, _jobs.c.id) > tuple_(created, literal(than_job_id))
        )
    bounded = newer.order_by(_jobs.c.created_at, _jobs.c.id).limit(NEWER_AT_MOST + 1).subquery()
    return int(conn.execute(select(func.count()).select_from(bounded)).scalar_one())


def status_changes(conn: Connection, job_id: str, limit: int = 50) -> list[JobEventRecord]:
    """A job's events that record a change of status, oldest first: its timeline."""
    rows = conn.execute(
        select(_events)
        # The condition as `ix_job_events_status_changes` and the statistics of revision 0011
        # write it, in that index's order: the plan reads the job's status changes off it, not
        # every event of a long run (nor, walking the primary key, every job's older events).
        .where(of_job(job_id), text(STATUS_CHANGE))
        .order_by(*in_job_order(newest_first=False))
        .limit(limit)
    ).all()
    return [JobEventRecord.from_row(r) for r in rows]


def latest_event_id(conn: Connection, job_id: str) -> int:
    found = conn.execute(
        select(_events.c.id)
        .where(of_job(job_id))
        .order_by(*in_job_order(newest_first=True))
        .limit(1)
    )
    return int(found.scalar() or 0)


def latest_training_metrics(conn: Connection, job_id: str) -> dict[str, Any] | None:
    """The data of the job's last training-step metrics event (tokens/s, step, total), read
    back from the job's newest event (`events.of_job`)."""
    return conn.execute(
        select(_events.c.data)
        .where(
            of_job(job_id),
            _events.c.type == "metrics",
            _events.c.data["train_loss"].is_not(None),
        )
        .order_by(*in_job_order(newest_first=True))
        .limit(1)
    ).scalar()


@dataclass(frozen=True)
class Series:
    """One loss curve as a page draws it: `steps` and `values` of equal length."""

    steps: list[float]
    values: list[float]


@dataclass(frozen=True)
class LossCurves:
    train: Series
    eval: Series
    points_in_job: int
    downsampled: bool


def series_of(rows: Sequence[Any], step_at: int, value_at: int) -> Series:
    """The rows' points that have a value in column `value_at`."""
    kept = [r for r in rows if r[value_at] is not None]
    return Series([r[step_at] for r in kept], [r[value_at] for r in kept])


def chart_width(longest: int, low: float, high: float, max_points: int) -> int | None:
    """The width, in steps, of the buckets a chart's series are downsampled into: None while its
    longest series has at most `max_points` points (each is drawn as it is); else the narrowest
    of revision 0015's widths (2, 4, ... 65,536) that cuts the steps from `low` to `high` into
    at most `max_points` buckets (bucket = floor(step / width)), the widest when none does.
    A job's chart reads that width's sums (`loss_curves`); a model's buckets its points
    (`downsample`)."""
    if longest <= max_points:
        return None
    return next(
        (w for w in ROLLUP_WIDTHS if math.floor(high / w) - math.floor(low / w) < max_points),
        ROLLUP_WIDTHS[-1],
    )


def bucket_means(series: Series, width: int) -> Series:
    """Each bucket's points (bucket = floor(step / width)) as one, their mean step and mean
    value, in step order: the point revision 0015's sums give a job's chart at that width."""
    buckets: dict[int, tuple[int, float, float]] = {}
    for step, value in zip(series.steps, series.values, strict=True):
        bucket = math.floor(step / width)
        points, steps, values = buckets.get(bucket, (0, 0.0, 0.0))
        buckets[bucket] = (points + 1, steps + step, values + value)
    kept = [buckets[b] for b in sorted(buckets)]
    return Series([steps / n for n, steps, _ in kept], [values / n for n, _, values in kept])


def downsample(series: Sequence[Series], max_points: int) -> tuple[list[Series], bool]:
    """Series read point by point, downsampled as a job's chart is: as they are while none
    holds more than `max_points` points, else each bucketed at the one width `chart_width`
    picks for the steps of all of them (`bucket_means`); and whether they were."""
    steps = [step for s in series for step in s.steps]
    longest = max((len(s.steps) for s in series), default=0)
    width = chart_width(longest, min(steps, default=0.0), max(steps, default=0.0), max_points)
    if width is None:
        return list(series), False
    return [bucket_means(s, width) for s in series], True


def json_number(value: ColumnElement[Any]) -> ColumnElement[Any]:
    """A JSONB value where it is a number, else NULL (as revision 0015 reads a metric event)."""
    return case((func.jsonb_typeof(value) == "number", value.astext.cast(Float)))


def _number(key: str) -> ColumnElement[Any]:
    """A metric event's `key` where it is a JSON number, else NULL."""
    return json_number(_events.c.data[key])


def loss_curves(conn: Connection, job_id: str, max_points: int = MAX_CHART_POINTS) -> LossCurves:
    """Train and eval loss against step, each in at most `max_points` points, read from at
    most `max_points` rows however long the job ran.

    A job with no more points than that gets every one, from its events. Past that, the chart
    gets the width `chart_width` picks, the narrowest of revision 0015's bucket widths (2, 4,
    ... 65,536 steps) that cuts the job's steps into at most `max_points` buckets, each bucket
    its points' mean step and mean loss, summed as the events were inserted
    (`job_metric_rollups`): a job with 100,000 steps sends a page the curve a chart of that
    width can draw, not 100,000 points, and costs it a thousand rows, not 100,000 events.
    """
    widest = _rollups.c.width == ROLLUP_WIDTHS[-1]
    bounds = conn.execute(
        select(
            func.sum(_rollups.c.train_points),
            func.sum(_rollups.c.eval_points),
            func.min(_rollups.c.first_step),
            func.max(_rollups.c.last_step),
        ).where(_rollups.c.job_id == job_id, widest)
    ).one()
    n_train, n_eval = int(bounds[0] or 0), int(bounds[1] or 0)
    low, high = float(bounds[2] or 0), float(bounds[3] or 0)
    width = chart_width(max(n_train, n_eval), low, high, max_points)
    if width is None:
        step, train, evaluation = _number("step"), _number("train_loss"), _number("eval_loss")
        points = conn.execute(
            select(step, train, evaluation)
            .where(
                of_job(job_id),
                _events.c.type == "metrics",
                step.is_not(None),
                or_(train.is_not(None), evaluation.is_not(None)),
            )
            .order_by(*in_job_order(newest_first=False))
        ).all()
        return LossCurves(
            series_of(points, 0, 1), series_of(points, 0, 2), n_train + n_eval, downsampled=False
        )
    rows = conn.execute(
        select(_rollups)
        .where(_rollups.c.job_id == job_id, _rollups.c.width == width)
        .order_by(_rollups.c.bucket)
    ).all()
    trained = [r for r in rows if r.train_points]
    evaluated = [r for r in rows if r.eval_points]
    return LossCurves(
        Series(
            [r.train_steps / r.train_points for r in trained],
            [r.train_losses / r.train_points for r in trained],
        ),
        Series(
            [r.eval_steps / r.eval_points for r in evaluated],
            [r.eval_losses / r.eval_points for r in evaluated],
        ),
        n_train + n_eval,
        downsampled=True,
    )


@dataclass(frozen=True)
class QueueLine:
    """A tenant's row on the queue page: its counts beside its name and running limit (its own,
    or the platform's default). `waits_on_limit`: it has jobs queued and holds its limit, so
    they wait for one of its running jobs to finish, not for a trainer."""

    name: str
    queued: int
    running: int
    limit: int

    @property
    def waits_on_limit(self) -> bool:
        return self.queued > 0 and self.running >= self.limit


def queue_lines(
    conn: Connection, counts: Sequence[QueueCounts], default_limit: int
) -> list[QueueLine]:
    """The queue page's rows, in the order of `counts`: one read of the listed tenants."""
    ids = [c.tenant_id for c in counts]
    rows = conn.execute(
        select(_tenants.c.id, _tenants.c.name, _tenants.c.max_running_jobs).where(
            _tenants.c.id.in_(ids)
        )
    )
    tenants = {row.id: row for row in rows}
    lines = []
    for c in counts:
        tenant = tenants.get(c.tenant_id)
        name = tenant.name if tenant is not None else c.tenant_id
        own = tenant.max_running_jobs if tenant is not None else None
        lines.append(QueueLine(name, c.queued, c.running, default_limit if own is None else own))
    return lines
