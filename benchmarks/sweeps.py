"""What moving a sweep costs (`control_plane.sweeps`, `POST /v1/fine_tuning/jobs/cancel`,
`/pause`, `/resume`, `/priority`).

    python -m benchmarks.sweeps [--sweep 5000] [--database-url URL]

One tenant holds five sweeps of `--sweep` queued jobs each (tagged `{"sweep": "a"}` to `"e"`)
among 10,000 queued jobs of 100 other tenants. One JSON line each, beside its baseline in the
same process:

- `sweep_cancel`: sweep `a` cancelled by `cancel_matching` (batches of 100, each a
  transaction), against sweep `b` cancelled one job at a time with `JobQueue.request_cancel`,
  as a client without the bulk call would (its request's HTTP round trip left out);
- `sweep_cancel_one_statement`: sweep `c` cancelled in one batch (one transaction), against
  the same batches of 100: the tenant's bookkeeping row updated once per job inside one
  transaction walks its row versions at each update;
- `sweep_pause` and `sweep_resume`: sweep `d` paused, then resumed, by `pause_matching` and
  `resume_matching`, against sweep `e` paused, then resumed, one job at a time
  (`JobQueue.request_pause`, `JobQueue.resume`);
- `sweep_priority`: sweep `d`, queued again, given priority 5 by `prioritize_matching`, against
  sweep `e` given it one job at a time (`JobQueue.set_priority`): each queued job moves its
  line's head, a line of 10,000 queued jobs.

Each line says the jobs moved; every run checks that the queue's bookkeeping has no drift.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, text

from benchmarks.queue import (
    add_database_url_argument,
    admin_server,
    bench_database,
    emit_beside,
    machine_description,
    make_base,
    make_file_row,
    make_tenant,
    progress,
)
from control_plane import db, queue_stats
from control_plane.ids import new_id
from control_plane.queue import JobQueue
from control_plane.sweeps import (
    DEFAULT_BATCH,
    cancel_matching,
    pause_matching,
    prioritize_matching,
    resume_matching,
)
from tests.factories import insert_queued_jobs

OTHER_TENANTS = 100
OTHER_JOBS = 10_000


def _fill(engine: Engine, tenant_id: str, base_id: str, file_id: str, sweep: str, n: int) -> None:
    now = datetime.now(UTC)
    rows = [
        {
            "id": new_id("job"),
            "tenant_id": tenant_id,
            "base_model_id": base_id,
            "priority": 0,
            "created_at": now + timedelta(microseconds=i),
            "run_after": now,
            "file": file_id,
        }
        for i in range(n)
    ]
    with engine.begin() as conn:
        for start in range(0, n, 5_000):
            insert_queued_jobs(conn, rows[start : start + 5_000])
        conn.execute(
            text("UPDATE jobs SET user_metadata = CAST(:m AS jsonb) WHERE id = ANY(:ids)"),
            {"m": json.dumps({"sweep": sweep}), "ids": [r["id"] for r in rows]},
        )


def _one_at_a_time(engine: Engine, sweep: str, move: Callable[[str], object]) -> float:
    """Seconds to move every job of `sweep` with a single move each, as a client without the
    sweep's call would (its HTTP round trips left out)."""
    with engine.connect() as conn:
        job_ids = list(
            conn.execute(
                text("SELECT id FROM jobs WHERE user_metadata @> CAST(:m AS jsonb)"),
                {"m": json.dumps({"sweep": sweep})},
            ).scalars()
        )
    started = time.perf_counter()
    for job_id in job_ids:
        move(job_id)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sweeps", description=__doc__)
    parser.add_argument("--sweep", type=int, default=5_000, help="jobs in each sweep")
    add_database_url_argument(parser)
    args = parser.parse_args(argv)
    with admin_server(args.database_url) as admin_url, bench_database(admin_url) as url:
        engine = db.make_engine(url, pool_size=2)
        machine = machine_description(engine)
        base_id = make_base(engine, "bench-base")
        tenant_id = make_tenant(engine, "sweeper")
        file_id = make_file_row(engine, tenant_id)
        for n in range(OTHER_TENANTS):
            other = make_tenant(engine, f"other-{n}")
            _fill(engine, other, base_id, file_id, f"other-{n}", OTHER_JOBS // OTHER_TENANTS)
        for sweep in "abcde":
            _fill(engine, tenant_id, base_id, file_id, sweep, args.sweep)
        with engine.begin() as conn:
            conn.execute(text("ANALYZE jobs"))
        progress(f"filled: 5 sweeps of {args.sweep} among {OTHER_JOBS} other jobs; {machine}")

        started = time.perf_counter()
        moved = cancel_matching(engine, tenant_id, {"sweep": "a"})
        bulk_s = time.perf_counter() - started
        queue = JobQueue(engine)
        single_s = _one_at_a_time(engine, "b", queue.request_cancel)
        emit_beside(
            "sweep_cancel",
            bulk_s * 1000,
            "the same count cancelled one job at a time (JobQueue.request_cancel)",
            single_s * 1000,
            machine,
            jobs=moved.total,
            batch=DEFAULT_BATCH,
        )

        started = time.perf_counter()
        whole = cancel_matching(engine, tenant_id, {"sweep": "c"}, batch=args.sweep + 1)
        whole_s = time.perf_counter() - started
        emit_beside(
            "sweep_cancel_one_statement",
            whole_s * 1000,
            f"sweep a in batches of {DEFAULT_BATCH} (sweep_cancel)",
            bulk_s * 1000,
            machine,
            jobs=whole.total,
        )
        for name, bulk, single in (
            ("sweep_pause", pause_matching, queue.request_pause),
            ("sweep_resume", resume_matching, queue.resume),
        ):
            started = time.perf_counter()
            moved = bulk(engine, tenant_id, {"sweep": "d"})
            bulk_s = time.perf_counter() - started
            emit_beside(
                name,
                bulk_s * 1000,
                f"the same count one job at a time (JobQueue.{single.__name__})",
                _one_at_a_time(engine, "e", single) * 1000,
                machine,
                jobs=moved.total,
                batch=DEFAULT_BATCH,
            )
        started = time.perf_counter()
        changed = prioritize_matching(engine, tenant_id, {"sweep": "d"}, 5)
        bulk_s = time.perf_counter() - started
        emit_beside(
            "sweep_priority",
            bulk_s * 1000,
            "the same count one job at a time (JobQueue.set_priority)",
            _one_at_a_time(engine, "e", lambda job_id: queue.set_priority(job_id, 5)) * 1000,
            machine,
            jobs=changed,
            batch=DEFAULT_BATCH,
        )
        with engine.connect() as conn:
            assert queue_stats.drift(conn) == []
        engine.dispose()
    progress("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
