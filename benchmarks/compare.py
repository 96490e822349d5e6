"""Compare-jobs benchmark: a sweep of 12 jobs, each with `--events` metric events, side by side.

    python -m benchmarks.compare [--events 20000] [--jobs 12] [--repeat 5]

Through the real app (uvicorn on 127.0.0.1), signed in as a browser is:

- `compare_page`: `/jobs/compare?q=sweep=...` (the table: what differs, each job's last train
  loss and lowest evaluation) and its `metrics.json` (every job's curves, downsampled), median
  milliseconds and bytes; against the baseline of what a person did before the page: open each
  job's page and its `metrics.json`, one job after another.
- `best_eval`: a job's lowest eval loss as the table reads it (off revision 0040's partial index
  on the events holding one), against the same minimum over every metrics event of the job
  (the statement before it), and beside them the lowest point of its downsampled chart (what
  the chart shows: bucket means, two evaluations a step apart averaged). After ANALYZE.

Needs PostgreSQL (`LORAFORGE_BENCH_DATABASE_URL`, default 127.0.0.1:5432). One JSON line per
measurement, the machine's CPU named in each.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Table, func, select, text

from benchmarks.dashboard import make_job, median_ms, signed_in
from benchmarks.registry import scratch_database
from control_plane import tenants
from control_plane.api.app import create_app
from control_plane.api.serve import serve_in_thread
from control_plane.dashboard import comparison
from control_plane.dashboard.queries import json_number, loss_curves
from control_plane.db.tables import EVALUATION, JobEvent
from control_plane.events import of_job
from control_plane.services import build_services
from control_plane.settings import Settings
from control_plane.storage import LocalObjectStore


def cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def emit(measurement: str, **figures: Any) -> None:
    print(
        json.dumps({"benchmark": "compare", "measurement": measurement, "cpu": cpu(), **figures}),
        flush=True,
    )


def timed(client: Any, paths: list[str], repeat: int) -> tuple[float, int]:
    """Median milliseconds to fetch every one of `paths` in turn, and their bytes."""
    samples, size = [], 0
    for _ in range(repeat):
        started = time.perf_counter()
        size = 0
        for path in paths:
            answer = client.get(path)
            answer.raise_for_status()
            size += len(answer.content)
        samples.append(time.perf_counter() - started)
    return median_ms(samples), size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--jobs", type=int, default=comparison.MAX_COMPARED)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with scratch_database() as database_url, tempfile.TemporaryDirectory() as tmp:
        settings = Settings(home=Path(tmp) / "home")
        services = build_services(
            settings, database_url=database_url, store=LocalObjectStore(Path(tmp) / "objects")
        )
        with services.engine.begin() as conn:
            tenant = tenants.create_tenant(conn, "bench")
            _, key = tenants.create_api_key(conn, settings.secret_key, tenant.id, role="admin")
        job_ids = [make_job(services, tenant.id, args.events) for _ in range(args.jobs)]
        with services.engine.begin() as conn:
            for n, job_id in enumerate(job_ids):
                conn.execute(
                    text(
                        "UPDATE jobs SET user_metadata = CAST(:m AS jsonb), hyperparameters = "
                        "CAST(:hp AS jsonb) WHERE id = :id"
                    ),
                    {
                        "m": json.dumps({"sweep": "bench", "lr": str(n)}),
                        "hp": json.dumps({"learning_rate_multiplier": 0.5 * (n + 1)}),
                        "id": job_id,
                    },
                )
                # Two evaluations every 100 steps, a step apart: 1.0 then 2.0 (a chart's bucket
                # holds both, and shows their mean).
                conn.execute(
                    text(
                        "INSERT INTO job_events (job_id, type, message, data) "
                        "SELECT :job, 'metrics', 'eval', jsonb_build_object('step', g + k, "
                        "'eval_loss', 1.0 + k) "
                        "FROM generate_series(100, :n, 100) AS g, generate_series(0, 1) AS k"
                    ),
                    {"job": job_id, "n": args.events},
                )
        with serve_in_thread(create_app(services)) as url, signed_in(url, key) as client:
            compared = [
                "/jobs/compare?q=sweep%3Dbench",
                f"/jobs/compare/metrics.json?{_ids(job_ids)}",
            ]
            one_by_one = [p for j in job_ids for p in (f"/jobs/{j}", f"/jobs/{j}/metrics.json")]
            for _ in range(2):  # alternating rounds, each side warm
                ms, size = timed(client, compared, args.repeat)
                base_ms, base_size = timed(client, one_by_one, args.repeat)
                emit(
                    "compare_page",
                    jobs=args.jobs,
                    events_per_job=args.events,
                    ms=ms,
                    bytes=size,
                    baseline="each job's page and metrics.json, one job after another",
                    baseline_ms=base_ms,
                    baseline_bytes=base_size,
                    ratio=round(ms / base_ms, 3),
                )
        with services.engine.connect() as conn:
            conn.exec_driver_sql("ANALYZE job_events")
            job_id = job_ids[0]
            eval_loss = json_number(events_table.c.data["eval_loss"])
            # The statement before revision 0040: every metrics event of the job, walked.
            walked = select(func.min(eval_loss)).where(
                of_job(job_id), events_table.c.type == "metrics"
            )
            reads = {
                "indexed": lambda: comparison.lowest_eval_loss(conn, job_id),
                "walked": lambda: conn.execute(walked).scalar(),
                "chart": lambda: min(loss_curves(conn, job_id).eval.values),
            }
            times: dict[str, list[float]] = {name: [] for name in reads}
            found: dict[str, Any] = {}
            for _ in range(args.repeat):
                for name, read in reads.items():
                    started = time.perf_counter()
                    found[name] = read()
                    times[name].append(time.perf_counter() - started)
            # The plan of the statement `lowest_eval_loss` sends, its job a constant as sent.
            sent = select(func.min(eval_loss)).where(
                events_table.c.job_id == job_id,
                events_table.c.type == "metrics",
                text(EVALUATION),
            )
            compiled = sent.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True})
            plan = [str(row[0]) for row in conn.execute(text(f"EXPLAIN {compiled}"))]
            emit(
                "best_eval",
                events=args.events,
                ms=median_ms(times["indexed"], 2),
                best_eval_loss=found["indexed"],
                baseline="the same minimum over every metrics event of the job (before 0040)",
                baseline_ms=median_ms(times["walked"], 2),
                baseline_best_eval_loss=found["walked"],
                ratio=round(median_ms(times["indexed"], 3) / median_ms(times["walked"], 3), 4),
                chart_ms=median_ms(times["chart"], 2),
                chart_lowest=found["chart"],
                plan=plan,
            )


events_table = cast(Table, JobEvent.__table__)


def _ids(job_ids: list[str]) -> str:
    return "&".join(f"job={j}" for j in job_ids)


if __name__ == "__main__":
    main()
