"""What a sweep's median stopping costs at each evaluation (`control_plane.sweep_stopping`).

    python -m benchmarks.sweep_stopping [--jobs 64] [--steps 2000] [--every 20]

A tenant holds a sweep of `--jobs` jobs, each with `--steps` metric events (one a step) and an
evaluation every `--every` steps, beside 10,000 other jobs of its own. At a job's evaluation
the trainer reads its sweep's other jobs as they stood at that step (`peers_at`): one JSON line
with its median milliseconds, after ANALYZE, beside the baseline of the same statement written
so that revision 0040's partial index on the evaluations cannot serve it (it then reads every
metrics event of every job of the sweep), and both statements' answers checked equal. Needs
PostgreSQL (`LORAFORGE_BENCH_DATABASE_URL`, default 127.0.0.1:5432); the CPU named in the line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from sqlalchemy import bindparam, text

from benchmarks.compare import cpu
from benchmarks.registry import scratch_database
from control_plane import jobs, sweep_stopping
from control_plane.db import make_engine
from control_plane.job_status import TERMINAL
from tests.factories import enqueue_jobs, make_base, make_file, make_tenant, tag_jobs

OTHER_JOBS = 10_000
SAMPLES = 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2_000)
    parser.add_argument("--every", type=int, default=20)
    args = parser.parse_args()
    with scratch_database() as url:
        engine = make_engine(url)
        tenant = make_tenant(engine, "bench")
        base = make_base(engine, "bench-base")
        file_id = make_file(engine, tenant.id).id
        enqueue_jobs(engine, tenant.id, base.id, file_id, OTHER_JOBS)
        sweep = enqueue_jobs(engine, tenant.id, base.id, file_id, args.jobs)
        tag_jobs(engine, {"sweep": "bench"}, *sweep)
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO job_events (job_id, type, message, data) "
                    "SELECT j, 'metrics', 'step', CASE WHEN g % :every = 0 THEN "
                    "jsonb_build_object('step', g, 'train_loss', 2.0, 'eval_loss', "
                    "1.0 + (abs(hashtext(j || g)) % 1000) / 1000.0) "
                    "ELSE jsonb_build_object('step', g, 'train_loss', 2.0) END "
                    "FROM unnest(CAST(:jobs AS text[])) AS j, generate_series(1, :steps) AS g"
                ),
                {"jobs": sweep, "steps": args.steps, "every": args.every},
            )
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("ANALYZE"))
        # The baseline: the same statement, its predicate not the partial index's.
        unindexed = text(
            sweep_stopping._PEERS.text.replace(
                "(e.data -> 'eval_loss') IS NOT NULL", "e.data ? 'eval_loss'", 1
            )
        ).bindparams(bindparam("over", expanding=True))
        step = args.steps // 2
        with engine.connect() as conn:
            job = jobs.get_job_unscoped(conn, sweep[0])
            assert job is not None
            params = {
                "step": step,
                "tenant": tenant.id,
                "metadata": json.dumps({"sweep": "bench"}),
                "job": job.id,
                "over": sorted(status.value for status in TERMINAL),
            }
            timings: dict[str, list[float]] = {"indexed": [], "unindexed": []}
            answers = {}
            for _ in range(SAMPLES):
                for side, run in (
                    ("indexed", lambda: sweep_stopping.peers_at(conn, job, step)),
                    ("unindexed", lambda: conn.execute(unindexed, params).all()),
                ):
                    started = time.perf_counter()
                    answers[side] = run()
                    timings[side].append((time.perf_counter() - started) * 1000)
            peers = answers["indexed"]
            assert peers is not None
            baseline = sorted(
                r.average
                for r in answers["unindexed"]
                if r.average is not None and (r.over or r.reached >= step)
            )
            assert peers.averages == baseline, "the two statements disagree"
        ms = statistics.median(timings["indexed"])
        base_ms = statistics.median(timings["unindexed"])
        print(
            json.dumps(
                {
                    "benchmark": "sweep_stopping",
                    "measurement": "peers_at",
                    "cpu": cpu(),
                    "sweep_jobs": args.jobs,
                    "events_per_job": args.steps,
                    "evaluations_per_job": args.steps // args.every,
                    "other_jobs_of_the_tenant": OTHER_JOBS,
                    "peers": len(peers.averages),
                    "ms": round(ms, 2),
                    "baseline": "the same statement unable to use revision 0040's index",
                    "baseline_ms": round(base_ms, 2),
                    "ratio": round(ms / base_ms, 3),
                }
            ),
            flush=True,
        )
        engine.dispose()


if __name__ == "__main__":
    main()
