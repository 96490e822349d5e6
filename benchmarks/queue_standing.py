"""What reading a queued job's standing costs at platform scale (`control_plane.queue_standing`).

    python -m benchmarks.queue_standing [--queued 100000] [--reads 200] [--database-url URL]

A backlog of `--queued` jobs over 1,000 tenants (the default limit of 4, one tenant holding
half, as `python -m benchmarks.queue --scale` fills it), with 400 claims + completes run first
so that tenants differ in their served times and some run jobs. Then, one JSON line each, the
median of `--reads` reads of `standing()` beside the same answer read by ranking the whole
backlog (both window sorts over every claimable job, as the claim did before revision 0006):

- `standing_next_of_tenant`: the next job of the small tenant whose next job ranks last
  (`other_tenants`: every line before it in the front's order read, each line's first
  claimable job probed: the most this read reads);
- `standing_behind_own_jobs`: that tenant's last job (its own ~100 queued jobs counted);
- `standing_behind_a_sweep`: the last job of the tenant holding half the backlog (its own
  jobs ahead counted: this read grows with the tenant's own backlog, and only with it);
- `standing_at_depth`: the first read at `--queued` beside the same read on a backlog of 1,000
  over the same tenants.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
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
from benchmarks.queue_limits import TENANTS, _add, _jobs
from control_plane import db
from control_plane.queue import JobQueue
from control_plane.queue_standing import standing

# The standing's figures read off the whole backlog ranked: share and the tenants whose next
# job goes first, from every claimable job's position.
_RANKED = text(
    """
    WITH shares AS (
        SELECT j.id, j.tenant_id, j.priority, j.created_at, s.last_served_at,
               s.running + row_number() OVER (
                   PARTITION BY j.tenant_id ORDER BY j.priority DESC, j.created_at, j.id
               ) AS share
        FROM jobs j
        JOIN tenants t ON t.id = j.tenant_id
        JOIN tenant_queue_stats s ON s.tenant_id = j.tenant_id
        WHERE j.status = 'queued' AND j.run_after <= now()
          AND s.running < coalesce(t.max_running_jobs, :default_limit)
    ),
    ranked AS (
        SELECT id, tenant_id, share, row_number() OVER (
                   ORDER BY priority DESC, share, last_served_at NULLS FIRST, created_at, id
               ) AS position
        FROM shares
    )
    SELECT me.share,
           (SELECT count(DISTINCT r.tenant_id) FROM ranked r
             WHERE r.position < me.position AND r.tenant_id <> me.tenant_id) AS tenants_ahead
    FROM ranked me WHERE me.id = :id
    """
)

SWEEP_TENANT = "tenant-backlog-1"


def _fill(engine: Engine, queued: int) -> None:
    base = make_base(engine, "bench-base")
    file_id = make_file_row(engine, make_tenant(engine, "home"))
    _add(engine, "backlog", TENANTS, None, _jobs(base, file_id, queued, 0, half=True))
    queue = JobQueue(engine, max_running_per_tenant=SCALE_LIMIT)
    for n in range(min(400, queued // 10)):
        job = queue.claim("bench")
        assert job is not None
        if n % 4:  # every fourth stays running
            queue.complete(job.id, "bench")


def _last_line_tenant(engine: Engine) -> str:
    """The small tenant whose next job ranks last among the tenants' next jobs: every other
    line is before it (the most a standing's read of the lines reads)."""
    with engine.connect() as conn:
        return str(
            conn.execute(
                text(
                    "SELECT tenant_id FROM queue_heads WHERE queued > 0 AND NOT saturated "
                    "AND tenant_id <> :sweep ORDER BY top_priority, running DESC, "
                    "last_served_at DESC NULLS LAST, head_created_at DESC, head_id DESC LIMIT 1"
                ),
                {"sweep": SWEEP_TENANT},
            ).scalar_one()
        )


def _job(engine: Engine, tenant: str, last: bool) -> str:
    with engine.connect() as conn:
        return str(
            conn.execute(
                text(
                    "SELECT id FROM jobs WHERE tenant_id = :t AND status = 'queued' "
                    f"ORDER BY priority DESC, created_at {'DESC' if last else ''}, id "
                    f"{'DESC' if last else ''} LIMIT 1"
                ),
                {"t": tenant},
            ).scalar_one()
        )


def _median(reads: int, read: Callable[[], Any]) -> tuple[float, Any]:
    """The median ms of `reads` reads (after 5 unmeasured), and the last read's answer."""
    for _ in range(5):
        read()
    times = []
    for _ in range(reads):
        t0 = time.perf_counter()
        answer = read()
        times.append((time.perf_counter() - t0) * 1000)
    return percentile(times, 50), answer


def _measure(engine: Engine, job_id: str, reads: int) -> tuple[float, float, Any]:
    """`standing()`'s median and the ranked read's, on one connection; the standing read,
    checked against the ranked one."""
    queue = JobQueue(engine, max_running_per_tenant=SCALE_LIMIT)
    with engine.connect() as conn:
        ours, found = _median(reads, lambda: standing(conn, job_id, queue))
        ranked, check = _median(
            max(reads // 20, 5),
            lambda: conn.execute(_RANKED, {"id": job_id, "default_limit": SCALE_LIMIT}).one(),
        )
    assert found is not None and found.share == check.share, (found, check)
    if found.tenants_ahead is not None:
        assert found.tenants_ahead == check.tenants_ahead, (found, check)
    return ours, ranked, found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.queue_standing", description=__doc__
    )
    parser.add_argument("--queued", type=int, default=100_000, help="the backlog's jobs")
    parser.add_argument("--reads", type=int, default=200, help="reads per measurement")
    add_database_url_argument(parser)
    args = parser.parse_args(argv)
    if args.queued < 10 * TENANTS or args.reads < 20:
        parser.error(f"--queued at least {10 * TENANTS}; --reads at least 20")
    with (
        admin_server(args.database_url) as admin_url,
        bench_database(admin_url) as url,
        bench_database(admin_url) as small_url,
    ):
        engine = db.make_engine(url, pool_size=2)
        small = db.make_engine(small_url, pool_size=2)
        machine = machine_description(engine)
        progress(f"filling {args.queued} and 1,000 jobs over {TENANTS} tenants; {machine}")
        _fill(engine, args.queued)
        _fill(small, TENANTS)
        tenant = _last_line_tenant(engine)
        cases = [
            ("standing_next_of_tenant", tenant, False),
            ("standing_behind_own_jobs", tenant, True),
            ("standing_behind_a_sweep", SWEEP_TENANT, True),
        ]
        first = 0.0
        for name, owner, last in cases:
            ours, ranked, found = _measure(engine, _job(engine, owner, last), args.reads)
            first = first or ours
            emit_beside(
                name,
                ours,
                "the same figures read off the whole backlog ranked (two window sorts)",
                ranked,
                machine,
                queued=args.queued,
                waiting_for=found.waiting_for,
                own_jobs_ahead=found.own_jobs_ahead,
                tenants_ahead=found.tenants_ahead,
            )
        at_small, _, found = _measure(
            small, _job(small, _last_line_tenant(small), False), args.reads
        )
        emit_beside(
            "standing_at_depth",
            first,
            f"the same read on a backlog of {TENANTS:,} jobs (its last line's next job)",
            at_small,
            machine,
            queued=args.queued,
            baseline_queued=TENANTS,
            baseline_tenants_ahead=found.tenants_ahead,
        )
        engine.dispose()
        small.dispose()
    progress("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
