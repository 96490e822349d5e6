"""The Postgres queue against a real PostgreSQL: exactly-once claims, leases, retries, fairness."""

from __future__ import annotations

import re
import threading
import time
from collections import Counter

import pytest
from sqlalchemy import Engine, text

from control_plane.queue import CANCEL_CHANNEL, JOBS_CHANNEL, JobQueue, JobStateError, QueueListener
from tests.factories import create_validating_job, enqueue_jobs, make_base, make_file, make_tenant


@pytest.fixture
def world(engine: Engine) -> dict[str, str]:
    tenant = make_tenant(engine, "acme", max_running_jobs=1000)
    base = make_base(engine)
    file = make_file(engine, tenant.id)
    return {"tenant": tenant.id, "base": base.id, "file": file.id}


def _status(engine: Engine, job_id: str) -> tuple[str, int, str | None]:
    with engine.connect() as conn:
        row = conn.execute(
            text("SELECT status, attempt, error_message FROM jobs WHERE id = :id"), {"id": job_id}
        ).one()
    return row.status, row.attempt, row.error_message


@pytest.mark.slow
def test_eight_claimers_drain_2000_jobs_each_exactly_once(
    engine: Engine, world: dict[str, str]
) -> None:
    ids = enqueue_jobs(engine, world["tenant"], world["base"], world["file"], 2000)
    queue = JobQueue(engine, max_running_per_tenant=1000)
    claimed: list[str] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def claimer(n: int) -> None:
        try:
            while True:
                job = queue.claim(f"worker-{n}")
                if job is None:
                    return
                assert job.status == "running" and job.attempt == 1
                with lock:
                    claimed.append(job.id)
                assert queue.complete(job.id, f"worker-{n}") is not None
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=claimer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    counts = Counter(claimed)
    assert len(claimed) == 2000
    assert set(counts) == set(ids)
    assert max(counts.values()) == 1
    with engine.connect() as conn:
        statuses = dict(
            conn.execute(text("SELECT status, count(*) FROM jobs GROUP BY status")).all()
        )
    assert statuses == {"succeeded": 2000}


def test_an_expired_lease_returns_the_job_without_using_an_attempt(
    engine: Engine, world: dict[str, str]
) -> None:
    """A lease lost with its trainer is the platform's fault: the next claim runs the same
    attempt again."""
    [job_id] = enqueue_jobs(engine, world["tenant"], world["base"], world["file"], 1)
    # A lease long enough that the reap just after the claim finds it valid on a busy machine.
    queue = JobQueue(engine, lease_seconds=2, retry_backoff_seconds=0)
    first = queue.claim("w1")
    assert first is not None and first.attempt == 1
    assert queue.reap_expired_leases() == []  # lease still valid
    time.sleep(2.1)
    reaped = queue.reap_expired_leases()
    assert [j.id for j in reaped] == [job_id]
    assert _status(engine, job_id)[0] == "queued"
    # The worker that lost its lease learns it and cannot complete the job any more.
    assert queue.heartbeat(job_id, "w1").held is False
    assert queue.complete(job_id, "w1") is None
    second = queue.claim("w2")
    assert second is not None and second.id == job_id and second.attempt == 1
    assert second.interruptions == 1


def _updates_of_jobs(engine: Engine, at_least: int) -> tuple[int, int]:
    """(updates, heap-only updates) of `jobs` as the statistics have them, once they count at
    least `at_least` updates (a backend reports its counts when it goes idle, within seconds)."""
    deadline = time.monotonic() + 20
    while True:
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_stat_force_next_flush()"))
        with engine.connect() as conn:
            row = conn.execute(
                text(
                    "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'jobs'"
                )
            ).one()
        if row.n_tup_upd >= at_least or time.monotonic() > deadline:
            return row.n_tup_upd, row.n_tup_hot_upd
        time.sleep(0.2)


def test_heartbeats_are_heap_only_updates(engine: Engine, world: dict[str, str]) -> None:
    """A trainer renews its lease every few seconds while it trains; nothing a heartbeat writes
    is indexed, so each is a heap-only (HOT) update: no new entry in any index of `jobs`.

    An update is heap-only only where its new version fits on the row's page too, and the room
    pruning makes there can be held back by any transaction holding an xid anywhere in the
    cluster, even in another database, since every snapshot's xmin counts it (measured: with one
    open in another database, 4 of 1,000 heartbeats were heap-only; a test running beside this
    one on another worker made 23 to 87 %). So this test's own copy of the table leaves each
    job a page of its own with room for every version the heartbeats write (`fillfactor`, on
    this test's database only), and then every heartbeat must be heap-only whatever else the
    server runs; one that wrote an indexed column would make none of them. It also reads what a
    heartbeat changes against every index's definition."""
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE jobs SET (fillfactor = 10)"))
    ids = enqueue_jobs(engine, world["tenant"], world["base"], world["file"], 20)
    queue = JobQueue(engine)
    claimed = [queue.claim(f"w{n}") for n in range(20)]
    assert sorted(job.id for job in claimed if job is not None) == sorted(ids)
    first = claimed[0]
    assert first is not None and first.lease_owner is not None
    with engine.connect() as conn:
        definitions = list(
            conn.execute(
                text(
                    "SELECT pg_get_indexdef(indexrelid) FROM pg_index "
                    "WHERE indrelid = 'jobs'::regclass"
                )
            ).scalars()
        )
        row_before = conn.execute(
            text("SELECT to_jsonb(j) FROM jobs j WHERE id = :id"), {"id": first.id}
        ).scalar_one()
        pages, size = conn.execute(
            text(
                "SELECT count(DISTINCT (ctid::text::point)[0]), max(pg_column_size(j.*)) "
                "FROM jobs j"
            )
        ).one()
    # Each page holds its job's first version and the claim's; the rest of it is free.
    assert pages == len(ids), "each job must have a page of its own"
    beats_per_job = int((8192 * 0.9 - 2 * size) // size) - 1
    assert beats_per_job >= 3, f"a job's row ({size} bytes) leaves too little room on its page"

    time.sleep(0.01)  # the lease's new expiry differs from the claim's
    assert queue.heartbeat(
        first.id, first.lease_owner, progress=0.5, eta_seconds=9, trained_tokens=7
    ).held
    with engine.connect() as conn:
        row_after = conn.execute(
            text("SELECT to_jsonb(j) FROM jobs j WHERE id = :id"), {"id": first.id}
        ).scalar_one()
    changed = {column for column in row_after if row_after[column] != row_before[column]}
    assert changed == {"lease_expires_at", "progress", "eta_seconds", "trained_tokens"}
    assert len(definitions) >= 3
    for definition in definitions:
        assert not [c for c in changed if re.search(rf"\b{c}\b", definition)], definition

    # Counted once the statistics hold the claims and that heartbeat (each backend reports
    # its own when it goes idle, within seconds), so the count after holds just the loop's.
    before, before_hot = _updates_of_jobs(engine, len(ids) + 1)
    assert before == len(ids) + 1, "a claim and a heartbeat each update their job once"
    beats = 0
    for step in range(beats_per_job - 1):  # the first job's first beat is above
        for job in claimed:
            assert job is not None and job.lease_owner is not None
            beat = queue.heartbeat(job.id, job.lease_owner, progress=step / 10, trained_tokens=step)
            assert beat.held
            beats += 1
    updates, hot = _updates_of_jobs(engine, before + beats)
    assert updates - before == beats
    assert hot - before_hot == beats


def test_a_job_that_loses_every_trainer_fails_after_max_interruptions(
    engine: Engine, world: dict[str, str]
) -> None:
    [job_id] = enqueue_jobs(
        engine, world["tenant"], world["base"], world["file"], 1, max_attempts=2
    )
    queue = JobQueue(engine, lease_seconds=0.1, retry_backoff_seconds=0, max_interruptions=3)
    for worker in ("w1", "w2", "w3"):
        assert queue.claim(worker) is not None
        time.sleep(0.15)
        queue.reap_expired_leases()
    status, attempt, error = _status(engine, job_id)
    assert (status, attempt) == ("failed", 1)
    assert error is not None and "w3 stopped renewing its lease" in error
    assert "3 trainers lost" in error
    assert queue.claim("w4") is None


def test_retryable_failure_backs_off_then_fails_for_good(
    engine: Engine, world: dict[str, str]
) -> None:
    [job_id] = enqueue_jobs(
        engine, world["tenant"], world["base"], world["file"], 1, max_attempts=3
    )
    queue = JobQueue(engine, retry_backoff_seconds=30)
    assert queue.claim("w1") is not None
    requeued = queue.fail(job_id, "w1", code="oom", message="out of memory", retryable=True)
    assert requeued is not None and requeued.status == "queued"
    assert queue.claim("w1") is None  # backing off for 30 s
    with engine.begin() as conn:
        conn.execute(text("UPDATE jobs SET run_after = now() WHERE id = :id"), {"id": job_id})
    assert queue.claim("w1") is not None
    final = queue.fail(job_id, "w1", code="bad_data", message="no examples left", retryable=False)
    assert (
        final is not None and final.status == "failed" and final.error_message == "no examples left"
    )


def test_cancel_queued_and_claimed_jobs(engine: Engine, world: dict[str, str]) -> None:
    queued_id, running_id = enqueue_jobs(engine, world["tenant"], world["base"], world["file"], 2)
    queue = JobQueue(engine)
    running = queue.claim("w1")
    assert running is not None
    # The claim takes the oldest; whichever it took, cancel both.
    if running.id != running_id:
        queued_id, running_id = running_id, queued_id
    assert queue.request_cancel(queued_id).status == "cancelled"
    assert queue.request_cancel(running_id).status == "cancelling"
    beat = queue.heartbeat(running_id, "w1")
    assert beat.held and beat.cancel_requested
    done = queue.finish_cancelled(running_id, "w1")
    assert done is not None and done.status == "cancelled"
    with pytest.raises(JobStateError):
        queue.request_cancel(running_id)
    assert queue.claim("w2") is None


def test_hand_back_requeues_at_once_without_using_an_attempt(
    engine: Engine, world: dict[str, str]
) -> None:
    kept_id, cancelled_id = enqueue_jobs(engine, world["tenant"], world["base"], world["file"], 2)
    queue = JobQueue(engine, retry_backoff_seconds=3600)  # a failure would wait an hour
    first, second = queue.claim("w1"), queue.claim("w1")
    assert first is not None and second is not None
    if first.id != kept_id:
        first, second = second, first
    assert queue.hand_back(kept_id, "w2", reason="not its lease") is None
    handed = queue.hand_back(kept_id, "w1", reason="worker w1 is shutting down")
    assert handed is not None and handed.status == "queued" and handed.attempt == 0
    queue.request_cancel(cancelled_id)
    ended = queue.hand_back(cancelled_id, "w1", reason="worker w1 is shutting down")
    assert ended is not None and ended.status == "cancelled"
    again = queue.claim("w2")  # at once: no backoff
    assert again is not None and again.id == kept_id and again.attempt == 1
    assert queue.hand_back(kept_id, "w1", reason="stale worker") is None


def test_fair_share_serves_small_tenant_early(engine: Engine) -> None:
    base = make_base(engine)
    big = make_tenant(engine, "big", max_running_jobs=10000)
    small = make_tenant(engine, "small", max_running_jobs=10000)
    enqueue_jobs(engine, big.id, base.id, make_file(engine, big.id).id, 500)
    small_ids = set(enqueue_jobs(engine, small.id, base.id, make_file(engine, small.id).id, 5))
    queue = JobQueue(engine, max_running_per_tenant=10000)
    # Claims that stay running, and claims that complete at once: B is served among the first few.
    order = [queue.claim(f"w{i}") for i in range(3)]
    assert any(j is not None and j.id in small_ids for j in order[:2])
    for job in order:
        assert job is not None
        queue.complete(job.id, job.lease_owner or "")
    tenants_seen = []
    for i in range(10):
        job = queue.claim(f"x{i}")
        assert job is not None
        tenants_seen.append(job.tenant_id)
        queue.complete(job.id, f"x{i}")
    # Completed instantly, the two tenants alternate until the small one runs out.
    assert tenants_seen.count(small.id) >= 4


def test_priority_then_affinity(engine: Engine, world: dict[str, str]) -> None:
    other_base = make_base(engine, "other-base")
    low = enqueue_jobs(engine, world["tenant"], world["base"], world["file"], 1, priority=0)
    high = enqueue_jobs(engine, world["tenant"], world["base"], world["file"], 1, priority=5)
    on_other = enqueue_jobs(engine, world["tenant"], other_base.id, world["file"], 1, priority=0)
    queue = JobQueue(engine, max_running_per_tenant=1000)
    first = queue.claim("w", prefer_base_model_id=other_base.id)
    assert first is not None and first.id == high[0]
    queue.complete(first.id, "w")
    second = queue.claim("w", prefer_base_model_id=other_base.id)
    assert second is not None and second.id == on_other[0]
    queue.complete(second.id, "w")
    third = queue.claim("w", prefer_base_model_id=other_base.id)
    assert third is not None and third.id == low[0]


def test_per_tenant_running_limit_holds_under_concurrency(engine: Engine) -> None:
    base = make_base(engine)
    limited = make_tenant(engine, "limited", max_running_jobs=2)
    enqueue_jobs(engine, limited.id, base.id, make_file(engine, limited.id).id, 20)
    queue = JobQueue(engine)
    claimed: list[str] = []
    lock = threading.Lock()

    def claimer(n: int) -> None:
        job = queue.claim(f"w{n}")
        if job is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=claimer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(claimed) == 2
    with engine.connect() as conn:
        running = conn.execute(text("SELECT count(*) FROM jobs WHERE status = 'running'")).scalar()
    assert running == 2


def test_idle_worker_is_woken_by_notify(
    engine: Engine, database_url: str, world: dict[str, str]
) -> None:
    job_id = create_validating_job(engine, world["tenant"], world["base"], world["file"])
    queue = JobQueue(engine)
    with QueueListener(database_url) as listener:
        assert listener.wait(0.05) == []
        threading.Timer(0.2, queue.mark_queued, args=(job_id,)).start()
        woke = listener.wait(10)
        assert (JOBS_CHANNEL, world["base"]) in woke
        assert queue.claim("w") is not None
        threading.Timer(0.1, queue.request_cancel, args=(job_id,)).start()
        assert (CANCEL_CHANNEL, job_id) in listener.wait(10)
