"""What the live streams compare from one look to the next, read for all of them at once.

A job's *version* is its row's version (`xmin`: a new one at every update of the row, a
heartbeat's included) and its newest event's id; a tenant's is its newest job and its queue
bookkeeping row's version. A stream that
follows a job, or a tenant's table of jobs, reads what it shows only once its versions moved
(`control_plane.api.stream_watch`), so one statement a tick for every stream of an API process
replaces each stream's own reads every second.

Each job's newest event is one probe of `ix_job_events_job_id_id` from its end, each tenant's
newest job one of `ix_jobs_tenant_created_id`: a look costs a few index probes a stream, whatever
the jobs and events hold.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from sqlalchemy import Connection, text

JobVersion = tuple[str, int | None]
"""A job's row version (`xmin`) and its newest event's id (None before its first)."""
TenantVersion = tuple[str | None, str | None]
"""A tenant's newest job by (created_at, id), and its queue bookkeeping row's version: a job
created in a transaction that began before the newest's but committed after it is not the
newest, and moves the tenant's row when it is queued."""


@dataclass(frozen=True)
class Look:
    """One look at the followed jobs and tenants."""

    jobs: dict[str, JobVersion]
    """The version of each followed job that exists (a job deleted is absent)."""
    newest: dict[str, TenantVersion]
    """Each followed tenant's version (`TenantVersion`)."""


_JOBS = text(
    """
    SELECT j.id, j.xmin::text AS row_version,
           (SELECT e.id FROM job_events AS e WHERE e.job_id = j.id
            ORDER BY e.job_id DESC, e.id DESC LIMIT 1) AS last_event_id
    FROM jobs AS j
    WHERE j.id = ANY(CAST(:ids AS text[]))
    """
)

_NEWEST = text(
    """
    SELECT t.id,
           (SELECT j.id FROM jobs AS j WHERE j.tenant_id = t.id
            ORDER BY j.tenant_id DESC, j.created_at DESC, j.id DESC LIMIT 1) AS newest,
           (SELECT s.xmin::text FROM tenant_queue_stats AS s WHERE s.tenant_id = t.id)
             AS stats_version
    FROM unnest(CAST(:tenants AS text[])) AS t(id)
    """
)


def look(conn: Connection, job_ids: Collection[str], tenant_ids: Collection[str]) -> Look:
    """The versions of these jobs and these tenants' newest jobs. A look only tells a stream
    when to read again, so its two statements need not share a snapshot."""
    jobs: dict[str, JobVersion] = {}
    if job_ids:
        for row in conn.execute(_JOBS, {"ids": list(job_ids)}):
            jobs[row.id] = (row.row_version, row.last_event_id)
    newest: dict[str, TenantVersion] = {}
    if tenant_ids:
        for row in conn.execute(_NEWEST, {"tenants": list(tenant_ids)}):
            newest[row.id] = (row.newest, row.stats_version)
    return Look(jobs, newest)
