"""The queue's bookkeeping, read: each tenant's queued and running jobs without counting jobs.

Revision 0006's triggers on `jobs` keep `tenant_queue_stats` (a tenant's counts and when it was
last served) and `queue_heads` (each (tenant, base) line's head) exact in the statement that
moves a job, whoever writes it; the claim reads them instead of ranking the backlog, and the
dashboard reads the counts here at one row per tenant whatever the backlog. `drift` recounts
everything from `jobs` and names each row that disagrees: the check that the triggers hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from sqlalchemy import Connection, Table, select, text

from control_plane.db.tables import TenantQueueStats
from control_plane.job_status import ACTIVE, JobStatus, as_values

stats = cast(Table, TenantQueueStats.__table__)


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


_DRIFT = text(
    """
    WITH truth AS (
        SELECT t.id AS tenant_id,
               count(j.id) FILTER (WHERE j.status = :queued) AS queued,
               count(j.id) FILTER (WHERE j.status = ANY(:active)) AS running
        FROM tenants t LEFT JOIN jobs j ON j.tenant_id = t.id
        GROUP BY t.id
    ),
    heads AS (
        SELECT DISTINCT ON (tenant_id, base_model_id) tenant_id, base_model_id,
               count(*) OVER (PARTITION BY tenant_id, base_model_id) AS queued,
               priority, created_at, id
        FROM jobs WHERE status = :queued
        ORDER BY tenant_id, base_model_id, priority DESC, created_at, id
    )
    SELECT 'tenant ' || t.tenant_id || ': queued ' || coalesce(s.queued, 0) || ' running '
           || coalesce(s.running, 0) || ', jobs say ' || t.queued || ' and ' || t.running
    FROM truth t LEFT JOIN tenant_queue_stats s ON s.tenant_id = t.tenant_id
    WHERE (coalesce(s.queued, 0), coalesce(s.running, 0)) <> (t.queued, t.running)
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
    """
)


def drift(conn: Connection) -> list[str]:
    """Every bookkeeping row that disagrees with a recount from `jobs` (empty when exact).
    Scans every job: a check for tests and for an operator in doubt, not for a hot path."""
    params = {"queued": JobStatus.QUEUED.value, "active": as_values(ACTIVE)}
    return [str(line) for line in conn.execute(_DRIFT, params).scalars()]
