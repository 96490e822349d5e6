"""Queue benchmarks: job creation through the API, claim throughput, NOTIFY wake-up latency.

    python -m benchmarks.queue [--jobs N] [--database-url URL] [--no-sync-commit]

Runs against a fresh database created on a real PostgreSQL server (`--database-url` or
`LORAFORGE_BENCH_DATABASE_URL`, an admin URL; else the machine's server on 127.0.0.1:5432; else
an embedded one through `pgserver`), migrated with alembic and dropped at the end. Prints one
JSON line per measurement, each beside a baseline measured in the same process; `ratio` is
always the measured figure divided by the baseline's. Every figure here is bound by commit
latency on a slow or shared disk; `--no-sync-commit` takes the WAL flush out of it:

- `api_enqueue`: jobs created per second through the HTTP API (uvicorn, 4 client threads,
  celery dispatch on the SQLAlchemy broker included) against `jobs.create_job` in one thread.
- `claim_throughput_{1,4,8}`: jobs claimed and completed per second by 1, 4 and 8 threads with
  `JobQueue` (fair share between two tenants, limits) against a plain FIFO `SKIP LOCKED` claim.
- `notify_latency`: submit-to-claim latency of an idle worker woken by LISTEN/NOTIFY against a
  worker polling every second.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue as stdqueue
import random
import secrets
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from sqlalchemy import Engine, insert, text
from sqlalchemy.engine import make_url

from control_plane import base_catalog, db, jobs, tenants
from control_plane import files as file_repo
from control_plane.api.serve import serve_in_thread as serve
from control_plane.db.tables import Job
from control_plane.hyperparameters import Hyperparameters
from control_plane.ids import new_id
from control_plane.queue import JOBS_CHANNEL, JobQueue, QueueListener

LOCAL_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"
SECRET = "dev-insecure-secret"
CLAIMER_COUNTS = (1, 4, 8)
API_CLIENT_THREADS = 4
MINORITY_SHARE = 0.1  # tenant B's share of the claim batch; tenant A has the rest
POLL_INTERVAL_S = 1.0
NO_LIMIT = 1_000_000

_FIFO_CLAIM = text(
    """
    UPDATE jobs SET status = 'running', attempt = attempt + 1, lease_owner = :worker,
                    lease_expires_at = now() + make_interval(secs => 60),
                    started_at = coalesce(started_at, now())
    WHERE id = (
        SELECT id FROM jobs WHERE status = 'queued'
        ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED
    )
    RETURNING id
    """
)


_STARTED = time.monotonic()


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def progress(message: str) -> None:
    """Where the run is, on stderr (stdout carries only the JSON lines)."""
    print(f"[{time.monotonic() - _STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (q in 0..100)."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


# -- the database ------------------------------------------------------------------------------


def _reachable(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=2):
            return True
    except psycopg.OperationalError:
        return False


@contextmanager
def admin_server(explicit_url: str | None) -> Iterator[str]:
    """libpq URL of a maintenance database on a real server (embedded when none answers)."""
    if explicit_url:
        yield db.libpq_url(explicit_url)
        return
    if _reachable(LOCAL_SERVER):
        yield LOCAL_SERVER
        return
    import pgserver

    with tempfile.TemporaryDirectory(prefix="loraforge-bench-pg-") as data_dir:
        server = pgserver.get_server(Path(data_dir), cleanup_mode="stop")  # type: ignore[attr-defined]
        try:
            yield db.libpq_url(str(server.get_uri()))
        finally:
            server.cleanup()


@contextmanager
def bench_database(admin_url: str, *, sync_commit: bool = True) -> Iterator[str]:
    """A fresh database migrated to head; dropped afterwards. Yields its SQLAlchemy URL.

    `sync_commit=False` sets `synchronous_commit = off` on it: commits stop waiting for the WAL
    flush, so that a slow or shared disk does not hide what the queue's statements cost.
    """
    name = f"lf_bench_{secrets.token_hex(4)}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        if not sync_commit:
            conn.execute(
                sql.SQL("ALTER DATABASE {} SET synchronous_commit = off").format(
                    sql.Identifier(name)
                )
            )
    try:
        url = db.normalize_url(
            make_url(admin_url).set(database=name).render_as_string(hide_password=False)
        )
        db.upgrade(url)
        yield url
    finally:
        progress(f"dropping {name} (a checkpoint: slow on a busy disk)")
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def machine_description(engine: Engine) -> str:
    with engine.connect() as conn:
        version = conn.execute(text("SHOW server_version")).scalar()
        sync_commit = conn.execute(text("SHOW synchronous_commit")).scalar()
    return (
        f"{platform.node()} {os.cpu_count()} cpu {platform.machine()}, "
        f"python {platform.python_version()}, postgres {version} "
        f"(synchronous_commit {sync_commit})"
    )


# -- rows --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TenantFixture:
    tenant_id: str
    file_id: str


def make_tenant(engine: Engine, name: str) -> str:
    with engine.begin() as conn:
        return tenants.create_tenant(conn, name, max_running_jobs=NO_LIMIT).id


def make_key(engine: Engine, tenant_id: str) -> str:
    with engine.begin() as conn:
        _, plaintext = tenants.create_api_key(conn, SECRET, tenant_id, role="admin")
    return plaintext


def make_base(engine: Engine, name: str) -> str:
    with engine.begin() as conn:
        return base_catalog.register_base_model(
            conn, base_catalog.NewBaseModel(name=name, source=f"dir:///{name}", source_kind="dir")
        ).id


def make_file_row(engine: Engine, tenant_id: str) -> str:
    """A file row without bytes behind it: the claim never reads the dataset."""
    file_id = new_id("file")
    with engine.begin() as conn:
        file_repo.insert_file(
            conn,
            file_id=file_id,
            tenant_id=tenant_id,
            filename="train.jsonl",
            purpose="fine-tune",
            size=10,
            sha256="0" * 64,
            object_key=f"tenants/{tenant_id}/files/{file_id}",
            format="text",
            examples=1,
            tokens=3,
        )
    return file_id


def new_job(tenant_id: str, base_id: str, file_id: str) -> jobs.NewJob:
    return jobs.NewJob(
        tenant_id=tenant_id,
        base_model_id=base_id,
        training_file_id=file_id,
        validation_file_id=None,
        hyperparameters=Hyperparameters().model_dump(mode="json"),
    )


def create_validating_jobs(
    engine: Engine, fixture: TenantFixture, base_id: str, count: int
) -> list[str]:
    """Jobs waiting in `validating_files`, created through `jobs.create_job` in one transaction."""
    with engine.begin() as conn:
        return [
            jobs.create_job(conn, new_job(fixture.tenant_id, base_id, fixture.file_id))[0].id
            for _ in range(count)
        ]


def insert_queued_jobs(
    engine: Engine, base_id: str, batches: list[tuple[TenantFixture, int]]
) -> None:
    """Bulk-insert jobs straight into `queued`, interleaved between tenants.

    Each job gets its own `created_at` (1 ms apart, as if submitted one by one): one shared
    timestamp would make every ordering fall through to comparing ids, which real queues rarely do.
    """
    hp = Hyperparameters().model_dump(mode="json")
    owners = [fixture for fixture, count in batches for _ in range(count)]
    random.Random(7).shuffle(owners)
    first = datetime.now(UTC) - timedelta(milliseconds=len(owners) + 1000)
    rows = [
        {
            "id": new_id("job"),
            "tenant_id": owner.tenant_id,
            "status": "queued",
            "base_model_id": base_id,
            "training_file_id": owner.file_id,
            "hyperparameters": hp,
            "created_at": first + timedelta(milliseconds=index),
        }
        for index, owner in enumerate(owners)
    ]
    with engine.begin() as conn:
        for start in range(0, len(rows), 500):
            conn.execute(insert(Job), rows[start : start + 500])


def reset_jobs(engine: Engine) -> None:
    """Empty the queue so that every run starts on the same table."""
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE jobs CASCADE"))
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("VACUUM ANALYZE jobs"))


def count_status(engine: Engine, status: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                text("SELECT count(*) FROM jobs WHERE status = :s"), {"s": status}
            ).scalar()
            or 0
        )


# -- 1. jobs created through the API -----------------------------------------------------------


def bench_api_enqueue(url: str, count: int, machine: str, work_dir: Path) -> None:
    import httpx

    from control_plane.api.app import create_app
    from control_plane.services import build_services
    from control_plane.settings import Settings
    from control_plane.storage import LocalObjectStore
    from loraforge import tasks

    settings = Settings(home=work_dir / "home", max_upload_bytes=1024 * 1024)
    services = build_services(
        settings, database_url=url, store=LocalObjectStore(work_dir / "objects")
    )
    tasks.configure(services, broker_url="sqla+" + url)  # nothing consumes: dispatch cost only
    try:
        tenant_id = make_tenant(services.engine, "api-tenant")
        headers = {"Authorization": f"Bearer {make_key(services.engine, tenant_id)}"}
        base_name = "bench-base"
        base_id = make_base(services.engine, base_name)
        with serve(create_app(services)) as base_url:
            with httpx.Client(base_url=base_url, headers=headers, timeout=60) as client:
                dataset = b'{"text": "hello world"}\n{"text": "goodbye world"}\n'
                response = client.post(
                    "/v1/files",
                    files={"file": ("train.jsonl", dataset, "application/jsonl")},
                    data={"purpose": "fine-tune"},
                )
                response.raise_for_status()
                file_id = response.json()["id"]
                body = {"model": base_name, "training_file": file_id}
                # Warm-up (connection pools, kombu's tables), not timed.
                for _ in range(5):
                    client.post("/v1/fine_tuning/jobs", json=body).raise_for_status()

            failures: list[str] = []
            barrier = threading.Barrier(API_CLIENT_THREADS + 1)

            def submit(n: int) -> None:
                with httpx.Client(base_url=base_url, headers=headers, timeout=60) as client:
                    barrier.wait()
                    for _ in range(n):
                        response = client.post("/v1/fine_tuning/jobs", json=body)
                        if response.status_code != 200:
                            failures.append(f"{response.status_code} {response.text[:200]}")

            progress("api_enqueue: through the API")
            shares = [count // API_CLIENT_THREADS] * API_CLIENT_THREADS
            shares[0] += count - sum(shares)
            threads = [threading.Thread(target=submit, args=(n,)) for n in shares]
            for thread in threads:
                thread.start()
            barrier.wait()
            start = time.perf_counter()
            for thread in threads:
                thread.join()
            api_seconds = time.perf_counter() - start
        if failures:
            raise RuntimeError(f"{len(failures)} job creations failed, first: {failures[0]}")

        progress("api_enqueue: baseline")
        start = time.perf_counter()
        for _ in range(count):
            with services.engine.begin() as conn:
                jobs.create_job(conn, new_job(tenant_id, base_id, file_id))
        direct_seconds = time.perf_counter() - start
    finally:
        services.close()
        tasks.celery_app.pool.force_close_all()
    rate, baseline = count / api_seconds, count / direct_seconds
    emit(
        {
            "name": "api_enqueue",
            "jobs": count,
            "jobs_per_s": round(rate, 1),
            "client_threads": API_CLIENT_THREADS,
            "baseline": "control_plane.jobs.create_job, one transaction per job, 1 thread",
            "baseline_jobs_per_s": round(baseline, 1),
            "ratio": round(rate / baseline, 3),
            "machine": machine,
        }
    )


# -- 2. claim throughput -----------------------------------------------------------------------


def drain(
    engine: Engine, threads: int, claim_one: Callable[[JobQueue, str], str | None]
) -> tuple[float, int]:
    """Claim and complete until the queue is empty; each claimer has its own `JobQueue`.

    Returns (seconds, empty claims): claims that found nothing while more jobs than claimers were
    still queued, i.e. not the expected misses at the end of the drain.
    """
    empty_claims = 0
    errors: list[BaseException] = []
    lock = threading.Lock()
    barrier = threading.Barrier(threads + 1)

    def claimer(index: int) -> None:
        nonlocal empty_claims
        worker = f"bench-claimer-{index}"
        queue = JobQueue(engine, max_running_per_tenant=NO_LIMIT)
        barrier.wait()
        try:
            while True:
                job_id = claim_one(queue, worker)
                if job_id is None:
                    remaining = count_status(engine, "queued")
                    if remaining == 0:
                        return
                    if remaining > threads:
                        with lock:
                            empty_claims += 1
                    continue
                if queue.complete(job_id, worker) is None:
                    raise RuntimeError(f"{worker} lost job {job_id}")
        except BaseException as exc:
            errors.append(exc)

    pool = [threading.Thread(target=claimer, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in pool:
        thread.join()
    seconds = time.perf_counter() - start
    if errors:
        raise errors[0]
    return seconds, empty_claims


def minority_share_early(engine: Engine, minority_tenant: str, minority_jobs: int) -> float:
    """Tenant B's share of the first 2 x (its job count) claims: 0.5 is a fair alternation."""
    with engine.connect() as conn:
        owners = (
            conn.execute(
                text(
                    "SELECT j.tenant_id FROM job_events e JOIN jobs j ON j.id = e.job_id "
                    "WHERE e.data->>'status' = 'running' ORDER BY e.id LIMIT :n"
                ),
                {"n": 2 * minority_jobs},
            )
            .scalars()
            .all()
        )
    return float(sum(owner == minority_tenant for owner in owners)) / max(len(owners), 1)


def bench_claims(url: str, count: int, machine: str) -> None:
    engine = db.make_engine(url, pool_size=max(CLAIMER_COUNTS) + 4)
    try:
        base_id = make_base(engine, "claim-base")
        majority, minority = (
            TenantFixture(tenant_id, make_file_row(engine, tenant_id))
            for tenant_id in (make_tenant(engine, "tenant-a"), make_tenant(engine, "tenant-b"))
        )
        minority_jobs = max(1, round(count * MINORITY_SHARE))
        batches = [(majority, count - minority_jobs), (minority, minority_jobs)]

        def fair_claim(queue: JobQueue, worker: str) -> str | None:
            job = queue.claim(worker)
            return job.id if job is not None else None

        def fifo_claim(queue: JobQueue, worker: str) -> str | None:
            with queue.engine.begin() as conn:
                return conn.execute(_FIFO_CLAIM, {"worker": worker}).scalar()

        for threads in CLAIMER_COUNTS:
            results: dict[str, tuple[float, int]] = {}
            fairness = 0.0
            for label, claim_one in (("queue", fair_claim), ("fifo", fifo_claim)):
                progress(f"claim drain: {label}, {threads} thread(s)")
                reset_jobs(engine)
                insert_queued_jobs(engine, base_id, batches)
                results[label] = drain(engine, threads, claim_one)
                if count_status(engine, "succeeded") != count:
                    raise RuntimeError(f"{label} drain with {threads} threads left jobs behind")
                if label == "queue":
                    fairness = minority_share_early(engine, minority.tenant_id, minority_jobs)
            rate = count / results["queue"][0]
            baseline = count / results["fifo"][0]
            emit(
                {
                    "name": f"claim_throughput_{threads}",
                    "jobs": count,
                    "threads": threads,
                    "jobs_per_s": round(rate, 1),
                    "empty_claims": results["queue"][1],
                    "tenants": {"a": count - minority_jobs, "b": minority_jobs},
                    "minority_share_early": round(fairness, 3),
                    "baseline": "FIFO UPDATE ... FOR UPDATE SKIP LOCKED claim + JobQueue.complete",
                    "baseline_jobs_per_s": round(baseline, 1),
                    "ratio": round(rate / baseline, 3),
                    "machine": machine,
                }
            )
        reset_jobs(engine)
    finally:
        engine.dispose()


# -- 3. wake-up latency ------------------------------------------------------------------------


def measure_latency(
    url: str,
    engine: Engine,
    samples: int,
    fixture: TenantFixture,
    base_id: str,
    *,
    notify: bool,
) -> tuple[list[float], int]:
    """Submit-to-claim latencies (ms) for one idle worker, woken by NOTIFY or polling.

    Also returns how many jobs the NOTIFY worker claimed only after its wait timed out (a
    notification that never arrived); always 0 for the polling worker.
    """
    queue = JobQueue(engine, max_running_per_tenant=NO_LIMIT)
    claimed: stdqueue.Queue[tuple[str, float]] = stdqueue.Queue()
    idle = threading.Event()
    stop = threading.Event()
    errors: list[BaseException] = []
    missed_wakeups = 0
    worker = "bench-notify" if notify else "bench-poll"

    def take(job_id: str | None) -> None:
        # The job stays running (no limit applies): completing it would only slow the samples.
        if job_id is not None:
            claimed.put((job_id, time.perf_counter()))

    def listen() -> None:
        nonlocal missed_wakeups
        try:
            with QueueListener(url, channels=(JOBS_CHANNEL,)) as listener:
                while not stop.is_set():
                    idle.set()
                    woken = listener.wait(timeout=5)
                    job = queue.claim(worker)
                    if job is not None and not woken:
                        missed_wakeups += 1
                    take(job.id if job else None)
        except BaseException as exc:
            errors.append(exc)
            idle.set()

    def poll() -> None:
        try:
            while not stop.is_set():
                job = queue.claim(worker)
                take(job.id if job else None)
                if job is None:
                    idle.set()
                    stop.wait(POLL_INTERVAL_S)
        except BaseException as exc:
            errors.append(exc)
            idle.set()

    thread = threading.Thread(target=listen if notify else poll, daemon=True)
    thread.start()
    rng = random.Random(11)
    latencies: list[float] = []
    try:
        for job_id in create_validating_jobs(engine, fixture, base_id, samples):
            idle.wait(30)
            idle.clear()
            if errors:
                raise errors[0]
            # Let the listener block in wait(); submit at a random phase of the poll interval.
            time.sleep(0.01 if notify else rng.uniform(0, POLL_INTERVAL_S))
            t0 = time.perf_counter()
            queue.mark_queued(job_id)
            got, at = claimed.get(timeout=30)
            if got != job_id:
                raise RuntimeError(f"claimed {got}, expected {job_id}")
            latencies.append((at - t0) * 1000)
    finally:
        stop.set()
        thread.join(10)
    return latencies, missed_wakeups


def bench_notify(url: str, samples: int, poll_samples: int, machine: str) -> None:
    engine = db.make_engine(url, pool_size=4)
    try:
        reset_jobs(engine)
        base_id = make_base(engine, "notify-base")
        tenant_id = make_tenant(engine, "tenant-notify")
        fixture = TenantFixture(tenant_id, make_file_row(engine, tenant_id))
        progress("notify_latency")
        woken, missed = measure_latency(url, engine, samples, fixture, base_id, notify=True)
        progress("notify_latency: polling baseline")
        polled, _ = measure_latency(url, engine, poll_samples, fixture, base_id, notify=False)
    finally:
        engine.dispose()
    p50, p99 = percentile(woken, 50), percentile(woken, 99)
    base50, base99 = percentile(polled, 50), percentile(polled, 99)
    emit(
        {
            "name": "notify_latency",
            "jobs": samples,
            "samples": samples,
            "p50_ms": round(p50, 2),
            "p99_ms": round(p99, 2),
            "claims_after_wait_timeout": missed,
            "baseline": f"worker polling every {POLL_INTERVAL_S:g} s",
            "baseline_samples": poll_samples,
            "baseline_p50_ms": round(base50, 2),
            "baseline_p99_ms": round(base99, 2),
            "ratio": round(p50 / base50, 4),
            "ratio_p99": round(p99 / base99, 4),
            "machine": machine,
        }
    )


# -- entry point -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.queue", description=__doc__)
    parser.add_argument(
        "--jobs", type=int, default=2000, help="jobs per API run and per claim drain"
    )
    parser.add_argument("--samples", type=int, default=100, help="NOTIFY latency samples")
    parser.add_argument("--poll-samples", type=int, default=30, help="polling latency samples")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("LORAFORGE_BENCH_DATABASE_URL"),
        help="admin URL of the PostgreSQL server that hosts the throwaway database",
    )
    parser.add_argument(
        "--no-sync-commit",
        action="store_true",
        help="synchronous_commit = off on the throwaway database (measure statements, not fsync)",
    )
    args = parser.parse_args(argv)
    if args.jobs < API_CLIENT_THREADS or args.samples < 1 or args.poll_samples < 1:
        parser.error(f"--jobs must be at least {API_CLIENT_THREADS}; samples at least 1")

    with (
        admin_server(args.database_url) as admin_url,
        bench_database(admin_url, sync_commit=not args.no_sync_commit) as url,
        tempfile.TemporaryDirectory(prefix="loraforge-bench-") as work_dir,
    ):
        engine = db.make_engine(url, pool_size=1)
        machine = machine_description(engine)
        engine.dispose()
        progress(f"database ready; {machine}")
        bench_api_enqueue(url, args.jobs, machine, Path(work_dir))
        bench_claims(url, args.jobs, machine)
        bench_notify(url, args.samples, args.poll_samples, machine)
        progress("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
