"""What each tenant's fine-tuning jobs used in a window: the time its jobs held a trainer, and
the jobs that succeeded with the tokens they trained on. The platform's operators charge tenants
back from it (`GET /v1/usage`, beside the interactive sessions' usage of `control_plane.usage`).

Trainer time is read off the jobs' status changes (`job_events` whose `data` holds a
`status`): a trainer holds a job from a change into `running` or `cancelling` (`ACTIVE`) to the
job's next status change, whatever it is (succeeded, failed, handed back, paused, its lease
lost: a lost lease is held until the reaper takes it back, as the tenant's running limit counts
it). Each run is clipped to the window, so a month's report counts only that month's part of a
run that crossed its edge, and a run still going counts up to now. Every run counts, whatever it
ended in: the trainer was held. Trained tokens are those of the jobs that succeeded in the
window, counted once, when they succeeded, as fine-tuning is billed.

Nothing is written for it: jobs are never deleted and their status changes are kept, so the
report reads what the queue writes already. It reads the status changes from the window's start
on (a BRIN index on the events' time, revision 0036), and for each job seen there, or held by
a trainer now, its last change before the window (off the job's own status changes): its cost
grows with the events since the window began, not with the history before it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, text

from control_plane.job_status import ACTIVE, JobStatus, as_values


@dataclass(frozen=True)
class TenantJobUsage:
    """What one tenant's fine-tuning jobs used in a window."""

    tenant_id: str
    tenant_name: str
    trainer_seconds: float
    fine_tuning_jobs: int
    fine_tuning_trained_tokens: int


_STATUS = "(e.data -> 'status') IS NOT NULL"

_JOB_TOTALS = text(
    f"""
    WITH seen AS (
        SELECT e.job_id, e.id, e.created_at, e.data ->> 'status' AS status
        FROM job_events e
        WHERE {_STATUS} AND e.created_at >= :start
    ), held AS (
        SELECT job_id FROM seen
        UNION
        SELECT j.id FROM jobs j WHERE j.status = ANY(:active)
    ), before AS (
        SELECT h.job_id, b.id, b.created_at, b.status
        FROM held h
        CROSS JOIN LATERAL (
            SELECT e.id, e.created_at, e.data ->> 'status' AS status
            FROM job_events e
            WHERE e.job_id = h.job_id AND {_STATUS} AND e.created_at < :start
            ORDER BY e.id DESC
            LIMIT 1
        ) b
    ), runs AS (
        SELECT c.job_id, c.status, c.created_at AS at, greatest(c.created_at, :start) AS began,
               least(coalesce(lead(c.created_at) OVER (PARTITION BY c.job_id ORDER BY c.id),
                              now()), :end) AS ended
        FROM (SELECT * FROM seen UNION ALL SELECT * FROM before) c
    ), per_job AS (
        SELECT r.job_id,
               sum(greatest(extract(epoch FROM r.ended - r.began), 0))
                 FILTER (WHERE r.status = ANY(:active)) AS seconds,
               bool_or(r.status = :succeeded AND r.at >= :start AND r.at < :end) AS succeeded
        FROM runs r
        GROUP BY r.job_id
    ), per_tenant AS (
        SELECT j.tenant_id, coalesce(sum(p.seconds), 0) AS seconds,
               count(*) FILTER (WHERE p.succeeded) AS jobs,
               coalesce(sum(j.trained_tokens) FILTER (WHERE p.succeeded), 0) AS tokens
        FROM per_job p
        JOIN jobs j ON j.id = p.job_id
        GROUP BY j.tenant_id
    )
    SELECT t.id AS tenant_id, t.name AS tenant_name, pt.seconds::float8 AS trainer_seconds,
           pt.jobs AS fine_tuning_jobs, pt.tokens::bigint AS fine_tuning_trained_tokens
    FROM per_tenant pt
    JOIN tenants t ON t.id = pt.tenant_id
    WHERE pt.seconds > 0 OR pt.jobs > 0
    ORDER BY t.name
    """
)


def job_totals(
    conn: Connection,
    starting_on: datetime,
    ending_before: datetime,
) -> list[TenantJobUsage]:
    """Each tenant's fine-tuning usage in `[starting_on, ending_before)`, by tenant name;
    tenants whose jobs used nothing there are left out."""
    rows = conn.execute(
        _JOB_TOTALS,
        {
            "start": starting_on,
            "end": ending_before,
            "active": as_values(ACTIVE),
            "succeeded": JobStatus.SUCCEEDED.value,
        },
    )
    return [TenantJobUsage(**row._mapping) for row in rows]
