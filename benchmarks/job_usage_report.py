"""What the platform's fine-tuning usage report costs beside a long history of jobs.

    python -m benchmarks.job_usage_report [--jobs 100000] [--days 180] [--log-lines 20]
                                          [--tenants 1000] [--repeats 9]

A throwaway database (migrated to head) gets `--tenants` tenants and `--jobs` succeeded jobs
spread over the last `--days` days, half of them the first tenant's: each job a run (its change
into `running`, then into `succeeded` 10 to 130 minutes later; one job in ten handed back part
way and run again) and `--log-lines` log events between them, as a trainer writes its progress.
Then, each read `--repeats` times in alternating rounds beside the same statement with revision
0036's index dropped in a transaction rolled back afterwards (the report before it: every event
read to find the window's status changes):

- `job_usage_month`: every tenant's trainer time, succeeded jobs and trained tokens over the last
  30 days (`job_usage.job_totals`, the fine-tuning half of `GET /v1/usage`);
- `job_usage_day`: the same over the last 24 hours;
- `claim_complete_status_index`: what the index costs the queue, which writes an event at every
  status change (two a claim + complete): `--cycles` claims + completes by one claimer
  over 100 tenants' queued jobs, in alternating rounds with the index and with it dropped (the
  queue before revision 0036), on the same tables; the median cycle of each.

One JSON line each (median ms beside the baseline's), with the plan's top nodes.
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, create_engine, text

from benchmarks.queue import (
    NO_LIMIT,
    TenantFixture,
    add_database_url_argument,
    admin_server,
    bench_database,
    emit_beside,
    insert_queued_jobs,
    machine_description,
    make_base,
    make_file_row,
    make_tenant,
    progress,
)
from benchmarks.usage_report import BENCH_TENANTS
from control_plane.job_status import ACTIVE, JobStatus, as_values
from control_plane.job_usage import _JOB_TOTALS, job_totals
from control_plane.queue import JobQueue

# Job g of the history: its tenant (every other job the first tenant's), its start (spread
# evenly over the days, newest first) and its run's length in minutes.
_JOBS = text(
    """
    INSERT INTO jobs (id, tenant_id, status, base_model_id, training_file_id, hyperparameters,
                      trained_tokens, attempt, created_at, started_at, finished_at)
    SELECT 'ftjob-bench-' || g,
           'tenant-bench-' || CASE WHEN g % 2 = 0 THEN 0 ELSE 1 + g % (:tenants - 1) END,
           'succeeded', :base, :file, '{}'::jsonb, 1000 + g % 5000, 1,
           s.at, s.at, s.at + s.minutes * interval '1 minute'
    FROM generate_series(CAST(:first AS bigint), CAST(:last AS bigint)) g
    CROSS JOIN LATERAL (
        SELECT now() - (g * CAST(:days AS float8) / :jobs) * interval '1 day' AS at,
               10 + g % 121 AS minutes
    ) s
    """
)

# Its status changes (one job in ten handed back a third of the way and run again 5 minutes
# later) and its log lines between them, in time order.
_EVENTS = text(
    """
    INSERT INTO job_events (job_id, created_at, message, type, data)
    SELECT j.id, e.at, e.message, 'message', e.data
    FROM jobs j
    CROSS JOIN LATERAL (
        SELECT j.started_at AS at, 'Job started' AS message, '{"status": "running"}'::jsonb AS data
        UNION ALL
        SELECT j.started_at + (j.finished_at - j.started_at) / 3, 'Handed back',
               '{"status": "queued"}'::jsonb
        WHERE right(j.id, 1) = '7'
        UNION ALL
        SELECT j.started_at + (j.finished_at - j.started_at) / 3 + interval '5 minutes',
               'Job started', '{"status": "running"}'::jsonb
        WHERE right(j.id, 1) = '7'
        UNION ALL
        SELECT j.started_at + (j.finished_at - j.started_at) * k / (:lines + 1), 'step ' || k, NULL
        FROM generate_series(1, CAST(:lines AS integer)) k
        UNION ALL
        SELECT j.finished_at, 'Job succeeded', '{"status": "succeeded"}'::jsonb
        ORDER BY 1
    ) e
    WHERE j.id = ANY(:ids)
    """
)


def _setup(engine: Engine, tenants: int, jobs: int, days: int, lines: int) -> None:
    with engine.begin() as conn:
        conn.execute(BENCH_TENANTS, {"n": tenants})
    base = make_base(engine, "job-usage-bench-base")
    file_id = make_file_row(engine, "tenant-bench-0")
    step = 5_000
    for first in range(0, jobs, step):
        last = min(first + step, jobs) - 1
        with engine.begin() as conn:
            params = {"first": first, "last": last, "tenants": tenants, "days": days, "jobs": jobs}
            conn.execute(_JOBS, {**params, "base": base, "file": file_id})
            ids = [f"ftjob-bench-{g}" for g in range(first, last + 1)]
            conn.execute(_EVENTS, {"ids": ids, "lines": lines})
        if (last + 1) % 20_000 == 0 or last + 1 == jobs:
            progress(f"{last + 1:,} jobs")
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE jobs"))
        conn.execute(text("VACUUM ANALYZE job_events"))


_INDEX = "CREATE INDEX ix_job_events_created_brin ON job_events USING brin (created_at)"


def _cycles(engine: Engine, cycles: int, rounds: int, machine: str) -> None:
    """Claim + complete cycles with and without the index, alternating rounds."""
    base = make_base(engine, "job-usage-claim-base")
    fixtures = []
    for n in range(100):
        tenant = make_tenant(engine, f"claim-bench-{n}")
        fixtures.append(
            (TenantFixture(tenant, make_file_row(engine, tenant)), 2 * cycles * rounds // 100 + 1)
        )
    insert_queued_jobs(engine, base, fixtures)
    queue = JobQueue(engine, max_running_per_tenant=NO_LIMIT)
    timings: dict[bool, list[float]] = {True: [], False: []}
    for n in range(2 * rounds):
        indexed = n % 2 == 0
        if not indexed:
            with engine.begin() as conn:
                conn.execute(text("DROP INDEX ix_job_events_created_brin"))
        for _ in range(cycles):
            began = time.perf_counter()
            job = queue.claim("bench")
            assert job is not None, "the backlog ran out"
            queue.complete(job.id, "bench", trained_tokens=1)
            timings[indexed].append((time.perf_counter() - began) * 1000)
        if not indexed:
            with engine.begin() as conn:
                conn.execute(text(_INDEX))
    emit_beside(
        "claim_complete_status_index",
        statistics.median(timings[True]),
        "the same cycles without revision 0036's index",
        statistics.median(timings[False]),
        machine,
        cycles=cycles,
        rounds=rounds,
    )


def _timed(engine: Engine, start: datetime, end: datetime, indexed: bool) -> float:
    with engine.connect() as conn, conn.begin() as transaction:
        if not indexed:
            conn.execute(text("DROP INDEX ix_job_events_created_brin"))
        began = time.perf_counter()
        job_totals(conn, start, end)
        took = (time.perf_counter() - began) * 1000
        transaction.rollback()
    return took


def _plan(engine: Engine, start: datetime, end: datetime) -> list[str]:
    params: dict[str, Any] = {
        "start": start,
        "end": end,
        "active": as_values(ACTIVE),
        "succeeded": JobStatus.SUCCEEDED.value,
    }
    with engine.connect() as conn:
        rows = conn.execute(
            text("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) " + str(_JOB_TOTALS)), params
        )
        return [row[0] for row in rows if "Scan" in row[0]][:8]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.job_usage_report", description=__doc__
    )
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--days", type=int, default=180)
    parser.add_argument("--log-lines", type=int, default=20)
    parser.add_argument("--tenants", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--cycles", type=int, default=500, help="claim + complete cycles a round")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of cycles each way")
    add_database_url_argument(parser)
    args = parser.parse_args(argv)
    with admin_server(args.database_url) as admin_url, bench_database(admin_url) as url:
        engine = create_engine(url)
        try:
            machine = machine_description(engine)
            _setup(engine, args.tenants, args.jobs, args.days, args.log_lines)
            with engine.connect() as conn:
                events = conn.execute(text("SELECT count(*) FROM job_events")).scalar_one()
            hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
            end = hour + timedelta(hours=1)
            for name, start in (
                ("job_usage_month", hour - timedelta(days=30)),
                ("job_usage_day", hour - timedelta(days=1)),
            ):
                ours: list[float] = []
                theirs: list[float] = []
                _timed(engine, start, end, True)  # warm
                for _ in range(args.repeats):
                    ours.append(_timed(engine, start, end, True))
                    theirs.append(_timed(engine, start, end, False))
                progress(
                    f"{name}: {statistics.median(ours):.1f} against "
                    f"{statistics.median(theirs):.1f} ms"
                )
                with engine.connect() as conn:
                    tenants_seen = len(job_totals(conn, start, end))
                emit_beside(
                    name,
                    statistics.median(ours),
                    "the same statement without revision 0036's index (every event read)",
                    statistics.median(theirs),
                    machine,
                    jobs=args.jobs,
                    days=args.days,
                    events=events,
                    tenants_in_report=tenants_seen,
                    repeats=args.repeats,
                    plan=_plan(engine, start, end),
                )
            _cycles(engine, args.cycles, args.rounds, machine)
        finally:
            engine.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
