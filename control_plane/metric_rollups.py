"""The loss chart's sums (revision 0015's `job_metric_rollups`): checked against the events they
sum, and summed again where they drifted.

A row trigger on `job_events` adds each metric event to its job's buckets as it is inserted, so
the job page's chart reads at most a thousand rows however long the run
(`dashboard.queries.loss_curves`). The sums are derived data, and like the queue's bookkeeping
(`queue_stats`) a write that goes around the trigger leaves them behind: events restored or
applied with triggers off (a data-only `pg_restore --disable-triggers` of `job_events` without
`job_metric_rollups`, a logical replica's apply, `session_replication_role = replica`) are not
summed, so the chart misses them or, under a thousand points, counts them wrong; a data-only
restore of both tables with triggers on sums the restored events on top of the restored sums.
`drift` names each job whose sums disagree with its events; `repair` sums those jobs again
(`loraforge queue check` and `loraforge queue repair`).
"""

from __future__ import annotations

from sqlalchemy import Connection, text

from control_plane.queue_stats import hold_still

ROLLUP_WIDTHS = tuple(2**k for k in range(1, 17))
"""The bucket widths, in steps, that revision 0015's trigger sums each metric event into."""

# Loss sums added one event at a time and summed at once differ in their last bits: a sum
# drifted when it is off by more than this share of the events' own.
_TOLERANCE = 1e-9

# Per job, what its events say (`told`: its points, as revision 0015 counts them: a numeric step
# and a numeric loss) beside what each bucket width's rows sum to (`kept`); every width must
# hold every point, the same loss totals and the same first and last step. One line per job
# that disagrees, at its narrowest width that does. `:jobs` (NULL: every job) narrows both to
# some jobs.
_DRIFT = text(
    f"""
    WITH points AS (
        SELECT e.job_id, (e.data ->> 'step')::float8 AS step,
               CASE WHEN jsonb_typeof(e.data -> 'train_loss') = 'number'
                    THEN (e.data ->> 'train_loss')::float8 END AS train,
               CASE WHEN jsonb_typeof(e.data -> 'eval_loss') = 'number'
                    THEN (e.data ->> 'eval_loss')::float8 END AS eval
        FROM job_events e
        WHERE e.type = 'metrics' AND jsonb_typeof(e.data -> 'step') = 'number'
          AND (CAST(:jobs AS text[]) IS NULL OR e.job_id = ANY(CAST(:jobs AS text[])))
    ),
    per_job AS (
        SELECT job_id, count(train) AS train_points, count(eval) AS eval_points,
               coalesce(sum(train), 0) AS train_losses, coalesce(sum(eval), 0) AS eval_losses,
               min(step) AS first_step, max(step) AS last_step
        FROM points
        WHERE train IS NOT NULL OR eval IS NOT NULL
        GROUP BY job_id
    ),
    told AS (SELECT * FROM per_job CROSS JOIN unnest(CAST(:widths AS int[])) AS width),
    kept AS (
        SELECT job_id, width, sum(train_points) AS train_points, sum(eval_points) AS eval_points,
               sum(train_losses) AS train_losses, sum(eval_losses) AS eval_losses,
               min(first_step) AS first_step, max(last_step) AS last_step
        FROM job_metric_rollups
        WHERE CAST(:jobs AS text[]) IS NULL OR job_id = ANY(CAST(:jobs AS text[]))
        GROUP BY job_id, width
    ),
    paired AS (
        SELECT coalesce(t.job_id, k.job_id) AS job_id, coalesce(t.width, k.width) AS width,
               coalesce(k.train_points, 0) AS k_train, coalesce(k.eval_points, 0) AS k_eval,
               coalesce(k.train_losses, 0) AS k_train_losses,
               coalesce(k.eval_losses, 0) AS k_eval_losses,
               coalesce(t.train_points, 0) AS t_train, coalesce(t.eval_points, 0) AS t_eval,
               coalesce(t.train_losses, 0) AS t_train_losses,
               coalesce(t.eval_losses, 0) AS t_eval_losses,
               (k.first_step, k.last_step) IS DISTINCT FROM (t.first_step, t.last_step)
                   AS steps_differ
        FROM told t FULL JOIN kept k ON k.job_id = t.job_id AND k.width = t.width
    )
    SELECT DISTINCT ON (job_id) job_id,
           'metrics of job ' || job_id || ': its loss chart''s ' || width || '-step buckets sum '
           || k_train || ' train points (losses ' || round(k_train_losses::numeric, 6)
           || ') and ' || k_eval || ' eval points (losses ' || round(k_eval_losses::numeric, 6)
           || '), its events ' || t_train || ' (' || round(t_train_losses::numeric, 6)
           || ') and ' || t_eval || ' (' || round(t_eval_losses::numeric, 6) || ')' AS line
    FROM paired
    WHERE (k_train, k_eval) <> (t_train, t_eval) OR steps_differ
       OR abs(k_train_losses - t_train_losses) > {_TOLERANCE} * greatest(1, abs(t_train_losses))
       OR abs(k_eval_losses - t_eval_losses) > {_TOLERANCE} * greatest(1, abs(t_eval_losses))
    ORDER BY job_id, width
    """
)


def _drifted(conn: Connection, jobs: list[str] | None = None) -> list[tuple[str, str]]:
    rows = conn.execute(_DRIFT, {"jobs": jobs, "widths": list(ROLLUP_WIDTHS)})
    return [(str(row.job_id), str(row.line)) for row in rows]


def drift(conn: Connection) -> list[str]:
    """A line for each job whose loss-chart sums disagree with its metric events (empty when
    exact). Reads every metric event on the platform: a check for an operator in doubt."""
    return [line for _, line in _drifted(conn)]


def repair(conn: Connection, *, lock_timeout_seconds: float = 5.0) -> list[str]:
    """Sum again, from their events, the jobs whose sums drifted (`drift`'s lines; empty, and
    nothing locked or written, when none did). Runs in `conn`'s transaction, which the caller
    commits.

    The events are read once without a lock to find those jobs; then `job_events` is locked in
    SHARE mode (every event's insert waits: a claim's, a finish's, a trainer's metrics) only
    while those jobs are checked again and summed again, so no event of theirs is inserted
    between the two. A lock not granted within `lock_timeout_seconds` raises QueueBusyError and
    writes nothing; sums that still disagree after it raise RuntimeError (roll back)."""
    suspects = [job for job, _ in _drifted(conn)]
    if not suspects:
        return []
    hold_still(conn, "job_events", lock_timeout_seconds)
    found = _drifted(conn, suspects)
    for job, _ in found:
        conn.execute(text("SELECT job_metric_rollups_rebuild(:job)"), {"job": job})
    left = _drifted(conn, suspects)
    if left:
        raise RuntimeError(
            "the loss-chart sums still disagree: " + "; ".join(line for _, line in left)
        )
    return [line for _, line in found]
