"""The queue's bookkeeping, read: each tenant's queued and running jobs without counting jobs.

Revision 0006's triggers on `jobs` keep `tenant_queue_stats` (a tenant's counts and when it was
last served) and `queue_heads` (each (tenant, base) line's head) exact in the statement that
moves a job, whoever writes it; the claim reads them instead of ranking the backlog, and the
dashboard and a metrics scrape read the counts here at one row per tenant whatever the backlog
and however many jobs the platform has run (revision 0009 counts every status). `drift` recounts
everything from `jobs` and names each row that disagrees: the check that the triggers hold;
`repair` sets such rows back to the recount after writes that went around the triggers
(`loraforge queue check` and `loraforge queue repair`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import sqlalchemy.exc
from sqlalchemy import Connection, Table, select, text

from control_plane.db.tables import TenantQueueStats
from control_plane.job_status import ACTIVE, JobStatus, as_values

stats = cast(Table, TenantQueueStats.__table__)

_LOCK_NOT_AVAILABLE = "55P03"


@dataclass(frozen=True)
class QueueCounts:
    """A tenant's jobs waiting in the queue (backing off included) and held by workers."""

    tenant_id: str
    queued: int
    running: int


def queue_counts(conn: Connection, tenant_id: str | None = None) -> dict[str, QueueCounts]:
    """Queued and running counts by tenant id: one tenant's (zeros when it never queued a job),
    or every tenant's that has ever queued one. One row read per tenant, never a count."""
    query = select(stats.c.tenant_id, stats.c.queued, stats.c.running)
    if tenant_id is not None:
        query = query.where(stats.c.tenant_id == tenant_id)
    counts = {
        row.tenant_id: QueueCounts(row.tenant_id, row.queued, row.running)
        for row in conn.execute(query.order_by(stats.c.tenant_id))
    }
    if tenant_id is not None and tenant_id not in counts:
        counts[tenant_id] = QueueCounts(tenant_id, 0, 0)
    return counts


@dataclass(frozen=True)
class BusyTenants:
    """The tenants with jobs queued or running, busiest first (most queued, then most running),
    at most the number asked for; `busy`, `queued` and `running` count over all of them."""

    tenants: list[QueueCounts]
    busy: int
    queued: int
    running: int


# The totals are window aggregates over every busy row, taken before the LIMIT cuts the list:
# one pass over the tenants' rows (never the jobs), one sort of the busy ones.
_BUSIEST = """
    SELECT tenant_id, queued, running, count(*) OVER () AS busy,
           sum(queued) OVER () AS all_queued, sum(running) OVER () AS all_running
    FROM tenant_queue_stats
    WHERE (queued > 0 OR running > 0) {scope}
    ORDER BY queued DESC, running DESC, tenant_id
    LIMIT :limit
"""


def busiest_tenants(conn: Connection, limit: int, tenant_id: str | None = None) -> BusyTenants:
    """The `limit` busiest tenants (or only `tenant_id`, when it is busy) and the totals."""
    scope = "" if tenant_id is None else "AND tenant_id = :tenant"
    rows = conn.execute(
        text(_BUSIEST.format(scope=scope)), {"limit": limit, "tenant": tenant_id}
    ).all()
    first = rows[0] if rows else None
    return BusyTenants(
        tenants=[QueueCounts(r.tenant_id, r.queued, r.running) for r in rows],
        busy=int(first.busy) if first else 0,
        queued=int(first.all_queued) if first else 0,
        running=int(first.all_running) if first else 0,
    )


@dataclass(frozen=True)
class JobCounts:
    """Every tenant's jobs together: how many stand in each status, and the leases lost with
    their trainer over all of them (what the reaper handed back or failed)."""

    by_status: dict[JobStatus, int]
    interruptions: int


# Summed off one row per tenant; only the jobs still validating (a few, waiting for their
# dataset's check) and the paused ones (a few, waiting for someone) are counted, off
# `ix_jobs_status`. The statuses are literals, so that a prepared (generic) plan still sees how
# few rows they name.
_JOB_COUNTS = text(
    f"""
    SELECT (SELECT count(*) FROM jobs WHERE status = '{JobStatus.VALIDATING_FILES}') AS validating,
           (SELECT count(*) FROM jobs WHERE status = '{JobStatus.PAUSED}') AS paused,
           coalesce(sum(queued), 0) AS queued, coalesce(sum(running), 0) AS active,
           coalesce(sum(cancelling), 0) AS cancelling, coalesce(sum(succeeded), 0) AS succeeded,
           coalesce(sum(failed), 0) AS failed, coalesce(sum(cancelled), 0) AS cancelled,
           coalesce(sum(interruptions), 0) AS interruptions
    FROM tenant_queue_stats
    """
)


def job_counts(conn: Connection) -> JobCounts:
    """Jobs by status over the whole platform, summed off one row per tenant: its cost follows
    the tenants (and the jobs waiting for validation), not the jobs they ever ran."""
    row = conn.execute(_JOB_COUNTS).one()
    return JobCounts(
        by_status={
            JobStatus.VALIDATING_FILES: int(row.validating),
            JobStatus.QUEUED: int(row.queued),
            JobStatus.RUNNING: int(row.active) - int(row.cancelling),
            JobStatus.CANCELLING: int(row.cancelling),
            JobStatus.PAUSED: int(row.paused),
            JobStatus.SUCCEEDED: int(row.succeeded),
            JobStatus.FAILED: int(row.failed),
            JobStatus.CANCELLED: int(row.cancelled),
        },
        interruptions=int(row.interruptions),
    )


@dataclass(frozen=True)
class BaseQueue:
    """One base model's waiting jobs: how many, and how long the oldest of them has existed
    (by the database's clock)."""

    base_name: str
    queued: int
    oldest_age_seconds: float


# The lines' queued counts summed by base (one row per tenant and base), and each base's oldest
# queued job read as the first entry of `ix_jobs_queued_base`: never a pass over the backlog.
_BASE_QUEUES = text(
    f"""
    SELECT b.name, sum(d.queued) AS queued,
           extract(epoch FROM now() - min(o.oldest)) AS age
    FROM (
        SELECT base_model_id, sum(queued) AS queued FROM queue_heads
        GROUP BY base_model_id HAVING sum(queued) > 0
    ) d
    JOIN base_models b ON b.id = d.base_model_id
    CROSS JOIN LATERAL (
        SELECT j.created_at AS oldest FROM jobs j
        WHERE j.base_model_id = d.base_model_id AND j.status = '{JobStatus.QUEUED}'
        ORDER BY j.created_at LIMIT 1
    ) o
    GROUP BY b.name
    ORDER BY b.name
    """
)


def base_queues(conn: Connection) -> list[BaseQueue]:
    """Every base with jobs waiting (backing off included), by name: its queued count and its
    oldest queued job's age. One row read per queue line and an index probe per base."""
    return [
        BaseQueue(row.name, int(row.queued), float(row.age)) for row in conn.execute(_BASE_QUEUES)
    ]


# Each tenant's counts and each line's head recounted from `jobs` (every job: a full pass), what
# the triggers keep; `last_started_at` is what `repair` serves a tenant that lost its row from.
_TRUTH = """
        SELECT t.id AS tenant_id,
               count(j.id) FILTER (WHERE j.status = :queued) AS queued,
               count(j.id) FILTER (WHERE j.status = ANY(:active)) AS running,
               count(j.id) FILTER (WHERE j.status = :cancelling) AS cancelling,
               count(j.id) FILTER (WHERE j.status = :succeeded) AS succeeded,
               count(j.id) FILTER (WHERE j.status = :failed) AS failed,
               count(j.id) FILTER (WHERE j.status = :cancelled) AS cancelled,
               coalesce(sum(j.interruptions), 0) AS interruptions,
               max(j.started_at) AS last_started_at
        FROM tenants t LEFT JOIN jobs j ON j.tenant_id = t.id
        GROUP BY t.id"""
_HEADS = """
        SELECT DISTINCT ON (tenant_id, base_model_id) tenant_id, base_model_id,
               count(*) OVER (PARTITION BY tenant_id, base_model_id) AS queued,
               priority, created_at, id
        FROM jobs WHERE status = :queued
        ORDER BY tenant_id, base_model_id, priority DESC, created_at, id"""
_RECOUNT = f"truth AS ({_TRUTH}), heads AS ({_HEADS})"
# The same, counted once into temporary tables by `repair` while it holds `jobs` still: its
# check, its writes and its check again read them instead of three more passes over the jobs.
_KEPT_TABLES = (
    ("truth", "pg_temp.loraforge_recount_truth", _TRUTH),
    ("heads", "pg_temp.loraforge_recount_heads", _HEADS),
)
_KEPT = ", ".join(f"{name} AS (SELECT * FROM {table})" for name, table, _ in _KEPT_TABLES)

# Each tenant's running limit as its lines hold it: its own, else the default they are flagged
# against (revision 0013; none while that default is unset).
_LIMITS = """
        SELECT t.id AS tenant_id,
               coalesce(t.max_running_jobs, d.default_max_running, 2147483647) AS max_running
        FROM tenants t LEFT JOIN queue_settings d ON true"""

_DRIFT_ROWS = f"""
    SELECT 'tenant ' || t.tenant_id || ': queued, running, cancelling, succeeded, failed, '
           || 'cancelled, interruptions '
           || CASE WHEN s.tenant_id IS NULL THEN 'no row'
                   ELSE concat_ws(', ', s.queued, s.running, s.cancelling, s.succeeded, s.failed,
                                  s.cancelled, s.interruptions) END
           || '; jobs say ' || concat_ws(', ', t.queued, t.running, t.cancelling, t.succeeded,
                                         t.failed, t.cancelled, t.interruptions)
    FROM truth t LEFT JOIN tenant_queue_stats s ON s.tenant_id = t.tenant_id
    WHERE (coalesce(s.queued, 0), coalesce(s.running, 0), coalesce(s.cancelling, 0),
           coalesce(s.succeeded, 0), coalesce(s.failed, 0), coalesce(s.cancelled, 0),
           coalesce(s.interruptions, 0))
          <> (t.queued, t.running, t.cancelling, t.succeeded, t.failed, t.cancelled,
              t.interruptions)
    UNION ALL
    SELECT 'line ' || coalesce(h.tenant_id, q.tenant_id) || '/'
           || coalesce(h.base_model_id, q.base_model_id) || ': queued '
           || coalesce(h.queued, 0) || ' head ' || coalesce(h.head_id, '-')
           || ', jobs say ' || coalesce(q.queued, 0) || ' head ' || coalesce(q.id, '-')
    FROM queue_heads h
    FULL JOIN heads q ON q.tenant_id = h.tenant_id AND q.base_model_id = h.base_model_id
    WHERE coalesce(h.queued, 0) <> coalesce(q.queued, 0)
       OR (h.top_priority, h.head_created_at, h.head_id)
          IS DISTINCT FROM (q.priority, q.created_at, q.id)
    UNION ALL
    SELECT 'line ' || h.tenant_id || '/' || h.base_model_id || ': running ' || h.running
           || ' served ' || coalesce(h.last_served_at::text, 'never') || ', its tenant says '
           || s.running || ' and ' || coalesce(s.last_served_at::text, 'never')
    FROM queue_heads h JOIN tenant_queue_stats s ON s.tenant_id = h.tenant_id
    WHERE (h.running, h.last_served_at) IS DISTINCT FROM (s.running, s.last_served_at)
    UNION ALL
    SELECT 'line ' || h.tenant_id || '/' || h.base_model_id || ': running limit '
           || h.max_running || ', its tenant''s is ' || l.max_running
    FROM queue_heads h JOIN ({_LIMITS}) l ON l.tenant_id = h.tenant_id
    WHERE h.max_running <> l.max_running
"""
_DRIFT = text(f"WITH {_RECOUNT} {_DRIFT_ROWS}")
_DRIFT_KEPT = text(f"WITH {_KEPT} {_DRIFT_ROWS}")


_COUNTED = ("queued", "running", "cancelling", "succeeded", "failed", "cancelled", "interruptions")

# Every tenant's row set to its recount; a row is written only where it differs, and created
# only for a tenant with something to count (as the triggers create it), served when its latest
# job started (the served time is kept nowhere else).
_REPAIR_COUNTS = text(
    f"""
    WITH {_KEPT}
    INSERT INTO tenant_queue_stats AS s (tenant_id, {", ".join(_COUNTED)}, last_served_at)
    SELECT tenant_id, {", ".join(_COUNTED)}, last_started_at FROM truth t
    WHERE ({", ".join(_COUNTED)}) <> (0, 0, 0, 0, 0, 0, 0)
       OR EXISTS (SELECT 1 FROM tenant_queue_stats e WHERE e.tenant_id = t.tenant_id)
    ON CONFLICT (tenant_id) DO UPDATE
       SET {", ".join(f"{c} = EXCLUDED.{c}" for c in _COUNTED)}
     WHERE ({", ".join(f"s.{c}" for c in _COUNTED)})
           <> ({", ".join(f"EXCLUDED.{c}" for c in _COUNTED)})
    """
)

_LINE = (
    "queued",
    "top_priority",
    "head_created_at",
    "head_id",
    "running",
    "last_served_at",
    "max_running",
)

# Every line set to its recount beside its tenant's (repaired) running count and served time: a
# line with nothing queued keeps its row with no head, as the triggers leave it.
_REPAIR_LINES = text(
    f"""
    WITH {_KEPT},
    wanted AS (
        SELECT coalesce(q.tenant_id, h.tenant_id) AS tenant_id,
               coalesce(q.base_model_id, h.base_model_id) AS base_model_id,
               coalesce(q.queued, 0) AS queued, q.priority, q.created_at, q.id
        FROM heads q
        FULL JOIN queue_heads h ON h.tenant_id = q.tenant_id AND h.base_model_id = q.base_model_id
    )
    INSERT INTO queue_heads AS h (tenant_id, base_model_id, {", ".join(_LINE)})
    SELECT w.tenant_id, w.base_model_id, w.queued, w.priority, w.created_at, w.id,
           coalesce(s.running, 0), s.last_served_at, l.max_running
    FROM wanted w LEFT JOIN tenant_queue_stats s ON s.tenant_id = w.tenant_id
    JOIN ({_LIMITS}) l ON l.tenant_id = w.tenant_id
    ON CONFLICT (tenant_id, base_model_id) DO UPDATE
       SET {", ".join(f"{c} = EXCLUDED.{c}" for c in _LINE)}
     WHERE ({", ".join(f"h.{c}" for c in _LINE)})
           IS DISTINCT FROM ({", ".join(f"EXCLUDED.{c}" for c in _LINE)})
    """
)


def _recount_params() -> dict[str, object]:
    params: dict[str, object] = {status.name.lower(): status.value for status in JobStatus}
    params["active"] = as_values(ACTIVE)
    return params


def default_limit(conn: Connection) -> int | None:
    """The default running limit the queue's lines are flagged against (revision 0013), or None
    before any claim set one."""
    value = conn.execute(text("SELECT default_max_running FROM queue_settings")).scalar()
    return None if value is None else int(value)


def drift(conn: Connection) -> list[str]:
    """Every bookkeeping row that disagrees with a recount from `jobs` (empty when exact).
    Scans every job: a check for tests and for an operator in doubt, not for a hot path."""
    return [str(line) for line in conn.execute(_DRIFT, _recount_params()).scalars()]


class QueueBusyError(Exception):
    """A repair could not lock the table it recounts from in time: a transaction that writes
    it holds it."""


def hold_still(conn: Connection, table: str, lock_timeout_seconds: float) -> None:
    """Lock `table` in SHARE mode for the rest of `conn`'s transaction: its writers wait, its
    readers do not. QueueBusyError, and nothing locked, when a transaction writing it holds it
    past `lock_timeout_seconds` (every later writer would then queue behind this one)."""
    conn.execute(text(f"SET LOCAL lock_timeout = '{max(1, round(lock_timeout_seconds * 1000))}ms'"))
    try:
        conn.execute(text(f"LOCK TABLE {table} IN SHARE MODE"))
    except sqlalchemy.exc.OperationalError as exc:
        if getattr(exc.orig, "sqlstate", None) != _LOCK_NOT_AVAILABLE:
            raise
        raise QueueBusyError(
            f"{table} is held by a transaction that writes it (no lock within "
            f"{lock_timeout_seconds:g} s); nothing was written. Retry, or find the transaction "
            "in pg_stat_activity (pg_blocking_pids)"
        ) from exc


def repair(conn: Connection, *, lock_timeout_seconds: float = 5.0) -> list[str]:
    """Set the bookkeeping back to a recount from `jobs` where it drifted (writes that went
    around the triggers: `pg_restore --disable-triggers`, a logical replica's apply, a manual
    `session_replication_role = replica`) and return what it corrected (`drift`'s lines; empty,
    and nothing written, when exact). Runs in `conn`'s transaction, which the caller commits.

    Every writer of jobs waits while it runs: `jobs` is locked in SHARE mode, so no claim,
    finish, heartbeat or submission moves a job between the recount and the writes (one pass
    over `jobs`, kept in temporary tables for the check, the writes and the check again). A
    lock not granted within `lock_timeout_seconds` (a long transaction writing jobs, which
    every later writer would then queue behind this one) raises QueueBusyError and writes
    nothing. The repaired bookkeeping is checked again before it
    returns; a recount that still disagrees raises RuntimeError (the transaction must roll
    back)."""
    hold_still(conn, "jobs", lock_timeout_seconds)
    params = _recount_params()
    for _, table, recount in _KEPT_TABLES:
        conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
        conn.execute(text(f"CREATE TEMPORARY TABLE {table} ON COMMIT DROP AS {recount}"), params)
        conn.execute(text(f"ANALYZE {table}"))
    found = [str(line) for line in conn.execute(_DRIFT_KEPT).scalars()]
    if found:
        conn.execute(_REPAIR_COUNTS)
        conn.execute(_REPAIR_LINES)
        left = [str(line) for line in conn.execute(_DRIFT_KEPT).scalars()]
        if left:
            raise RuntimeError("the repaired bookkeeping still disagrees: " + "; ".join(left))
    return found
