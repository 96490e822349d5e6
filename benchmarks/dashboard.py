"""Dashboard benchmark: opening a job page whose job has 100,000 metric events, and the queue
page of a platform with 5,000 busy tenants.

    python -m benchmarks.dashboard [--events 100000] [--repeat 5] [--tenants 5000]

Through the real app (uvicorn on 127.0.0.1) and, where /usr/bin/chromium is, headless
Chromium, for a job with `--events` metric events and a baseline job with 100 in the same
database:

- `page`: the job page's HTML and its `metrics.json` over HTTP: median milliseconds and bytes.
- `browser`: from navigation to the chart drawn (`#loss-chart[data-ready]`), median ms.
- `downsampling`: the train loss curve as the page gets it (at most 1,000 points a series, read
  from revision 0015's sums) against every metric event bucketed in two passes, as before that
  revision (and beside them every point, `loss_curves` with no bound): ms and bytes.
- `event_insert`: one event's insert (a step's metrics, and a log line: what the claim and the
  finish write), median ms, against the same without revision 0015's trigger.
- `queue_page`: the queue page as a platform operator's admin gets it with `--tenants` busy
  tenants (the fifty busiest listed), against the same page listing every one of them.
- `older_job_reads`: the job page's reads of its own events (the newest page of its log, its
  newest event's id, its latest metrics) for a job with a fifth of `--events`, older than the
  long run, against the same reads as they were written before `events.of_job`.
- `chart_repair`: `loraforge queue repair` of one job's loss-chart sums (deleted, as a restore
  without them leaves them) among every job's metric events here, against `loraforge queue
  check`'s pass over those events alone (the repair's own first pass, taken without a lock).
- `timeline`: the job's status changes, which the live panel reads again at each change its
  stream sends, off `ix_job_events_status_changes` against the same read without that index
  and its statistics (dropped in a transaction that is rolled back: before revision 0011).

Needs PostgreSQL (`LORAFORGE_BENCH_DATABASE_URL`, default 127.0.0.1:5432). One JSON line per
measurement.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import Connection, Engine, text

from benchmarks.registry import scratch_database
from control_plane import metric_rollups, tenants
from control_plane.api.app import create_app
from control_plane.api.serve import serve_in_thread
from control_plane.dashboard.queries import (
    MAX_CHART_POINTS,
    LossCurves,
    loss_curves,
    status_changes,
)
from control_plane.dashboard.routes import platform as platform_pages
from control_plane.events import add_event, metric_events_in_bulk
from control_plane.services import Services, build_services
from control_plane.settings import Settings
from control_plane.storage import LocalObjectStore

CHROMIUM = Path("/usr/bin/chromium")


def emit(measurement: str, **figures: Any) -> None:
    print(json.dumps({"benchmark": "dashboard", "measurement": measurement, **figures}), flush=True)


def make_job(services: Services, tenant_id: str, events: int) -> str:
    """A job row and `events` metric events, each inserted by one statement."""
    with services.engine.begin() as conn:
        base_id = conn.execute(
            text(
                "INSERT INTO base_models (id, name, source, source_kind) "
                "VALUES (md5(random()::text), md5(random()::text), 'x', 'dir') "
                "RETURNING id"
            )
        ).scalar_one()
        file_id = conn.execute(
            text(
                "INSERT INTO files (id, tenant_id, filename, purpose, bytes, sha256, object_key) "
                "VALUES (md5(random()::text), :t, 'train.jsonl', 'fine-tune', 1, 'x', 'x') "
                "RETURNING id"
            ),
            {"t": tenant_id},
        ).scalar_one()
        job_id = conn.execute(
            text(
                "INSERT INTO jobs (id, tenant_id, status, base_model_id, training_file_id, "
                "hyperparameters) VALUES ('ftjob-' || md5(random()::text), :t, 'running', :b, "
                ":f, '{}') RETURNING id"
            ),
            {"t": tenant_id, "b": base_id, "f": file_id},
        ).scalar_one()
        conn.execute(
            text(
                "INSERT INTO job_events (job_id, message, data) "
                "VALUES (:job, 'Job started', '{\"status\": \"running\"}')"
            ),
            {"job": job_id},
        )
        with metric_events_in_bulk(conn, [job_id]):
            conn.execute(
                text(
                    "INSERT INTO job_events (job_id, type, message, data) "
                    "SELECT :job, 'metrics', 'step ' || g, jsonb_build_object('step', g, "
                    "'train_loss', 3.0 / (1 + g / 5000.0), 'tokens_per_s', 1000) "
                    "FROM generate_series(1, :n) AS g"
                ),
                {"job": job_id, "n": events},
            )
    return str(job_id)


def median_ms(samples: list[float], digits: int = 1) -> float:
    """The median of `samples` (seconds) in milliseconds, rounded to `digits`."""
    return round(statistics.median(samples) * 1000, digits)


@contextmanager
def signed_in(url: str, key: str) -> Iterator[httpx.Client]:
    """An HTTP client holding the dashboard's session for `key` (signed in as a browser does)."""
    with httpx.Client(base_url=url, timeout=60) as client:
        signin = client.get("/sign-in")
        client.post(
            "/sign-in",
            data={"api_key": key, "signin": signin.cookies.get("lf_signin") or "", "next": "/jobs"},
        )
        yield client


def over_http(url: str, key: str, job_id: str, repeat: int) -> dict[str, Any]:
    with signed_in(url, key) as client:
        times, size = [], 0
        for _ in range(repeat):
            started = time.perf_counter()
            page = client.get(f"/jobs/{job_id}")
            metrics = client.get(f"/jobs/{job_id}/metrics.json")
            times.append(time.perf_counter() - started)
            assert page.status_code == metrics.status_code == 200
            size = len(page.content) + len(metrics.content)
            points = len(metrics.json()["train"]["steps"])
    return {"ms": median_ms(times), "bytes": size, "points_sent": points}


def in_browser(url: str, key: str, job_id: str, repeat: int) -> float:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        page = browser.new_page()
        page.goto(f"{url}/sign-in")
        page.fill("#api_key", key)
        page.click("button[type=submit]")
        page.wait_for_url(f"{url}/jobs")
        times = []
        for _ in range(repeat):
            started = time.perf_counter()
            page.goto(f"{url}/jobs/{job_id}")
            page.wait_for_selector("#loss-chart[data-ready=true]")
            times.append(time.perf_counter() - started)
        browser.close()
    return median_ms(times)


def timed_timeline(conn: Connection, job_id: str, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        status_changes(conn, job_id)
        times.append(time.perf_counter() - started)
    return median_ms(times, 3)


# The job page's reads of a job's own events (the newest page of its log, its newest event's
# id, its latest metrics): as they were written before `events.of_job` (the job equated, ordered
# by id alone: the planner may walk the primary key back from the table's newest event), and
# as they are now (the job as a one-element array, ordered as `ix_job_events_job_id_id`).
_JOB_NOW, _ORDER_NOW = "job_id = ANY(CAST(ARRAY[:job] AS text[]))", "job_id DESC, id DESC"
OLDER_JOB_READS = {
    "before": (
        "SELECT * FROM job_events WHERE job_id = :job ORDER BY id DESC LIMIT 51",
        "SELECT max(id) FROM job_events WHERE job_id = :job",
        "SELECT data FROM job_events WHERE job_id = :job AND type = 'metrics' "
        "AND data['train_loss'] IS NOT NULL ORDER BY id DESC LIMIT 1",
    ),
    "now": (
        f"SELECT * FROM job_events WHERE {_JOB_NOW} ORDER BY {_ORDER_NOW} LIMIT 51",
        f"SELECT id FROM job_events WHERE {_JOB_NOW} ORDER BY {_ORDER_NOW} LIMIT 1",
        f"SELECT data FROM job_events WHERE {_JOB_NOW} AND type = 'metrics' "
        f"AND data['train_loss'] IS NOT NULL ORDER BY {_ORDER_NOW} LIMIT 1",
    ),
}


def timed_older_job_reads(conn: Connection, job_id: str, repeat: int) -> dict[str, float]:
    """Median ms of the three reads, now and before, in alternating rounds."""
    times: dict[str, list[float]] = {"now": [], "before": []}
    for _ in range(repeat):
        for side, statements in OLDER_JOB_READS.items():
            started = time.perf_counter()
            for statement in statements:
                conn.execute(text(statement), {"job": job_id}).all()
            times[side].append(time.perf_counter() - started)
    return {side: median_ms(t, 3) for side, t in times.items()}


def make_busy_tenants(services: Services, count: int) -> None:
    """`count` tenants with 1 to 50 queued jobs each (one statement: the triggers keep their
    rows in the queue's bookkeeping as for any submission)."""
    with services.engine.begin() as conn:
        base_id, file_id = conn.execute(
            text("SELECT base_model_id, training_file_id FROM jobs LIMIT 1")
        ).one()
        conn.execute(
            text(
                "INSERT INTO tenants (id, name) SELECT 'tenant-busy-' || g, 'busy-' || g "
                "FROM generate_series(1, :n) AS g"
            ),
            {"n": count},
        )
        conn.execute(
            text(
                "INSERT INTO jobs (id, tenant_id, status, base_model_id, training_file_id, "
                "hyperparameters) SELECT 'ftjob-busy-' || g || '-' || k, 'tenant-busy-' || g, "
                "'queued', :base, :file, '{}'::jsonb FROM generate_series(1, :n) AS g, "
                "generate_series(1, 1 + g % 50) AS k"
            ),
            {"n": count, "base": base_id, "file": file_id},
        )


def queue_page_ms(url: str, key: str, repeat: int) -> tuple[float, int]:
    """The queue page as the operator's admin gets it: median ms and bytes."""
    with signed_in(url, key) as client:
        times, size = [], 0
        client.get("/queue")  # warm: the template compiled, the statements prepared
        for _ in range(repeat):
            started = time.perf_counter()
            page = client.get("/queue")
            times.append(time.perf_counter() - started)
            assert page.status_code == 200
            size = len(page.content)
    return median_ms(times), size


def train_of(curves: LossCurves) -> tuple[list[float], list[float]]:
    return curves.train.steps, curves.train.values


def bucketed_every_event(conn: Connection, job_id: str) -> tuple[list[float], list[float]]:
    """The train curve as the job page got it before revision 0015: every metric event of the
    job read twice (its bounds, then MAX_CHART_POINTS equal buckets), the baseline."""
    where = "job_id = :job AND type = 'metrics' AND (data ? 'train_loss' OR data ? 'eval_loss')"
    low, high = conn.execute(
        text(
            f"SELECT min((data ->> 'step')::float8), max((data ->> 'step')::float8) "
            f"FROM job_events WHERE {where}"
        ),
        {"job": job_id},
    ).one()
    rows = conn.execute(
        text(
            "SELECT avg(step) FILTER (WHERE train IS NOT NULL), avg(train) FROM ("
            "SELECT width_bucket((data ->> 'step')::float8, :low, :high, :n) AS bucket, "
            "(data ->> 'step')::float8 AS step, (data ->> 'train_loss')::float8 AS train "
            f"FROM job_events WHERE {where}) AS e GROUP BY bucket ORDER BY bucket"
        ),
        {"job": job_id, "low": low, "high": high + 1e-9, "n": MAX_CHART_POINTS},
    ).all()
    kept = [r for r in rows if r[1] is not None]
    return [r[0] for r in kept], [r[1] for r in kept]


def timed_inserts(engine: Engine, job_id: str, kind: str, count: int) -> list[float]:
    """Seconds of each of `count` event inserts (a `kind` event: a step's metrics, or a log line
    as the claim and the finish write), each in a transaction of its own as a trainer writes
    them (the commit not timed)."""
    times = []
    for step in range(count):
        with engine.begin() as conn:
            started = time.perf_counter()
            add_event(conn, job_id, "step", type=kind, data={"step": step, "train_loss": 1.0})
            times.append(time.perf_counter() - started)
    return times


def trigger_enabled(engine: Engine, enabled: bool) -> None:
    with engine.begin() as conn:
        verb = "ENABLE" if enabled else "DISABLE"
        conn.execute(text(f"ALTER TABLE job_events {verb} TRIGGER job_metric_rollup"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--tenants", type=int, default=5000, help="busy tenants for queue_page")
    args = parser.parse_args()
    with scratch_database() as database_url, tempfile.TemporaryDirectory() as tmp:
        settings = Settings(home=Path(tmp) / "home", platform_operator_tenants=["bench"])
        services = build_services(
            settings, database_url=database_url, store=LocalObjectStore(Path(tmp) / "objects")
        )
        with services.engine.begin() as conn:
            tenant = tenants.create_tenant(conn, "bench")
            _, key = tenants.create_api_key(conn, settings.secret_key, tenant.id, role="admin")
        older = make_job(services, tenant.id, args.events // 5)  # a run before the long one
        jobs = {n: make_job(services, tenant.id, n) for n in (100, args.events)}
        with serve_in_thread(create_app(services)) as url:
            for n, job_id in jobs.items():
                emit("page", events=n, **over_http(url, key, job_id, args.repeat))
            make_busy_tenants(services, args.tenants)
            ms, size = queue_page_ms(url, key, args.repeat)
            listed = platform_pages.QUEUE_PAGE_TENANTS
            platform_pages.QUEUE_PAGE_TENANTS = 10**9  # every busy tenant listed, as before
            try:
                baseline_ms, baseline_size = queue_page_ms(url, key, args.repeat)
            finally:
                platform_pages.QUEUE_PAGE_TENANTS = listed
            emit(
                "queue_page",
                busy_tenants=args.tenants,
                listed=listed,
                ms=ms,
                bytes=size,
                baseline="the same page listing every busy tenant",
                baseline_ms=baseline_ms,
                baseline_bytes=baseline_size,
                ratio=round(ms / baseline_ms, 4),
            )
            if CHROMIUM.is_file():
                baseline = in_browser(url, key, jobs[100], args.repeat)
                big = in_browser(url, key, jobs[args.events], args.repeat)
                emit(
                    "browser",
                    events=args.events,
                    ms=big,
                    baseline_events=100,
                    baseline_ms=baseline,
                    ratio=round(big / baseline, 2),
                )
        with services.engine.connect() as conn:
            long_run = jobs[args.events]
            reads: dict[str, Callable[[], tuple[list[float], list[float]]]] = {
                "rollups": lambda: train_of(loss_curves(conn, long_run)),
                "every_event": lambda: bucketed_every_event(conn, long_run),
                "every_point": lambda: train_of(loss_curves(conn, long_run, max_points=10**9)),
            }
            curve: dict[str, tuple[float, int, int]] = {}
            for name, read in reads.items():
                times, size, points = [], 0, 0
                for _ in range(args.repeat):
                    started = time.perf_counter()
                    steps, values = read()
                    size = len(json.dumps({"steps": steps, "values": values}))
                    times.append(time.perf_counter() - started)
                    points = len(steps)
                curve[name] = (median_ms(times), size, points)
            ms, size, points = curve["rollups"]
            emit(
                "downsampling",
                events=args.events,
                max_points=MAX_CHART_POINTS,
                points_sent=points,
                ms=ms,
                bytes=size,
                baseline="every metric event bucketed in two passes (before revision 0015)",
                baseline_ms=curve["every_event"][0],
                ratio=round(ms / curve["every_event"][0], 4),
                every_point_ms=curve["every_point"][0],
                every_point_bytes=curve["every_point"][1],
            )
            conn.rollback()
        # Alternating rounds, each insert its own transaction, on a job of their own.
        inserted = make_job(services, tenant.id, 0)
        for kind in ("metrics", "message"):
            kept: list[float] = []
            unkept: list[float] = []
            for _ in range(args.repeat):
                kept += timed_inserts(services.engine, inserted, kind, 100)
                trigger_enabled(services.engine, False)
                try:
                    unkept += timed_inserts(services.engine, inserted, kind, 100)
                finally:
                    trigger_enabled(services.engine, True)
            ms, baseline_ms = median_ms(kept, 3), median_ms(unkept, 3)
            emit(
                "event_insert",
                type=kind,
                ms=ms,
                baseline="the same insert without revision 0015's trigger",
                baseline_ms=baseline_ms,
                ratio=round(ms / baseline_ms, 4),
            )
        with services.engine.connect() as conn:
            conn.execute(text("ANALYZE job_events"))  # as autovacuum does as the table grows
            conn.commit()
            timeline = timed_timeline(conn, jobs[args.events], args.repeat)
            older_reads = timed_older_job_reads(conn, older, args.repeat)
            emit(
                "older_job_reads",
                events=args.events // 5,
                newer_events=args.events,
                ms=older_reads["now"],
                baseline="the same reads with the job equated and ordered by id alone (before)",
                baseline_ms=older_reads["before"],
                ratio=round(older_reads["now"] / older_reads["before"], 4),
            )
            conn.rollback()
            with conn.begin() as before:
                conn.execute(text("DROP STATISTICS job_events_status"))
                conn.execute(text("DROP INDEX ix_job_events_status_changes"))
                baseline_ms = timed_timeline(conn, jobs[args.events], args.repeat)
                before.rollback()
            emit(
                "timeline",
                events=args.events,
                ms=timeline,
                baseline="the same read before revision 0011 (no index, no statistics)",
                baseline_ms=baseline_ms,
                ratio=round(timeline / baseline_ms, 4),
            )
            conn.rollback()
            events = conn.execute(text("SELECT count(*) FROM job_events")).scalar_one()
            conn.rollback()
        with services.engine.begin() as conn:
            # The inserts timed without the trigger above went around it: summed here first.
            metric_rollups.repair(conn)
        checks, repairs = [], []
        for _ in range(args.repeat):
            with services.engine.begin() as conn:
                conn.execute(
                    text("DELETE FROM job_metric_rollups WHERE job_id = :job"), {"job": jobs[100]}
                )
            with services.engine.connect() as conn:
                started = time.perf_counter()
                assert len(metric_rollups.drift(conn)) == 1
                checks.append(time.perf_counter() - started)
            with services.engine.begin() as conn:
                started = time.perf_counter()
                assert len(metric_rollups.repair(conn)) == 1
                repairs.append(time.perf_counter() - started)
        ms, baseline_ms = median_ms(repairs), median_ms(checks)
        emit(
            "chart_repair",
            events=events,
            drifted_jobs=1,
            ms=ms,
            baseline="loraforge queue check's pass over every metric event (no lock)",
            baseline_ms=baseline_ms,
            ratio=round(ms / baseline_ms, 4),
        )
        services.close()


if __name__ == "__main__":
    main()
