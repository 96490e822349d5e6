"""Queue benchmarks: job creation through the API, claim throughput, NOTIFY wake-up latency.

    python -m benchmarks.queue [--jobs N] [--database-url URL] [--no-sync-commit]
    python -m benchmarks.queue --wakeups [--wake-jobs N]   (the idle trainers' measurements)
    python -m benchmarks.queue --scale [--sizes 1000,10000,100000] [--scale-cycles N]
        [--claimer-processes]

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
- `idle_trainer_wakeups` (`--wakeups` runs only this): claims per job, queue-to-claim latency
  and the share of jobs claimed by a trainer already holding their base, of 16 idle trainers
  (half holding each of two bases) asleep among the sleepers (`control_plane.wakeups`, each
  woken alone) for jobs of the two bases queued one at a time, against the same trainers
  listening on the one channel that woke every idle trainer for each job, in alternating rounds.
- `idle_trainer_polls` (also under `--wakeups`): claims per second of 16 idle trainers with
  nothing queued, polling every 30 s with the due pass running every 2 s (revision 0018, as
  celery's beat runs it), against the same trainers polling every 5 s without it; and
  `retry_due_to_claim_{16,1}`: how long after its due time a job that backed off is claimed, by
  16 idle trainers and by one, the same two ways.
- `claim_scale` (`--scale` runs only these): claim + complete latency p50/p99 and throughput at
  1,000 / 10,000 / 100,000 queued jobs over 1,000 tenants (one holding half), 1 and 8 claimers,
  against the plain FIFO claim with its partial index on a twin database without the queue's
  triggers, the same plain claim on a third with the triggers left on (`plain_kept`: the
  bookkeeping, its rows made hot by the FIFO order) and on a fourth that keeps only each tenant's running count and
  served time, one row per tenant updated in place at each claim and finish (`plain_counted`:
  the least bookkeeping that keeps those counts in rows) and on a fifth that makes the same
  writes on rows picked by the job's id (`plain_counted_spread`: the writes without the hot row
  that the FIFO order makes of the tenant holding half the backlog) and on a sixth committed as
  the fair claim commits, without waiting for its WAL flush (`plain_leased`), in alternating rounds,
  each side's CPU per cycle beside it (`cpu_ms_per_job`: the claimers' process and the local
  server's); at the largest size, one claimer, a seventh side runs in the same rounds, the fair
  claim on a twin whose backlog stays at the smallest size (`loraforge_smallest`);
  `claim_scale_targets` the issue's ratios at the largest size, the flat one against that twin
  (and against the smallest size's own run minutes before, the two counted sides' rates against
  the plain claim's, and the p50 against `plain_leased`'s, for reading them);
  `claim_scale_statements` (only
  where the server has `pg_stat_statements` loaded) each statement's time per cycle for
  loraforge and the plain claim at the largest size, 8 claimers; `claim_plan` (the common claim: a line's
  head), `claim_walk_plan` (the walk of the front) and `reap_plan` their EXPLAIN ANALYZE there; `queue_counts` and `tenant_page_after_1000` the
  dashboard's counts and a deep keyset page against counting and an OR-form cursor;
  `metrics_scrape` a scrape's figures and `tenant_page_finished_status` a page of one finished
  status, beside ten finished jobs per queued one, against counting the jobs and the page
  without its index;
  `claim_retry_storm` a claim while every job of the first 200 lines backs off (the walk
  widened) against ranking every claimable job; `heartbeat` 200 running jobs' lease renewals
  (heap-only updates) against the same with the lease's expiry indexed as before;
  `trainer_poll_reap` what a trainer runs before each claim beside 10,000 running jobs when
  another reaped within the interval (`reap_if_due`) against the reap every claim ran before;
  `queue_repair` `loraforge queue repair` of every tenant's row beside the backlog and its
  history (how long writers of jobs wait on it) against `loraforge queue check`.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import multiprocessing
import os
import platform
import queue as stdqueue
import random
import resource
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

import psutil
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
from control_plane.job_status import ACTIVE, JobStatus, as_values
from control_plane.queue import (
    _CLAIM_RANKED,
    _LEASED_COMMIT,
    _LINE_ORDER,
    JOBS_CHANNEL,
    JobQueue,
    QueueListener,
)
from control_plane.records import JobRecord
from control_plane.wakeups import IDLE_POLL_S, WAKE_DUE_INTERVAL_S, WakeUps, wake_due, wake_one

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


def fair_claim(queue: JobQueue, worker: str) -> str | None:
    """One claim by the queue's fair claim: the job's id, or None."""
    job = queue.claim(worker)
    return job.id if job is not None else None


def plain_claim(queue: JobQueue, worker: str) -> str | None:
    """One claim by the plain FIFO claim, in a transaction of its own: the job's id, or None."""
    with queue.engine.begin() as conn:
        return conn.execute(_FIFO_CLAIM, {"worker": worker}).scalar()


# The plain claim committed as the fair claim commits: without waiting for its WAL flush.
_FIFO_CLAIM_LEASED = text(
    _FIFO_CLAIM.text.replace("RETURNING id", f"RETURNING id, {_LEASED_COMMIT}")
)


def plain_leased_claim(queue: JobQueue, worker: str) -> str | None:
    """The plain claim committed without waiting for the disk, as the fair claim commits."""
    with queue.engine.begin() as conn:
        return conn.execute(_FIFO_CLAIM_LEASED, {"worker": worker}).scalar()


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def emit_beside(
    name: str,
    p50_ms: float,
    baseline: str,
    baseline_p50_ms: float,
    machine: str,
    **fields: Any,
) -> None:
    """One path's median beside its baseline's, measured in the same process: `fields` say what
    was measured (sizes, other figures)."""
    emit(
        {
            "name": name,
            **fields,
            "p50_ms": round(p50_ms, 3),
            "baseline": baseline,
            "baseline_p50_ms": round(baseline_p50_ms, 3),
            "ratio": round(p50_ms / baseline_p50_ms, 4),
            "machine": machine,
        }
    )


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


def add_database_url_argument(parser: argparse.ArgumentParser) -> None:
    """`--database-url`: the server `admin_server` uses instead of finding one."""
    parser.add_argument(
        "--database-url",
        default=os.environ.get("LORAFORGE_BENCH_DATABASE_URL"),
        help="admin URL of the PostgreSQL server that hosts the throwaway databases",
    )


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


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


def machine_description(engine: Engine) -> str:
    with engine.connect() as conn:
        version = conn.execute(text("SHOW server_version")).scalar()
        sync_commit = conn.execute(text("SHOW synchronous_commit")).scalar()
    return (
        f"{platform.node()} {os.cpu_count()} cpu {platform.machine()} ({cpu_model()}), "
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

        for threads in CLAIMER_COUNTS:
            results: dict[str, tuple[float, int]] = {}
            fairness = 0.0
            for label, claim_one in (("queue", fair_claim), ("fifo", plain_claim)):
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


# -- 3b. idle trainers woken by a queued job ----------------------------------------------------

WAKE_TRAINERS = 16
WAKE_IDLE_WAIT_S = 60.0  # long: every claim counted below follows a wake-up, none a timeout
WAKE_ROUNDS = 2  # alternating rounds per side


class _IdleTrainer(threading.Thread):
    """A trainer's loop as `JobRunner.run_forever` runs it, holding `resident` (a base's id),
    each job completed at once: asleep among the sleepers (`sleepers`: `WakeUps`), or, as before
    revision 0017, listening on the one channel every idle trainer listened on (no sleeper
    stands, so each job notifies it)."""

    def __init__(
        self,
        engine: Engine,
        url: str,
        name: str,
        resident: str,
        *,
        sleepers: bool,
        idle_wait: float = WAKE_IDLE_WAIT_S,
    ) -> None:
        super().__init__(daemon=True)
        self.queue = JobQueue(engine, max_running_per_tenant=NO_LIMIT)
        self.engine, self.url, self.name, self.sleepers = engine, url, name, sleepers
        self.resident, self.idle_wait = resident, idle_wait
        self.claims = 0
        self.claimed: dict[str, float] = {}
        self.claimed_at: dict[str, float] = {}  # the same, as the wall clock (time.time)
        self.on_resident = 0  # jobs claimed of the base it holds (no base to load)
        self.stop = threading.Event()
        self.errors: list[BaseException] = []

    def _claim(self) -> JobRecord | None:
        job = self.queue.claim(self.name, prefer_base_model_id=self.resident)
        self.claims += 1
        if job is not None:
            self.claimed[job.id] = time.perf_counter()
            self.claimed_at[job.id] = time.time()
            self.on_resident += job.base_model_id == self.resident
        return job

    def run(self) -> None:
        try:
            if self.sleepers:
                self._run_asleep()
            else:
                self._run_listening()
        except BaseException as exc:
            self.errors.append(exc)

    def _run_asleep(self) -> None:
        with WakeUps(self.engine, self.url, self.name) as wakeups:
            while not self.stop.is_set():
                job = self._claim()
                if job is None:
                    wakeups.sleep(self.idle_wait, self.resident)
                    continue
                wakeups.took(job)
                self.queue.complete(job.id, self.name)

    def _run_listening(self) -> None:
        with QueueListener(self.url, channels=(JOBS_CHANNEL,)) as listener:
            while not self.stop.is_set():
                job = self._claim()
                if job is None:
                    listener.wait(self.idle_wait)
                    continue
                self.queue.complete(job.id, self.name)


def _settled(trainers: list[_IdleTrainer], engine: Engine, sleepers: bool) -> None:
    """Until every trainer is back asleep: no claim for 100 ms (and every sleeper's row back)."""
    deadline = time.monotonic() + 30
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        claims = sum(t.claims for t in trainers)
        with engine.connect() as conn:
            standing = conn.execute(text("SELECT count(*) FROM queue_sleepers")).scalar_one()
        if claims != last or (sleepers and standing != len(trainers)):
            last, since = claims, time.monotonic()
        elif time.monotonic() - since >= 0.1:
            return
        time.sleep(0.01)
    raise RuntimeError("idle trainers did not settle")


@dataclass
class _WakeRound:
    claims: int
    latencies: list[float]
    on_resident: int


def _wake_round(
    url: str,
    engine: Engine,
    fixture: TenantFixture,
    bases: tuple[str, str],
    jobs_count: int,
    *,
    sleepers: bool,
) -> _WakeRound:
    """WAKE_TRAINERS idle trainers, half holding each base, and `jobs_count` jobs queued one at
    a time for the two bases in turn: the claims made, each job's queue-to-claim latency (ms),
    and how many jobs a trainer holding their base claimed."""
    queue = JobQueue(engine, max_running_per_tenant=NO_LIMIT)
    label = "asleep" if sleepers else "listening"
    trainers = [
        _IdleTrainer(engine, url, f"bench-{label}-{n}", bases[n % 2], sleepers=sleepers)
        for n in range(WAKE_TRAINERS)
    ]
    for trainer in trainers:
        trainer.start()
    latencies: list[float] = []
    try:
        _settled(trainers, engine, sleepers)
        before = sum(t.claims for t in trainers)
        created = [
            create_validating_jobs(engine, fixture, base, (jobs_count + 1 - n) // 2)
            for n, base in enumerate(bases)
        ]
        for job_id in (j for pair in itertools.zip_longest(*created) for j in pair if j):
            t0 = time.perf_counter()
            queue.mark_queued(job_id)
            deadline = time.monotonic() + 30
            while not any(job_id in t.claimed for t in trainers):
                if time.monotonic() > deadline or any(t.errors for t in trainers):
                    raise RuntimeError(f"job {job_id} not claimed: {[t.errors for t in trainers]}")
                time.sleep(0.0005)
            at = next(t.claimed[job_id] for t in trainers if job_id in t.claimed)
            latencies.append((at - t0) * 1000)
            _settled(trainers, engine, sleepers)
        claims = sum(t.claims for t in trainers) - before
        return _WakeRound(claims, latencies, sum(t.on_resident for t in trainers))
    finally:
        for trainer in trainers:
            trainer.stop.set()
        for _ in trainers:
            wake_one(engine, None)  # a sleeper out of its wait finds `stop` set
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_notify(:ch, '')"), {"ch": JOBS_CHANNEL})
            conn.commit()
        for trainer in trainers:
            trainer.join(10)


def bench_idle_wakeups(url: str, jobs_count: int, rounds: int, machine: str) -> None:
    engine = db.make_engine(url, pool_size=WAKE_TRAINERS + 4)
    try:
        reset_jobs(engine)
        bases = (make_base(engine, "wake-base-a"), make_base(engine, "wake-base-b"))
        tenant_id = make_tenant(engine, "tenant-wake")
        fixture = TenantFixture(tenant_id, make_file_row(engine, tenant_id))
        runs: dict[bool, list[_WakeRound]] = {True: [], False: []}
        for n in range(rounds):
            for sleepers in (True, False):
                side = "asleep" if sleepers else "listening"
                progress(f"idle_trainer_wakeups: round {n + 1}, {side}")
                runs[sleepers].append(
                    _wake_round(url, engine, fixture, bases, jobs_count, sleepers=sleepers)
                )
    finally:
        engine.dispose()
    jobs_total = jobs_count * rounds

    def figures(side: list[_WakeRound]) -> tuple[float, list[float], float]:
        latencies = [ms for r in side for ms in r.latencies]
        claims = sum(r.claims for r in side) / jobs_total
        return claims, latencies, sum(r.on_resident for r in side) / jobs_total

    per_job, latencies, resident = figures(runs[True])
    before, before_latencies, before_resident = figures(runs[False])
    emit(
        {
            "name": "idle_trainer_wakeups",
            "idle_trainers": WAKE_TRAINERS,
            "bases": 2,
            "jobs": jobs_total,
            "claims_per_job": round(per_job, 3),
            "claimed_on_resident_base": round(resident, 3),
            "p50_ms": round(percentile(latencies, 50), 2),
            "p99_ms": round(percentile(latencies, 99), 2),
            "baseline": "every idle trainer listening on one channel, all woken by each job "
            "(before revision 0017)",
            "baseline_claims_per_job": round(before, 3),
            "baseline_claimed_on_resident_base": round(before_resident, 3),
            "baseline_p50_ms": round(percentile(before_latencies, 50), 2),
            "baseline_p99_ms": round(percentile(before_latencies, 99), 2),
            "ratio": round(per_job / before, 4),
            "ratio_p50": round(percentile(latencies, 50) / percentile(before_latencies, 50), 4),
            "machine": machine,
        }
    )


# -- 3c. idle trainers' polls, and retries announced when due -----------------------------------

POLL_TRAINERS = 16
POLL_BEFORE_S = 5.0  # the idle poll before revision 0018, when no pass announced a retry
POLL_RETRIES = 10  # jobs backing off, one at a time, per side and number of trainers
POLL_BACKOFF_S = 0.5


class _DuePasses(threading.Thread):
    """celery's beat as the benchmark runs it: `wake_due` every WAKE_DUE_INTERVAL_S."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(daemon=True)
        self.engine = engine
        self.stop = threading.Event()
        self.woken = 0

    def run(self) -> None:
        while not self.stop.wait(WAKE_DUE_INTERVAL_S):
            self.woken += wake_due(self.engine)


@dataclass
class _PollRound:
    idle_claims_per_s: float | None
    delays_s: list[float]  # each retry's claim after its due time


def _poll_round(
    url: str, engine: Engine, fixture: TenantFixture, base: str, count: int, *, after: bool
) -> _PollRound:
    """`count` idle trainers asleep among the sleepers, polling every IDLE_POLL_S with the due
    pass running (`after`) or every POLL_BEFORE_S without it. With more than one trainer,
    started one poll apart in turn (as trainers start at any time), then their claims counted
    over one poll with nothing queued. Then POLL_RETRIES jobs backing off, one at a time: how
    long after its due time a trainer claimed each, each queued a random while (the same on
    both sides) after the trainers settled, so that its due time falls anywhere in their polls
    and the passes."""
    poll = IDLE_POLL_S if after else POLL_BEFORE_S
    label = "after" if after else "before"
    trainers = [
        _IdleTrainer(engine, url, f"poll-{label}-{count}-{n}", base, sleepers=True, idle_wait=poll)
        for n in range(count)
    ]
    passes = _DuePasses(engine)
    if after:
        passes.start()
    idle_rate: float | None = None
    delays: list[float] = []
    try:
        for trainer in trainers:
            trainer.start()
            if count > 1:
                time.sleep(poll / count)
        _settled(trainers, engine, True)
        if count > 1:
            before, t0 = sum(t.claims for t in trainers), time.perf_counter()
            time.sleep(poll)
            idle_rate = (sum(t.claims for t in trainers) - before) / (time.perf_counter() - t0)
        offsets = random.Random(11)
        for job_id in create_validating_jobs(engine, fixture, base, POLL_RETRIES):
            time.sleep(offsets.uniform(0, POLL_BEFORE_S))
            # Run once and failed: queued for its next attempt, backing off (no wake-up now).
            with engine.begin() as conn:
                due = conn.execute(
                    text(
                        "UPDATE jobs SET status = 'queued', attempt = 1, "
                        "run_after = now() + make_interval(secs => :backoff) "
                        "WHERE id = :id RETURNING extract(epoch FROM run_after)"
                    ),
                    {"id": job_id, "backoff": POLL_BACKOFF_S},
                ).scalar_one()
            deadline = time.monotonic() + poll + 30
            while not any(job_id in t.claimed_at for t in trainers):
                if time.monotonic() > deadline or any(t.errors for t in trainers):
                    raise RuntimeError(
                        f"retry {job_id} not claimed: {[t.errors for t in trainers]}"
                    )
                time.sleep(0.005)
            at = next(t.claimed_at[job_id] for t in trainers if job_id in t.claimed_at)
            delays.append(at - float(due))
            _settled(trainers, engine, True)
        return _PollRound(idle_rate, delays)
    finally:
        passes.stop.set()
        for trainer in trainers:
            trainer.stop.set()
        for _ in trainers:
            wake_one(engine, None)
        for trainer in trainers:
            trainer.join(10)
        if after:
            passes.join(10)


def bench_idle_polls(url: str, machine: str) -> None:
    engine = db.make_engine(url, pool_size=POLL_TRAINERS + 4)
    try:
        reset_jobs(engine)
        base = make_base(engine, "poll-base")
        tenant_id = make_tenant(engine, "tenant-poll")
        fixture = TenantFixture(tenant_id, make_file_row(engine, tenant_id))
        runs: dict[tuple[int, bool], _PollRound] = {}
        for count in (POLL_TRAINERS, 1):
            for after in (True, False):
                side = "polling every 30 s, the due pass on" if after else "polling every 5 s"
                progress(f"idle_trainer_polls: {count} trainer(s), {side}")
                runs[count, after] = _poll_round(url, engine, fixture, base, count, after=after)
    finally:
        engine.dispose()
    idle, idle_before = runs[POLL_TRAINERS, True], runs[POLL_TRAINERS, False]
    assert idle.idle_claims_per_s is not None and idle_before.idle_claims_per_s is not None
    emit(
        {
            "name": "idle_trainer_polls",
            "idle_trainers": POLL_TRAINERS,
            "poll_s": IDLE_POLL_S,
            "due_pass_every_s": WAKE_DUE_INTERVAL_S,
            "claims_per_s": round(idle.idle_claims_per_s, 3),
            "baseline": f"the same trainers polling every {POLL_BEFORE_S:g} s, no due pass "
            "(before revision 0018)",
            "baseline_claims_per_s": round(idle_before.idle_claims_per_s, 3),
            "ratio": round(idle.idle_claims_per_s / idle_before.idle_claims_per_s, 4),
            "machine": machine,
        }
    )
    for count in (POLL_TRAINERS, 1):
        delays, before = runs[count, True].delays_s, runs[count, False].delays_s
        emit(
            {
                "name": f"retry_due_to_claim_{count}",
                "idle_trainers": count,
                "retries": POLL_RETRIES,
                "backoff_s": POLL_BACKOFF_S,
                "p50_s": round(percentile(delays, 50), 3),
                "max_s": round(max(delays), 3),
                "baseline": f"polling every {POLL_BEFORE_S:g} s, no due pass",
                "baseline_p50_s": round(percentile(before, 50), 3),
                "baseline_max_s": round(max(before), 3),
                "ratio": round(percentile(delays, 50) / percentile(before, 50), 4),
                "machine": machine,
            }
        )


# -- 4. the claim at platform scale ------------------------------------------------------------

SCALE_TENANTS = 1000
SCALE_SIZES = (1_000, 10_000, 100_000)
SCALE_CLAIMERS = (1, 8)
SCALE_LIMIT = 4  # every tenant's running limit (JobQueue's default limit; tenants set none)

_PLAIN_INDEX = "CREATE INDEX ix_jobs_plain_fifo ON jobs (created_at) WHERE status = 'queued'"

# The least bookkeeping that keeps, in rows, what the fair order and the limits read: each
# tenant's running count and served time, which every claim and every finish changes. One row
# per tenant, no index but its key (so every update is HOT), written in place by one statement
# in a row trigger; no line order, no queued count, nothing enforced. `{row}` is the row each
# move writes: the job's tenant's (`plain_counted`); or, for `plain_counted_spread`, a tenant's
# picked by the job's id, so that the same writes land on rows spread as the fair claim spreads
# its claims, where the FIFO claim sends every other claim to the tenant holding half the
# backlog and queues those claims and their finishes on that one row.
_ACTIVE_SQL = ", ".join(f"'{status}'" for status in as_values(ACTIVE))
_COUNTED_ONLY = f"""
INSERT INTO tenant_queue_stats (tenant_id) SELECT id FROM tenants;
CREATE FUNCTION bench_count_running() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  UPDATE tenant_queue_stats
     SET running = running + (NEW.status IN ({_ACTIVE_SQL}))::int
                           - (OLD.status IN ({_ACTIVE_SQL}))::int,
         last_served_at = CASE WHEN OLD.status = '{JobStatus.QUEUED}'
                                AND NEW.status = '{JobStatus.RUNNING}'
                               THEN clock_timestamp() ELSE last_served_at END
   WHERE tenant_id = {{row}};
  RETURN NULL;
END $$;
CREATE TRIGGER bench_count_running AFTER UPDATE ON jobs FOR EACH ROW
  WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION bench_count_running();
"""
_COUNTED_ROW = {
    "plain_counted": "NEW.tenant_id",
    "plain_counted_spread": "'tenant-' || lpad(mod(abs(hashtext(NEW.id)), "
    f"{SCALE_TENANTS})::text, 4, '0')",
}

# The fair claim's own sides: `loraforge` at each size, and `loraforge_smallest`, its twin whose
# backlog stays at the smallest size, run in the same alternating rounds at the largest size
# (one claimer), so that the flat target compares p50s measured side by side, not minutes apart
# on a machine whose speed drifts (in one run the plain claim's own p50 read 1.89x at 100,000
# what it read at 1,000).
_FAIR_SIDES = ("loraforge", "loraforge_smallest")

# The sides beside the plain claim, each line of `claim_scale` says what they are.
_COMPARED = {
    "plain_kept": "the same plain claim with the queue's bookkeeping triggers left on (no fair "
    "share, no limits)",
    "plain_counted": "the same plain claim keeping only each tenant's running count and served "
    "time (one row per tenant, updated in place at each claim and finish; no order, no limit)",
    "plain_counted_spread": "the same writes as plain_counted, each on the row of a tenant "
    "picked by the job's id (no row is hot)",
    "plain_leased": "the same plain claim committed as the fair claim commits, without waiting "
    "for its WAL flush (the finish still waits)",
}

# `count` jobs over the 1,000 tenants in one statement: tenant 0 holds half, the other 999 share
# the rest; ids and created_at follow `start` (1 ms apart), so top-ups queue behind the backlog.
_FILL = text(
    """
    INSERT INTO jobs (id, tenant_id, status, base_model_id, training_file_id, hyperparameters,
                      created_at)
    SELECT 'ftjob-' || lpad(g::text, 10, '0'),
           'tenant-' || lpad((CASE WHEN g % 2 = 0 THEN 0 ELSE 1 + (g / 2) % (CAST(:tenants AS int) - 1) END)::text,
                             4, '0'),
           'queued', :base, :file, '{}'::jsonb,
           timestamptz '2026-01-01' + g * interval '1 ms'
    FROM generate_series(CAST(:start AS bigint), CAST(:start AS bigint) + :count - 1) AS g
    """
)


@dataclass
class ScaleSide:
    """One side of the comparison: its database and how it claims one job."""

    label: str
    engine: Engine
    base_id: str
    claim_one: Callable[[JobQueue, str], str | None]
    next_id: int = 0
    latencies: list[float] | None = None
    seconds: float = 0.0
    cycles: int = 0
    client_cpu: float = 0.0
    server_cpu: float | None = 0.0
    warm_cycles: int = 0  # cycles run but not measured (a claimer process's first)

    def reset(self) -> None:
        self.latencies, self.seconds, self.cycles = [], 0.0, 0
        self.client_cpu, self.server_cpu, self.warm_cycles = 0.0, 0.0, 0

    def cpu_ms_per_job(self) -> dict[str, float | None]:
        """CPU per claim + complete cycle: this process's (the claimers' Python, psycopg and
        SQLAlchemy) and the PostgreSQL server's (None when the server is not on this machine)."""
        server = None if self.server_cpu is None else round(1000 * self.server_cpu / self.cycles, 3)
        return {"client": round(1000 * self.client_cpu / self.cycles, 3), "server": server}


def _client_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _server_cpu_seconds() -> float | None:
    """CPU seconds used so far by the `postgres` processes on this machine (backends, WAL
    writer, checkpointer, autovacuum), or None when none is visible (a server elsewhere). A
    backend that exited (a claimer process's connection, closed at the end of its round) counts
    too: the postmaster reaped it, and its CPU is in the postmaster's children's times. Only
    one side runs at a time, so a round's difference is that side's; another database's work on
    the same server at the same time would count too."""
    total, seen = 0.0, False
    for proc in psutil.process_iter(["name", "cpu_times"]):
        times = proc.info["cpu_times"]
        if proc.info["name"] == "postgres" and times is not None:
            total += times.user + times.system + times.children_user + times.children_system
            seen = True
    return total if seen else None


def _scale_schema(engine: Engine, label: str) -> tuple[str, str]:
    """1,000 tenants, one base and one file row. Every side but the fair claim's (`loraforge`
    and `loraforge_smallest`) claims with the plain FIFO claim and has its partial index;
    `plain` without the queue's triggers (a FIFO claim needs no bookkeeping), `plain_kept` with
    them left on (the bookkeeping's own cost), `plain_counted` with them off and only the tenants' running counts and served times kept,
    `plain_counted_spread` the same writes on rows picked by the job's id (no hot row)."""
    base_id = make_base(engine, "scale-base")
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO tenants (id, name) SELECT 'tenant-' || lpad(n::text, 4, '0'), "
                "'scale-' || n FROM generate_series(0, :n - 1) AS n"
            ),
            {"n": SCALE_TENANTS},
        )
        if label not in _FAIR_SIDES and label != "plain_kept":
            conn.execute(text("ALTER TABLE jobs DISABLE TRIGGER USER"))
            # A job's finish writes its webhook events on every side (revision 0022): it is the
            # finish's, as `JobQueue.complete` is the same code on every side, not the claim's.
            conn.execute(text("ALTER TABLE jobs ENABLE TRIGGER webhook_job_finished"))
        if label not in _FAIR_SIDES:
            conn.execute(text(_PLAIN_INDEX))
        if label in _COUNTED_ROW:
            conn.exec_driver_sql(_COUNTED_ONLY.format(row=_COUNTED_ROW[label]))
    return base_id, make_file_row(engine, "tenant-0000")


def _fill(side: ScaleSide, file_id: str, count: int) -> None:
    with side.engine.begin() as conn:
        conn.execute(
            _FILL,
            {
                "tenants": SCALE_TENANTS,
                "base": side.base_id,
                "file": file_id,
                "start": side.next_id,
                "count": count,
            },
        )
    side.next_id += count


def _vacuum(engine: Engine) -> None:
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("VACUUM ANALYZE"))


WARM_CYCLES = 2  # a claimer's first cycles: its connection, the prepared statements


def _backlog(side: ScaleSide, file_id: str, size: int) -> None:
    """An empty queue filled with `size` jobs, vacuumed and analysed."""
    with side.engine.begin() as conn:
        conn.execute(text("TRUNCATE jobs CASCADE"))
    _fill(side, file_id, size)
    _vacuum(side.engine)


def _warm(side: ScaleSide, file_id: str, claimers: int) -> None:
    """WARM_CYCLES cycles on each of `claimers` threads (the pool's connections, the prepared
    statements), topped up, and the side's figures cleared."""
    side.reset()
    _fill(side, file_id, _round(side, claimers, WARM_CYCLES, processes=False))
    side.reset()


def _beside_smallest(
    beside: dict[str, float] | None, ours: dict[str, Any], smallest: int
) -> dict[str, Any]:
    """The fair claim's twin at the smallest backlog, run in the same rounds (largest size,
    one claimer, only): its p50 and rate, and the fair claim's against them."""
    if beside is None:
        return {}
    return {
        "loraforge_smallest": f"the fair claim on a twin database whose backlog stays at "
        f"{smallest:,} queued, in the same alternating rounds",
        "loraforge_smallest_p50_ms": round(beside["p50_ms"], 2),
        "loraforge_smallest_jobs_per_s": round(beside["jobs_per_s"], 1),
        "ratio_vs_loraforge_smallest": round(ours["p50_ms"] / beside["p50_ms"], 3),
        "ratio_throughput_vs_loraforge_smallest": round(
            ours["jobs_per_s"] / beside["jobs_per_s"], 3
        ),
    }


def _claim_loop(side: ScaleSide, queue: JobQueue, worker: str, cycles: int) -> list[float]:
    """`cycles` claim + complete cycles by one claimer; each cycle's latency in ms."""
    latencies = []
    for _ in range(cycles):
        t0 = time.perf_counter()
        job_id = side.claim_one(queue, worker)
        if job_id is None:
            raise RuntimeError(f"{side.label}: empty claim with a backlog")
        if queue.complete(job_id, worker) is None:
            raise RuntimeError(f"{worker} lost job {job_id}")
        latencies.append((time.perf_counter() - t0) * 1000)
    return latencies


def _round(side: ScaleSide, claimers: int, per_claimer: int, *, processes: bool) -> int:
    """`per_claimer` cycles on each of `claimers` threads of this process, or of processes of
    their own; latencies in ms. Returns how many jobs it claimed (warm-up cycles included)."""
    if processes:
        return _round_in_processes(side, claimers, per_claimer)
    errors: list[BaseException] = []
    latencies: list[list[float]] = [[] for _ in range(claimers)]
    barrier = threading.Barrier(claimers + 1)

    def claimer(index: int) -> None:
        queue = JobQueue(side.engine, max_running_per_tenant=SCALE_LIMIT)
        barrier.wait()
        try:
            latencies[index] = _claim_loop(
                side, queue, f"{side.label}-claimer-{index}", per_claimer
            )
        except BaseException as exc:
            errors.append(exc)
            raise

    pool = [threading.Thread(target=claimer, args=(i,)) for i in range(claimers)]
    for thread in pool:
        thread.start()
    server_before, client_before = _server_cpu_seconds(), _client_cpu_seconds()
    barrier.wait()
    start = time.perf_counter()
    for thread in pool:
        thread.join()
    elapsed = time.perf_counter() - start
    client = _client_cpu_seconds() - client_before
    if errors:
        raise errors[0]
    _count_round(side, elapsed, client, server_before, latencies)
    return claimers * per_claimer


def _count_round(
    side: ScaleSide,
    elapsed: float,
    client_cpu: float,
    server_before: float | None,
    latencies: list[list[float]],
) -> None:
    side.seconds += elapsed
    side.client_cpu += client_cpu
    server_after = _server_cpu_seconds()
    if side.server_cpu is None or server_before is None or server_after is None:
        side.server_cpu = None
    else:
        side.server_cpu += server_after - server_before
    assert side.latencies is not None
    for own in latencies:
        side.latencies.extend(own)
        side.cycles += len(own)


def _claimer_process(
    side: ScaleSide, url: str, index: int, per_claimer: int, start: Any, results: Any, release: Any
) -> None:
    """One claimer in a process of its own (forked: of `side` it reads the label and the claim,
    none of the parent's connections), as trainers claim: its own engine and interpreter, no
    lock shared with the other claimers. Reports (ready), then (end time, its CPU, latencies),
    or what failed."""
    engine = db.make_engine(url, pool_size=1)
    worker = f"{side.label}-process-{index}"
    try:
        queue = JobQueue(engine, max_running_per_tenant=SCALE_LIMIT)
        _claim_loop(side, queue, worker, WARM_CYCLES)
        results.put(None)
        start.wait()
        before = _client_cpu_seconds()
        latencies = _claim_loop(side, queue, worker, per_claimer)
        results.put((time.monotonic(), _client_cpu_seconds() - before, latencies))
    except BaseException as exc:
        results.put(f"{worker}: {exc!r}")
    finally:
        release.wait()
        engine.dispose()


def _round_in_processes(side: ScaleSide, claimers: int, per_claimer: int) -> int:
    context = multiprocessing.get_context("fork")
    start, release, results = context.Event(), context.Event(), context.Queue()
    url = side.engine.url.render_as_string(hide_password=False)
    pool = [
        context.Process(
            target=_claimer_process,
            args=(side, url, index, per_claimer, start, results, release),
        )
        for index in range(claimers)
    ]
    for process in pool:
        process.start()
    try:
        failed = [ready for ready in (results.get() for _ in pool) if ready is not None]
        if failed:
            raise RuntimeError("; ".join(failed))
        server_before = _server_cpu_seconds()
        started = time.monotonic()
        start.set()
        reports = [results.get() for _ in pool]
        failed = [report for report in reports if isinstance(report, str)]
        if failed:
            raise RuntimeError("; ".join(failed))
        elapsed = max(report[0] for report in reports) - started
        client = sum(report[1] for report in reports)
        _count_round(side, elapsed, client, server_before, [report[2] for report in reports])
    finally:
        start.set()
        release.set()
        for process in pool:
            process.join()
    side.warm_cycles += claimers * WARM_CYCLES
    return claimers * (WARM_CYCLES + per_claimer)


def _track_statements(admin_url: str, urls: tuple[str, ...]) -> bool:
    """Where the server has `pg_stat_statements` loaded (`shared_preload_libraries`) and the
    benchmark may read it (a superuser): track every statement, the triggers' too, on the
    throwaway databases; their sessions start after this. False, and nothing set, elsewhere."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        loaded = "pg_stat_statements" in str(
            conn.execute("SHOW shared_preload_libraries").fetchone()
        )
        superuser = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
        if not loaded or not (superuser.fetchone() or (False,))[0]:
            progress("no per-statement figures: pg_stat_statements is not loaded here")
            return False
        for url in urls:
            name = sql.Identifier(make_url(url).database or "")
            conn.execute(
                sql.SQL("ALTER DATABASE {} SET pg_stat_statements.track = 'all'").format(name)
            )
    with psycopg.connect(db.libpq_url(urls[0]), autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    return True


def _reset_statements(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(text("SELECT pg_stat_statements_reset()"))


def emit_statements(sides: list[ScaleSide], size: int, claimers: int, machine: str) -> None:
    """Per claim + complete cycle, each statement's calls and time inside the server (the
    triggers' statements apart, `nested`) since `_reset_statements`, the heaviest first. Every
    cycle counts, a claimer process's unmeasured first ones too."""
    per_side = {}
    with sides[0].engine.connect() as conn:
        for side in sides:
            rows = conn.execute(
                text(
                    "SELECT calls, total_exec_time, NOT toplevel AS nested, "
                    "regexp_replace(left(query, 200), '\\s+', ' ', 'g') AS query "
                    "FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid "
                    "WHERE d.datname = :name ORDER BY total_exec_time DESC LIMIT 8"
                ),
                {"name": side.engine.url.database},
            ).all()
            cycles = side.cycles + side.warm_cycles
            per_side[side.label] = [
                {
                    "statement": row.query[:90],
                    "nested": row.nested,
                    "calls_per_cycle": round(row.calls / cycles, 2),
                    "us_per_cycle": round(1000 * row.total_exec_time / cycles, 1),
                }
                for row in rows
            ]
    emit(
        {
            "name": "claim_scale_statements",
            "queued": size,
            "claimers": claimers,
            "what": "time inside the server per claim + complete cycle, by statement "
            "(pg_stat_statements, track all): wall time, lock waits and the CPU the claimers "
            "share included; a nested statement's time is inside its caller's too",
            **per_side,
            "machine": machine,
        }
    )


def _plan_lines(node: dict[str, Any], depth: int = 0) -> list[str]:
    """An EXPLAIN (FORMAT JSON) plan as indented lines: node, relation/index, rows, loops, ms."""
    where = " ".join(
        str(node[key]) for key in ("Relation Name", "Index Name", "CTE Name") if key in node
    )
    line = (
        f"{'  ' * depth}{node['Node Type']} {where} rows={node.get('Actual Rows')} "
        f"loops={node.get('Actual Loops')} ms={node.get('Actual Total Time')}"
    )
    return [line] + [
        sub for child in node.get("Plans", []) for sub in _plan_lines(child, depth + 1)
    ]


def bench_claim_scale(
    admin_url: str,
    sizes: tuple[int, ...],
    cycles: int,
    rounds: int,
    machine: str,
    sync_commit: bool,
    processes: bool = False,
) -> None:
    """Claim + complete latency and throughput at each backlog size, 1 and 8 claimers, against
    the plain FIFO claim with its partial index on a twin database, in alternating rounds (a
    busy machine slows both alike); each round's claimed jobs are topped up after it, so the
    backlog stays within one round of its size."""

    with (
        bench_database(admin_url, sync_commit=sync_commit) as lf_url,
        bench_database(admin_url, sync_commit=sync_commit) as plain_url,
        bench_database(admin_url, sync_commit=sync_commit) as kept_url,
        bench_database(admin_url, sync_commit=sync_commit) as counted_url,
        bench_database(admin_url, sync_commit=sync_commit) as spread_url,
        bench_database(admin_url, sync_commit=sync_commit) as leased_url,
        bench_database(admin_url, sync_commit=sync_commit) as smallest_url,
    ):
        pool = max(SCALE_CLAIMERS) + 4
        urls = (lf_url, plain_url, kept_url, counted_url, spread_url, leased_url, smallest_url)
        statements = _track_statements(admin_url, urls)
        sides = []
        files = {}
        for label, url, claim_one in (
            ("loraforge", lf_url, fair_claim),
            ("plain", plain_url, plain_claim),
            ("plain_kept", kept_url, plain_claim),
            ("plain_counted", counted_url, plain_claim),
            ("plain_counted_spread", spread_url, plain_claim),
            ("plain_leased", leased_url, plain_leased_claim),
            ("loraforge_smallest", smallest_url, fair_claim),
        ):
            engine = db.make_engine(url, pool_size=pool)
            base_id, file_id = _scale_schema(engine, label)
            sides.append(ScaleSide(label, engine, base_id, claim_one))
            files[label] = file_id
        lf, small_side = sides[0], sides[-1]
        results: dict[tuple[int, int], dict[str, Any]] = {}
        beside_smallest: dict[str, float] | None = None  # the twin's, once it ran
        try:
            for size in sizes:
                for claimers in SCALE_CLAIMERS:
                    # The smallest backlog's twin runs beside the others at the largest size,
                    # one claimer (the flat target's), only: a round there claims 200 jobs, and
                    # 8 claimers would leave its 1,000 nothing but one tenant's, at its limit.
                    beside = (size, claimers) == (max(sizes), min(SCALE_CLAIMERS))
                    running = sides if beside else sides[:-1]
                    per_round = max(1, min(cycles, size // 4) // (rounds * claimers))
                    progress(f"claim_scale: {size} queued, {claimers} claimer(s)")
                    for side in running:
                        backlog = min(sizes) if side is small_side else size
                        _backlog(side, files[side.label], backlog)
                        _warm(side, files[side.label], claimers)
                    traced = statements and (size, claimers) == (max(sizes), max(SCALE_CLAIMERS))
                    if traced:
                        _reset_statements(lf.engine)
                    for _ in range(rounds):
                        for side in running:
                            claimed = _round(side, claimers, per_round, processes=processes)
                            _fill(side, files[side.label], claimed)
                    if beside:
                        beside_smallest = {
                            "p50_ms": percentile(small_side.latencies or [], 50),
                            "jobs_per_s": small_side.cycles / small_side.seconds,
                        }
                    if traced:
                        emit_statements(sides[:2], size, claimers, machine)
                    figures: dict[str, dict[str, Any]] = {
                        side.label: {
                            "p50_ms": percentile(side.latencies or [], 50),
                            "p99_ms": percentile(side.latencies or [], 99),
                            "jobs_per_s": side.cycles / side.seconds,
                            "cpu_ms_per_job": side.cpu_ms_per_job(),
                        }
                        for side in running
                        if side is not small_side
                    }
                    ours, floor = figures["loraforge"], figures["plain"]
                    results[(size, claimers)] = figures
                    emit(
                        {
                            "name": "claim_scale",
                            "queued": size,
                            "tenants": SCALE_TENANTS,
                            "largest_tenant_share": 0.5,
                            "claimers": claimers,
                            "claimers_in": "processes" if processes else "threads",
                            "cycles": lf.cycles,
                            "p50_ms": round(ours["p50_ms"], 2),
                            "p99_ms": round(ours["p99_ms"], 2),
                            "jobs_per_s": round(ours["jobs_per_s"], 1),
                            "baseline": "plain FIFO UPDATE ... FOR UPDATE SKIP LOCKED claim, "
                            "partial index ON jobs (created_at) WHERE status = 'queued', no "
                            "triggers; JobQueue.complete",
                            "baseline_p50_ms": round(floor["p50_ms"], 2),
                            "baseline_p99_ms": round(floor["p99_ms"], 2),
                            "baseline_jobs_per_s": round(floor["jobs_per_s"], 1),
                            "ratio": round(ours["p50_ms"] / floor["p50_ms"], 3),
                            "ratio_p99": round(ours["p99_ms"] / floor["p99_ms"], 3),
                            "ratio_throughput": round(ours["jobs_per_s"] / floor["jobs_per_s"], 3),
                            **{
                                field: value
                                for label, what in _COMPARED.items()
                                for field, value in (
                                    (label, what),
                                    (f"{label}_p50_ms", round(figures[label]["p50_ms"], 2)),
                                    (
                                        f"{label}_jobs_per_s",
                                        round(figures[label]["jobs_per_s"], 1),
                                    ),
                                    (
                                        f"ratio_throughput_vs_{label}",
                                        round(ours["jobs_per_s"] / figures[label]["jobs_per_s"], 3),
                                    ),
                                )
                            },
                            # Where each side's cycle spends CPU: with the claimers and the
                            # server on one machine, their sum bounds the 8-claimer throughput.
                            "cpu_ms_per_job": {
                                label: figure["cpu_ms_per_job"] for label, figure in figures.items()
                            },
                            **_beside_smallest(
                                beside_smallest if beside else None, ours, min(sizes)
                            ),
                            "machine": machine,
                        }
                    )
            largest, smallest = max(sizes), min(sizes)
            one, many = min(SCALE_CLAIMERS), max(SCALE_CLAIMERS)
            top = results[(largest, one)]
            assert beside_smallest is not None  # the twin ran at the largest size
            targets = {
                "p50_vs_plain": (top["loraforge"]["p50_ms"] / top["plain"]["p50_ms"], 1.5),
                "p99_vs_plain": (top["loraforge"]["p99_ms"] / top["plain"]["p99_ms"], 2.0),
                # Against its twin at the smallest size, in the same rounds.
                "p50_vs_own_smallest": (
                    top["loraforge"]["p50_ms"] / beside_smallest["p50_ms"],
                    1.5,
                ),
            }
            wide = results[(largest, many)]
            throughput = wide["loraforge"]["jobs_per_s"] / wide["plain"]["jobs_per_s"]
            share = {
                label: wide[label]["jobs_per_s"] / wide["plain"]["jobs_per_s"]
                for label in _COUNTED_ROW
            }
            emit(
                {
                    "name": "claim_scale_targets",
                    "queued": largest,
                    "claimers_in": "processes" if processes else "threads",
                    **{
                        name: {"ratio": round(value, 3), "at_most": bound, "met": value <= bound}
                        for name, (value, bound) in targets.items()
                    },
                    f"throughput_{many}_vs_plain": {
                        "ratio": round(throughput, 3),
                        "at_least": 1.0,
                        "met": throughput >= 1.0,
                    },
                    # Not a target: the same ratio against the smallest size's own run, minutes
                    # before (what this target read before the twin ran beside it).
                    "p50_vs_own_smallest_run": round(
                        top["loraforge"]["p50_ms"]
                        / results[(smallest, one)]["loraforge"]["p50_ms"],
                        3,
                    ),
                    # Not a target: against the plain claim committed as the fair claim is.
                    "p50_vs_plain_leased": round(
                        top["loraforge"]["p50_ms"] / top["plain_leased"]["p50_ms"], 3
                    ),
                    # Not targets: the plain claim's own rate once it keeps, in rows, only the
                    # counts that the fair order and the limits read, on its tenants' rows (the
                    # FIFO claim queues half its claims on one) and on rows spread (what the
                    # writes themselves cost).
                    **{
                        f"{label}_{many}_vs_plain": round(value, 3)
                        for label, value in share.items()
                    },
                    "machine": machine,
                }
            )
            bench_hot_paths(lf, files["loraforge"], largest, machine)
        finally:
            for side in sides:
                side.engine.dispose()


def bench_hot_paths(side: ScaleSide, file_id: str, size: int, machine: str) -> None:
    """At the largest backlog: the claim's plan, and the other paths a deep backlog loads (the
    reaper, the dashboard's counts, a tenant's deep page), each beside the way it would go
    without the bookkeeping or the keyset index."""
    from control_plane import queue_stats

    engine = side.engine
    _backlog(side, file_id, size)
    queue = JobQueue(engine, max_running_per_tenant=SCALE_LIMIT)
    # The plans on one connection, warmed: a pooled checkout may hand out another connection
    # each time, and a connection's first claims also compile and plan the trigger's
    # statements (PostgreSQL plans a statement afresh for its first five runs before it keeps
    # a generic plan): most of a millisecond that its later claims do not pay.
    one = db.make_engine(
        engine.url.render_as_string(hide_password=False), pool_size=1, max_overflow=0
    )
    planned = JobQueue(one, max_running_per_tenant=SCALE_LIMIT)
    for _ in range(8):  # warm the caches and plans both paths read
        planned.explain_claim()
        planned.explain_claim(walk=True)
    # The common claim (a line's head) and the walk of the front that runs when the head
    # cannot be shown first.
    for name, walk in (("claim_plan", False), ("claim_walk_plan", True)):
        plan = planned.explain_claim(prefer_base_model_id=side.base_id, walk=walk)
        emit(
            {
                "name": name,
                "queued": size,
                "execution_ms": plan["Execution Time"],
                "planning_ms": plan["Planning Time"],
                "triggers_ms": round(sum(t["Time"] for t in plan.get("Triggers", [])), 3),
                "plan": _plan_lines(plan["Plan"]),
                "machine": machine,
            }
        )
    reap = planned.explain_reap()
    one.dispose()
    emit(
        {
            "name": "reap_plan",
            "queued": size,
            "execution_ms": reap["Execution Time"],
            "plan": _plan_lines(reap["Plan"]),
            "machine": machine,
        }
    )

    def timed(run: Callable[[Any], object], samples: int = 30) -> float:
        values = []
        with engine.connect() as conn:
            for _ in range(samples):
                t0 = time.perf_counter()
                run(conn)
                values.append((time.perf_counter() - t0) * 1000)
        return percentile(values, 50)

    def counted(conn: Any, tenant: str | None) -> dict[str, queue_stats.QueueCounts]:
        scope = "" if tenant is None else "WHERE tenant_id = :t "
        rows = conn.execute(
            text(
                "SELECT tenant_id, count(*) FILTER (WHERE status = 'queued') AS queued, "
                "count(*) FILTER (WHERE status IN ('running', 'cancelling')) AS running "
                f"FROM jobs {scope}GROUP BY tenant_id"
            ),
            {"t": tenant},
        )
        return {
            r.tenant_id: queue_stats.QueueCounts(r.tenant_id, r.queued, r.running) for r in rows
        }

    big = "tenant-0000"
    scopes: tuple[tuple[str, str | None], ...] = (("every_tenant", None), ("largest_tenant", big))
    for scope, tenant in scopes:
        ours = timed(functools.partial(queue_stats.queue_counts, tenant_id=tenant))
        baseline = timed(functools.partial(counted, tenant=tenant), samples=5)
        baseline_is = "the same counts by count(*) over jobs"
        emit_beside(f"queue_counts_{scope}", ours, baseline_is, baseline, machine, queued=size)
    with engine.connect() as conn:
        cursor = conn.execute(
            text(
                "SELECT id, created_at FROM jobs WHERE tenant_id = :t "
                "ORDER BY created_at DESC, id DESC OFFSET :skip LIMIT 1"
            ),
            # 1,000 jobs deep, or a quarter of the largest tenant's jobs in a smaller backlog.
            {"t": big, "skip": min(1000, size // 8)},
        ).one()
    page = "SELECT * FROM jobs WHERE tenant_id = :t AND {after} ORDER BY created_at DESC, id DESC LIMIT 21"
    row_form = text(page.format(after="(created_at, id) < (:c, :i)"))
    or_form = text(page.format(after="(created_at < :c OR (created_at = :c AND id < :i))"))
    values = {"t": big, "c": cursor.created_at, "i": cursor.id}
    ours = timed(lambda conn: conn.execute(row_form, values).all())
    baseline = timed(lambda conn: conn.execute(or_form, values).all(), samples=10)
    listed = timed(lambda conn: jobs.list_jobs(conn, big, after=cursor.id, limit=20))
    emit_beside(
        "tenant_page_after_1000",
        ours,
        "the same page with `created_at < c OR (created_at = c AND id < i)`",
        baseline,
        machine,
        queued=size,
        tenant_jobs=size // 2,
        page=20,
        after=min(1000, size // 8),
        list_jobs_p50_ms=round(listed, 3),
    )
    with finished_history(engine, file_id, size) as finished:
        bench_metrics_scrape(engine, size, finished, machine, timed)
        bench_finished_page(engine, size, finished, machine, timed)
        bench_queue_repair(engine, size, finished, machine)
    bench_retry_storm(queue, size, machine)
    bench_heartbeats(queue, size, machine)
    bench_trainer_poll(queue, size, machine)


# What a scrape of `GET /metrics` counted before revision 0009: every job ever created by status
# (with the leases lost), and the queued jobs by base.
_SCRAPE_BY_COUNTING = (
    text("SELECT status, count(*), sum(interruptions) FROM jobs GROUP BY status"),
    text(
        "SELECT b.name, count(*), extract(epoch FROM now() - min(j.created_at)) FROM jobs j "
        "JOIN base_models b ON b.id = j.base_model_id WHERE j.status = 'queued' GROUP BY b.name"
    ),
)


@contextmanager
def finished_history(engine: Engine, file_id: str, size: int) -> Iterator[int]:
    """10 x `size` finished jobs (a platform's history) beside the backlog, spread over the
    tenants and older than every queued job, for as long as the block runs; yields how many."""
    finished = 10 * size
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO jobs (id, tenant_id, status, base_model_id, training_file_id, "
                "hyperparameters, interruptions, created_at) "
                "SELECT 'ftjob-done-' || g, 'tenant-' || lpad((g % :tenants)::text, 4, '0'), "
                "(ARRAY['succeeded', 'failed', 'cancelled'])[1 + g % 3], "
                "(SELECT id FROM base_models LIMIT 1), :file, '{}'::jsonb, g % 2, "
                "timestamptz '2025-01-01' + g * interval '1 s' "
                "FROM generate_series(1, :n) AS g"
            ),
            {"tenants": SCALE_TENANTS, "file": file_id, "n": finished},
        )
    _vacuum(engine)
    try:
        yield finished
    finally:
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM jobs WHERE id LIKE 'ftjob-done-%'"))


def bench_metrics_scrape(
    engine: Engine, size: int, finished: int, machine: str, timed: Callable[..., float]
) -> None:
    """The platform's figures in a metrics scrape (jobs by status, leases lost, queue depth and
    oldest age by base) beside `size` queued jobs and `finished` ones: read off the bookkeeping,
    against counting the jobs as the scrape did before."""
    from control_plane import queue_stats

    def ours(conn: Any) -> object:
        return queue_stats.job_counts(conn), queue_stats.base_queues(conn)

    def counting(conn: Any) -> object:
        return [conn.execute(statement).all() for statement in _SCRAPE_BY_COUNTING]

    with engine.connect() as conn:
        figures = queue_stats.job_counts(conn)
    mine = timed(ours)
    baseline = timed(counting, samples=5)
    emit_beside(
        "metrics_scrape",
        mine,
        "the same figures by count(*) over jobs (the scrape before revision 0009)",
        baseline,
        machine,
        queued=size,
        finished=finished,
        jobs_counted=sum(figures.by_status.values()),
    )


def bench_queue_repair(engine: Engine, size: int, finished: int, machine: str) -> None:
    """`loraforge queue repair` beside `size` queued and `finished` jobs, every tenant's row
    made wrong first (a finished count the claim does not read): how long every writer of jobs
    waits on it, against `loraforge queue check` (the recount alone: the repair recounts once,
    into temporary tables that its check, its writes and its check again read)."""
    from control_plane import queue_stats

    checks, repairs, rows = [], [], 0
    for _ in range(3):
        with engine.connect() as conn:
            t0 = time.perf_counter()
            queue_stats.drift(conn)
            checks.append((time.perf_counter() - t0) * 1000)
        with engine.begin() as conn:
            conn.execute(text("UPDATE tenant_queue_stats SET succeeded = succeeded + 1"))
        with engine.begin() as conn:
            t0 = time.perf_counter()
            rows = len(queue_stats.repair(conn))
            repairs.append((time.perf_counter() - t0) * 1000)
    emit_beside(
        "queue_repair",
        percentile(repairs, 50),
        "`loraforge queue check`: the recount alone, no lock, nothing written",
        percentile(checks, 50),
        machine,
        queued=size,
        finished=finished,
        rows_repaired=rows,
    )


def bench_finished_page(
    engine: Engine, size: int, finished: int, machine: str, timed: Callable[..., float]
) -> None:
    """The dashboard's first page of the largest tenant's failed jobs, behind its half of the
    backlog (queued, newer than its history): off `ix_jobs_tenant_finished`, against the same
    page without that index (dropped in a transaction that is rolled back: the plan before
    revision 0010)."""
    from control_plane.dashboard import queries

    def page(conn: Any) -> object:
        return queries.jobs_page(
            conn, "tenant-0000", status=JobStatus.FAILED, search=None, after=None, limit=20
        )

    mine = timed(page)
    before = []
    with engine.connect() as conn, conn.begin() as transaction:
        conn.execute(text("DROP INDEX ix_jobs_tenant_finished"))
        for _ in range(5):
            t0 = time.perf_counter()
            page(conn)
            before.append((time.perf_counter() - t0) * 1000)
        transaction.rollback()
    emit_beside(
        "tenant_page_finished_status",
        mine,
        "the same page without ix_jobs_tenant_finished (the plan before revision 0010)",
        percentile(before, 50),
        machine,
        queued=size,
        finished=finished,
        tenant_queued=size // 2,
        status=JobStatus.FAILED.value,
        page=20,
    )


STORM_LINES = 200


def bench_retry_storm(queue: JobQueue, size: int, machine: str) -> None:
    """Every job of the first 200 lines backing off (a retry storm): the claim walks 8 lines,
    then 64, then 512 before it would rank everything; beside it, ranking every claimable job
    (the last resort, which the claim ran at once before it walked wider), rolled back."""
    engine = queue.engine
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE jobs SET run_after = now() + interval '1 day' WHERE status = 'queued' "
                "AND tenant_id IN (SELECT h.tenant_id FROM queue_heads h WHERE h.queued > 0 "
                f"AND h.tenant_id <> 'tenant-0000' ORDER BY {_LINE_ORDER} LIMIT :lines)"
            ),
            {"lines": STORM_LINES},
        )
    _vacuum(engine)
    claims = []
    for _ in range(33):
        t0 = time.perf_counter()
        job = queue.claim("storm")
        claims.append((time.perf_counter() - t0) * 1000)
        if job is None:
            raise RuntimeError("retry storm: an empty claim with claimable jobs left")
        queue.complete(job.id, "storm")
    ranked = []
    params = queue._claim_params("storm", None, [])
    for _ in range(5):
        with engine.connect() as conn, conn.begin() as transaction:
            t0 = time.perf_counter()
            conn.execute(_CLAIM_RANKED, params).one()
            ranked.append((time.perf_counter() - t0) * 1000)
            transaction.rollback()
    ours, baseline = percentile(claims[3:], 50), percentile(ranked, 50)
    emit_beside(
        "claim_retry_storm",
        ours,
        "ranking every claimable job (_CLAIM_RANKED), rolled back",
        baseline,
        machine,
        queued=size,
        lines_backing_off=STORM_LINES,
    )


HEARTBEAT_JOBS = 200


def _heartbeat_round(queue: JobQueue, running: list[Any], rounds: int) -> dict[str, Any]:
    """`rounds` heartbeats of each running job: their median ms, the share that were heap-only
    updates (the server's statistics, flushed), and how much the indexes of `jobs` grew."""

    def counters() -> tuple[int, int, int]:
        with queue.engine.connect() as conn:
            conn.execute(text("SELECT pg_stat_force_next_flush()"))
        with queue.engine.connect() as conn:
            updates, hot, index_bytes = conn.execute(
                text(
                    "SELECT n_tup_upd, n_tup_hot_upd, pg_indexes_size('jobs') "
                    "FROM pg_stat_user_tables WHERE relname = 'jobs'"
                )
            ).one()
        return int(updates), int(hot), int(index_bytes)

    before = counters()
    times = []
    for step in range(rounds):
        for job in running:
            t0 = time.perf_counter()
            if not queue.heartbeat(job.id, job.lease_owner, progress=step / rounds).held:
                raise RuntimeError(f"heartbeat: {job.id} lost its lease")
            times.append((time.perf_counter() - t0) * 1000)
    beats = len(times)
    deadline = time.monotonic() + 20
    after = counters()
    while after[0] - before[0] < beats and time.monotonic() < deadline:
        time.sleep(0.2)
        after = counters()
    return {
        "p50_ms": percentile(times, 50),
        "hot_share": round((after[1] - before[1]) / beats, 3),
        "index_growth_kb": (after[2] - before[2]) // 1024,
    }


def bench_heartbeats(queue: JobQueue, size: int, machine: str) -> None:
    """200 running jobs' heartbeats (the lease renewed, progress): heap-only updates since
    revision 0012, against the same with revision 0011's index on (status, lease_expires_at)
    built back beside it (every heartbeat then writes an entry in every index of `jobs`); and
    the reaper's plan over those running jobs, with each."""
    running = [queue.claim(f"trainer-{n}") for n in range(HEARTBEAT_JOBS)]
    if any(job is None for job in running):
        raise RuntimeError("heartbeats: an empty claim with a backlog")
    _vacuum(queue.engine)
    ours = _heartbeat_round(queue, running, 5)
    reap = queue.explain_reap()["Execution Time"]
    with queue.engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(
            text("CREATE INDEX bench_status_lease ON jobs (status, lease_expires_at)")
        )
    try:
        _vacuum(queue.engine)
        before = _heartbeat_round(queue, running, 5)
        reap_before = queue.explain_reap()["Execution Time"]
    finally:
        with queue.engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(
                text("DROP INDEX bench_status_lease")
            )
    emit_beside(
        "heartbeat",
        ours.pop("p50_ms"),
        "the same heartbeats with (status, lease_expires_at) indexed (before revision 0012)",
        before.pop("p50_ms"),
        machine,
        queued=size,
        running=HEARTBEAT_JOBS,
        **ours,
        baseline_hot_share=before["hot_share"],
        baseline_index_growth_kb=before["index_growth_kb"],
        reap_execution_ms=reap,
        baseline_reap_execution_ms=reap_before,
    )


POLL_RUNNING = 10_000

# `count` queued jobs started at once under leases an hour long (the triggers count them).
_START_UNDER_LEASE = text(
    """
    UPDATE jobs SET status = 'running', attempt = attempt + 1, started_at = now(),
                    lease_owner = 'bench-trainer-' || id,
                    lease_expires_at = now() + interval '1 hour'
    WHERE id IN (SELECT id FROM jobs WHERE status = 'queued' ORDER BY id LIMIT :count)
    """
)


def bench_trainer_poll(queue: JobQueue, size: int, machine: str) -> None:
    """What a trainer runs before each claim, beside POLL_RUNNING running jobs: `reap_if_due`
    when another trainer reaped within the interval (one row read), against
    `reap_expired_leases`, which every claim ran before revision 0016 (every running job's
    lease read, twice)."""
    with queue.engine.begin() as conn:
        running = conn.execute(_START_UNDER_LEASE, {"count": POLL_RUNNING}).rowcount
    _vacuum(queue.engine)
    polling = JobQueue(queue.engine, reap_interval_seconds=3600)
    polling.reap_if_due()  # stamped: the polls below find it done

    def p50(run: Callable[[], object], samples: int = 30) -> float:
        run()
        times = []
        for _ in range(samples):
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) * 1000)
        return percentile(times, 50)

    gated = p50(polling.reap_if_due)
    reaped = p50(polling.reap_expired_leases)
    emit_beside(
        "trainer_poll_reap",
        gated,
        "reap_expired_leases, which every claim of every trainer ran before it",
        reaped,
        machine,
        queued=size,
        running=running,  # POLL_RUNNING, or fewer where the backlog is smaller
        reap_interval_s=polling.reap_interval_seconds,
    )


# -- entry point -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.queue", description=__doc__)
    parser.add_argument(
        "--jobs", type=int, default=2000, help="jobs per API run and per claim drain"
    )
    parser.add_argument("--samples", type=int, default=100, help="NOTIFY latency samples")
    parser.add_argument("--poll-samples", type=int, default=30, help="polling latency samples")
    add_database_url_argument(parser)
    parser.add_argument(
        "--no-sync-commit",
        action="store_true",
        help="synchronous_commit = off on the throwaway database (measure statements, not fsync)",
    )
    parser.add_argument(
        "--scale",
        action="store_true",
        help="run only the claim at scale (claim_scale, its plan and the hot paths)",
    )
    parser.add_argument(
        "--sizes",
        default=",".join(str(n) for n in SCALE_SIZES),
        help="backlog sizes for claim_scale, comma-separated",
    )
    parser.add_argument(
        "--scale-cycles",
        type=int,
        default=1600,
        help="claim + complete cycles per side and size (at most a quarter of the backlog)",
    )
    parser.add_argument("--rounds", type=int, default=8, help="alternating rounds per size")
    parser.add_argument(
        "--claimer-processes",
        action="store_true",
        help="claim_scale's claimers in processes of their own (as trainers are), not threads",
    )
    parser.add_argument(
        "--wakeups",
        action="store_true",
        help="run only the idle trainers' measurements (idle_trainer_wakeups, idle_trainer_polls)",
    )
    parser.add_argument(
        "--wake-jobs", type=int, default=40, help="jobs per round of idle_trainer_wakeups"
    )
    args = parser.parse_args(argv)
    if args.jobs < API_CLIENT_THREADS or args.samples < 1 or args.poll_samples < 1:
        parser.error(f"--jobs must be at least {API_CLIENT_THREADS}; samples at least 1")
    try:
        sizes = tuple(int(size) for size in args.sizes.split(","))
    except ValueError:
        parser.error("--sizes takes whole numbers separated by commas, e.g. 1000,10000,100000")
    if min(sizes) < 4 * max(SCALE_CLAIMERS) or args.scale_cycles < 1 or args.rounds < 1:
        parser.error(f"--sizes at least {4 * max(SCALE_CLAIMERS)}; cycles and rounds at least 1")

    with (
        admin_server(args.database_url) as admin_url,
        bench_database(admin_url, sync_commit=not args.no_sync_commit) as url,
        tempfile.TemporaryDirectory(prefix="loraforge-bench-") as work_dir,
    ):
        engine = db.make_engine(url, pool_size=1)
        machine = machine_description(engine)
        engine.dispose()
        progress(f"database ready; {machine}")
        if args.wakeups:
            bench_idle_wakeups(url, args.wake_jobs, WAKE_ROUNDS, machine)
            bench_idle_polls(url, machine)
            progress("done")
            return 0
        if args.scale:
            bench_claim_scale(
                admin_url,
                sizes,
                args.scale_cycles,
                args.rounds,
                machine,
                not args.no_sync_commit,
                args.claimer_processes,
            )
            progress("done")
            return 0
        bench_api_enqueue(url, args.jobs, machine, Path(work_dir))
        bench_claims(url, args.jobs, machine)
        bench_notify(url, args.samples, args.poll_samples, machine)
        bench_idle_wakeups(url, args.wake_jobs, WAKE_ROUNDS, machine)
        bench_idle_polls(url, machine)
        progress("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
