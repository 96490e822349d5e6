"""A claim commits without waiting for the disk; a crash that loses one hands its job back whole.

PostgreSQL is a server of the test's own (pgserver's binaries, a data directory under tmp_path),
so that the test can crash it as an OOM kill of the server would: SIGQUIT to the postmaster
(`pg_ctl stop -m immediate`), no shutdown checkpoint, recovery from the WAL on disk at restart.
The WAL writer is set to flush at most every 10 s (its longest) and nothing else commits, so a
claim's commit record is still in the server's WAL buffers when the crash comes, unless the claim
waited for its flush.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from sqlalchemy import Engine, text

from control_plane import db, queue_stats
from control_plane.queue import JobQueue
from loraforge.embedded import EmbeddedPostgres, postmaster_pid
from tests.factories import enqueue_jobs, make_base, make_file, make_tenant

# Only what the test does may write WAL between a claim and the crash.
_QUIET = {
    "wal_writer_delay": "10s",
    "autovacuum": "off",
    "checkpoint_timeout": "1h",
}


@pytest.fixture
def crashable(tmp_path: Path) -> Iterator[tuple[EmbeddedPostgres, Engine]]:
    server = EmbeddedPostgres(tmp_path / "pgdata")
    url = server.start()
    engine = db.make_engine(url, pool_size=4)
    try:
        with engine.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            for name, value in _QUIET.items():
                conn.execute(text(f"ALTER SYSTEM SET {name} = '{value}'"))
            conn.execute(text("SELECT pg_reload_conf()"))
        db.upgrade(url)
        yield server, engine
    finally:
        engine.dispose()
        server.stop()


def _crash(server: EmbeddedPostgres, engine: Engine) -> float:
    """The server dies at once (no checkpoint, no flush) and starts again, recovering; when it
    had died (before its restart, which may take a while on a busy machine)."""
    pid = postmaster_pid(server.data_dir)
    assert pid is not None
    postmaster = psutil.Process(pid)
    postmaster.send_signal(signal.SIGQUIT)
    postmaster.wait(30)
    died = time.monotonic()
    engine.dispose()  # the pool's connections died with it
    server.restart()
    return died


def _job(engine: Engine, job_id: str) -> tuple[str, int, str | None]:
    with engine.connect() as conn:
        row = conn.execute(
            text("SELECT status, attempt, lease_owner FROM jobs WHERE id = :id"), {"id": job_id}
        ).one()
    return row.status, row.attempt, row.lease_owner


def _started_events(engine: Engine, job_id: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT count(*) FROM job_events WHERE job_id = :id "
                    "AND data->>'status' = 'running'"
                ),
                {"id": job_id},
            ).scalar_one()
        )


@pytest.mark.parametrize("head_backs_off", [False, True], ids=["line_head", "walk"])
def test_a_claim_lost_to_a_crash_leaves_its_job_queued_and_its_trainer_learns_it_at_once(
    crashable: tuple[EmbeddedPostgres, Engine], head_backs_off: bool
) -> None:
    """Both ways a claim goes: its line's head (one statement, autocommit), or, when that head
    backs off, the walk of the front (a transaction of its own)."""
    server, engine = crashable
    tenant = make_tenant(engine, "acme", max_running_jobs=1)
    other = make_tenant(engine, "globex")
    base = make_base(engine)
    [kept_id] = enqueue_jobs(engine, other.id, base.id, make_file(engine, other.id).id, 1)
    acme_ids = enqueue_jobs(
        engine, tenant.id, base.id, make_file(engine, tenant.id).id, 3 if head_backs_off else 2
    )
    queue = JobQueue(engine, max_running_per_tenant=4, retry_backoff_seconds=3600)

    # A claim followed by a heartbeat: the heartbeat's commit waits for the disk, the claim's
    # WAL with it.
    kept = queue.claim("trainer-b")
    assert kept is not None and kept.id == kept_id
    assert queue.heartbeat(kept.id, "trainer-b").held
    backing_off = None
    if head_backs_off:
        # The head of acme's line fails once and backs off for an hour, still its line's head.
        head = queue.claim("trainer-x")
        assert head is not None and head.id in acme_ids
        assert queue.fail(head.id, "trainer-x", code="oom", message="retry later") is not None
        backing_off = head.id
        acme_ids.remove(head.id)
    # The claim the crash loses: nothing commits after it.
    started = time.monotonic()
    lost = queue.claim("trainer-a")
    assert lost is not None and lost.id in acme_ids and lost.attempt == 1
    lost_id, spare_id = lost.id, next(job for job in acme_ids if job != lost.id)
    died = _crash(server, engine)
    assert died - started < 9, "the WAL writer may have flushed the claim"

    # The heartbeat made the first claim durable; the second is gone whole: its job queued on
    # its first attempt again, no started event, the tenant's running count and queue line as
    # they were before it (the queue's check finds nothing to repair).
    assert _job(engine, kept_id) == ("running", 1, "trainer-b")
    assert _job(engine, lost_id) == ("queued", 0, None)
    assert _started_events(engine, lost_id) == 0
    if backing_off is not None:
        assert _job(engine, backing_off) == ("queued", 1, None)
    with engine.connect() as conn:
        assert queue_stats.drift(conn) == []

    # Its trainer learns it at its next heartbeat and stops; it cannot finish or fail the job.
    assert queue.heartbeat(lost_id, "trainer-a").held is False
    assert queue.complete(lost_id, "trainer-a") is None
    assert queue.fail(lost_id, "trainer-a", code="x", message="x") is None
    # The job is claimed again, first in its line, by another trainer; its tenant's limit of one
    # holds its other job back until it finishes.
    again = queue.claim("trainer-c")
    assert again is not None and again.id == lost_id and again.attempt == 1
    assert queue.claim("trainer-d") is None
    assert _job(engine, spare_id) == ("queued", 0, None)
    assert _started_events(engine, lost_id) == 1
    assert queue.complete(lost_id, "trainer-c") is not None
    spare = queue.claim("trainer-d")
    assert spare is not None and spare.id == spare_id
    with engine.connect() as conn:
        assert queue_stats.drift(conn) == []
