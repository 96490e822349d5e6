"""A claim past thousands of tenants at their running limit (revision 0013).

    python -m benchmarks.queue_limits [--queued 100000] [--at-limit 5000] [--cycles 300]
        [--database-url URL]

A backlog of `--queued` jobs over 1,000 tenants (the default limit of 4, one tenant holding
half, as `python -m benchmarks.queue --scale` fills it); then `--at-limit` free-tier tenants
(a limit of 1) each holding its one running job with a job of priority 1 queued: every line of
theirs ranks ahead of the backlog's, and none may be claimed. One JSON line per measurement:

- `claim_past_tenants_at_limit`: claim + complete latency (one claimer) with those tenants in
  the queue, against the same claim on the same backlog before they were added;
- `walk_past_tenants_at_limit`: the walk of the lines that the claim starts with (the first 9
  lines whose tenant has room), against the walk before revision 0013 (each line's limit read
  off `tenants`, over the index without the flag, built in a transaction rolled back after),
  each with the rows of `queue_heads` its plan read (EXPLAIN ANALYZE).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from sqlalchemy import Engine, text

from benchmarks.queue import (
    SCALE_LIMIT,
    add_database_url_argument,
    admin_server,
    bench_database,
    emit_beside,
    machine_description,
    make_base,
    make_file_row,
    make_tenant,
    percentile,
    progress,
)
from control_plane import db
from control_plane.queue import _WALK, CLAIM_FRONT_LINES, JobQueue

TENANTS = 1000

# The walk as it was before revision 0013, and the index it walked.
_OLD_WALK = f"""
    SELECT h.tenant_id, h.base_model_id, h.top_priority, h.running, h.last_served_at,
           h.head_created_at, h.head_id
    FROM queue_heads h JOIN tenants t ON t.id = h.tenant_id
    WHERE h.queued > 0 AND h.running < coalesce(t.max_running_jobs, :default_limit)
      AND h.tenant_id <> ALL(CAST(:excluded AS text[]))
    ORDER BY h.top_priority DESC, h.running, h.last_served_at NULLS FIRST, h.head_created_at,
             h.head_id
    LIMIT {CLAIM_FRONT_LINES + 1}
"""
_OLD_INDEX = (
    "CREATE INDEX ix_bench_old_front ON queue_heads (top_priority DESC, running, "
    "last_served_at NULLS FIRST, head_created_at, head_id) WHERE queued > 0"
)

# `n` tenants named `prefix`-N, then `running` jobs held and `queued` jobs waiting for each
# (`share` of the queued ones for the first tenant when it is given), interleaved by age.
_TENANTS = """
    INSERT INTO tenants (id, name, max_running_jobs)
    SELECT 'tenant-' || :prefix || '-' || g, :prefix || '-' || g, CAST(:limit AS int)
    FROM generate_series(1, :n) AS g
"""
_JOBS = """
    INSERT INTO jobs (id, tenant_id, status, base_model_id, training_file_id, hyperparameters,
                      priority, created_at, run_after, attempt, lease_owner, lease_expires_at,
                      started_at)
    SELECT 'ftjob-' || :prefix || '-' || g, 'tenant-' || :prefix || '-' || t,
           CASE WHEN g <= :running_jobs THEN 'running' ELSE 'queued' END, :base, :file,
           '{}'::jsonb, :priority, now() - interval '1 day' + g * interval '1 ms',
           now() - interval '1 day', (g <= :running_jobs)::int,
           CASE WHEN g <= :running_jobs THEN 'holder' END,
           CASE WHEN g <= :running_jobs THEN now() + interval '1 day' END,
           CASE WHEN g <= :running_jobs THEN now() END
    FROM generate_series(1, :jobs) AS g
    CROSS JOIN LATERAL (SELECT CASE
        WHEN g <= :running_jobs THEN g
        WHEN :half AND g % 2 = 0 THEN 1
        ELSE 1 + g % :n END AS t) AS owner
"""


def _add(engine: Engine, prefix: str, n: int, limit: int | None, jobs: dict[str, Any]) -> None:
    with engine.begin() as conn:
        conn.execute(text(_TENANTS), {"prefix": prefix, "n": n, "limit": limit})
        conn.execute(text(_JOBS), {"prefix": prefix, "n": n, **jobs})
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("VACUUM ANALYZE"))


def _cycles(queue: JobQueue, cycles: int) -> list[float]:
    latencies = []
    for _ in range(cycles):
        t0 = time.perf_counter()
        job = queue.claim("bench")
        if job is None or job.priority != 0:
            raise RuntimeError(f"claimed {job}: a tenant at its limit, or nothing")
        queue.complete(job.id, "bench")
        latencies.append((time.perf_counter() - t0) * 1000)
    return latencies


def _rows_read(plan: dict[str, Any], relation: str) -> int:
    own = 0
    if plan.get("Relation Name") == relation:
        own = int(plan.get("Actual Rows", 0)) * int(plan.get("Actual Loops", 1))
        own += int(plan.get("Rows Removed by Filter", 0))
    return own + sum(_rows_read(child, relation) for child in plan.get("Plans", []))


def _walk(conn: Any, statement: str, params: dict[str, Any]) -> tuple[float, int]:
    """The statement's median ms over 30 runs, and the queue_heads rows its plan read."""
    for _ in range(5):
        conn.execute(text(statement), params).all()
    times = []
    for _ in range(30):
        t0 = time.perf_counter()
        conn.execute(text(statement), params).all()
        times.append((time.perf_counter() - t0) * 1000)
    plan = conn.execute(text("EXPLAIN (ANALYZE, FORMAT JSON) " + statement), params).scalar_one()
    return percentile(times, 50), _rows_read(plan[0]["Plan"], "queue_heads")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.queue_limits", description=__doc__)
    parser.add_argument("--queued", type=int, default=100_000, help="the backlog's jobs")
    parser.add_argument("--at-limit", type=int, default=5000, help="tenants at their limit")
    parser.add_argument("--cycles", type=int, default=300, help="claim + complete cycles")
    add_database_url_argument(parser)
    args = parser.parse_args(argv)
    if args.queued < 2 * args.cycles or args.at_limit < 1 or args.cycles < 10:
        parser.error("--queued at least twice --cycles; --at-limit at least 1; --cycles 10")
    with admin_server(args.database_url) as admin_url, bench_database(admin_url) as url:
        engine = db.make_engine(url, pool_size=2)
        machine = machine_description(engine)
        base = make_base(engine, "bench-base")
        file_id = make_file_row(engine, make_tenant(engine, "home"))
        progress(f"filling {args.queued} jobs over {TENANTS} tenants; {machine}")
        _add(engine, "backlog", TENANTS, None, _jobs(base, file_id, args.queued, 0, half=True))
        queue = JobQueue(engine, max_running_per_tenant=SCALE_LIMIT)
        _cycles(queue, 30)
        before = _cycles(queue, args.cycles)
        progress(f"adding {args.at_limit} tenants at their limit")
        at_limit = _jobs(base, file_id, 2 * args.at_limit, args.at_limit, priority=1)
        _add(engine, "full", args.at_limit, 1, at_limit)
        _cycles(queue, 30)
        after = _cycles(queue, args.cycles)
        emit_beside(
            "claim_past_tenants_at_limit",
            percentile(after, 50),
            "the same claim on the same backlog before the tenants at their limit were added",
            percentile(before, 50),
            machine,
            queued=args.queued,
            tenants_at_limit=args.at_limit,
            p99_ms=round(percentile(after, 99), 3),
            baseline_p99_ms=round(percentile(before, 99), 3),
            cycles=args.cycles,
        )
        params = {"default_limit": SCALE_LIMIT, "excluded": [], "prefer": None}
        new_walk = _WALK.format(only="", first="", lines=CLAIM_FRONT_LINES + 1)
        with engine.connect() as conn, conn.begin() as transaction:
            ours, our_rows = _walk(conn, new_walk, params)
            conn.execute(text(_OLD_INDEX))
            conn.execute(text("ANALYZE queue_heads"))
            old, old_rows = _walk(conn, _OLD_WALK, params)
            transaction.rollback()
        emit_beside(
            "walk_past_tenants_at_limit",
            ours,
            "the walk before revision 0013: each line's limit read off tenants, over the index "
            "without the flag (built in a rolled-back transaction)",
            old,
            machine,
            queued=args.queued,
            tenants_at_limit=args.at_limit,
            queue_heads_rows_read=our_rows,
            baseline_queue_heads_rows_read=old_rows,
        )
        engine.dispose()
    progress("done")
    return 0


def _jobs(
    base: str, file_id: str, jobs: int, running: int, *, priority: int = 0, half: bool = False
) -> dict[str, Any]:
    """`_JOBS`'s parameters: `jobs` in all, the first `running` of them held (one per tenant)."""
    return {
        "base": base,
        "file": file_id,
        "jobs": jobs,
        "running_jobs": running,
        "priority": priority,
        "half": half,
    }


if __name__ == "__main__":
    sys.exit(main())
