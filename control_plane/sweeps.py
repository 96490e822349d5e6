"""Cancelling a tenant's jobs by their metadata: a sweep of thousands in one request.

A platform's tenants queue sweeps (a grid of learning rates, one job per point) and tag them
with OpenAI's job `metadata`; a sweep started by mistake, or one whose answer is already known,
must stop without one request per job. `cancel_matching` cancels every unfinished job of one
tenant whose metadata holds every given pair, as `JobQueue.request_cancel` cancels one: a job
not yet running (validating, queued, paused) is `cancelled` at once; a running one is
`cancelling`, its trainer told (NOTIFY on the cancel channel, and its next heartbeat). Each job
gets the event that a single cancel writes.

The jobs move in batches of `batch`, each its own transaction, in the order of the tenant's
`(created_at, id)` index. Every job that moves updates its tenant's bookkeeping row (the
queue's triggers), and a row updated many times in one transaction walks its versions at each
update, so one statement over a 50,000-job sweep would cost the square of its size. A job a
claim holds meanwhile is waited for (not skipped), so none escapes into `running` uncancelled;
a job whose state changed while waited for is passed over, and a last pass from the start picks
up anything a batch passed over that still matches.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, text

from control_plane.job_status import UNFINISHED, WAITING, JobStatus, as_values
from control_plane.queue import CANCEL_CHANNEL

DEFAULT_BATCH = 100

_CANCEL_BATCH = text(
    """
    WITH picked AS (
        SELECT id, created_at FROM jobs
        WHERE tenant_id = :tenant
          AND (created_at, id) > (CAST(:after_created AS timestamptz), :after_id)
          AND status = ANY(:unfinished) AND NOT cancel_requested
          AND user_metadata @> CAST(:metadata AS jsonb)
        ORDER BY created_at, id
        LIMIT :batch
        FOR UPDATE
    ), moved AS (
        UPDATE jobs j SET
          status = CASE WHEN j.status = ANY(:waiting) THEN :cancelled ELSE :cancelling END,
          finished_at = CASE WHEN j.status = ANY(:waiting) THEN now() END,
          cancel_requested = true
        FROM picked
        WHERE j.id = picked.id
        RETURNING j.id, j.status
    ), noted AS (
        INSERT INTO job_events (job_id, message, type, level, data)
        SELECT id,
               CASE WHEN status = :cancelled THEN 'Job cancelled' ELSE 'Cancellation requested' END,
               'message', 'info', jsonb_build_object('status', status)
        FROM moved
    )
    SELECT (SELECT count(*) FROM moved WHERE status = :cancelled) AS cancelled,
           (SELECT coalesce(array_agg(id), '{}') FROM moved WHERE status = :cancelling)
             AS cancelling,
           (SELECT max(created_at) FROM picked) AS last_created,
           (SELECT max(id) FROM picked
            WHERE created_at = (SELECT max(created_at) FROM picked)) AS last_id
    """
)

_TELL_TRAINERS = text("SELECT pg_notify(:channel, id) FROM unnest(CAST(:ids AS text[])) AS id")

_START = ("-infinity", "")


@dataclass(frozen=True)
class SweepCancelled:
    """What a bulk cancel moved: jobs cancelled at once, and running jobs asked to stop."""

    cancelled: int
    cancelling: int

    @property
    def total(self) -> int:
        return self.cancelled + self.cancelling


def cancel_matching(
    engine: Engine, tenant_id: str, metadata: dict[str, str], *, batch: int = DEFAULT_BATCH
) -> SweepCancelled:
    """Cancel every unfinished job of `tenant_id` whose metadata holds every pair of
    `metadata` (at least one pair: an empty selector would be every job of the tenant)."""
    if not metadata:
        raise ValueError("name at least one metadata pair to select the jobs to cancel")
    if batch < 1:
        raise ValueError("batch must be at least 1")
    cancelled = cancelling = 0
    after: tuple[datetime | str, str] = _START
    while True:
        with engine.begin() as conn:
            row = conn.execute(
                _CANCEL_BATCH,
                {
                    "tenant": tenant_id,
                    "metadata": json.dumps(metadata),
                    "after_created": after[0],
                    "after_id": after[1],
                    "batch": batch,
                    "unfinished": as_values(UNFINISHED),
                    "waiting": as_values(WAITING),
                    "cancelled": JobStatus.CANCELLED.value,
                    "cancelling": JobStatus.CANCELLING.value,
                },
            ).one()
            if row.cancelling:  # their trainers hear it when this batch commits
                conn.execute(_TELL_TRAINERS, {"channel": CANCEL_CHANNEL, "ids": row.cancelling})
        cancelled += row.cancelled
        cancelling += len(row.cancelling)
        if row.last_created is not None:
            after = (row.last_created, row.last_id)
            continue
        if after == _START:
            return SweepCancelled(cancelled, cancelling)
        # The end of the index: one more pass from the start for what a batch passed over.
        after = _START
