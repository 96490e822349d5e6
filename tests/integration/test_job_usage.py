"""The fine-tuning usage report (`control_plane.job_usage`, `GET /v1/usage`) against a real
PostgreSQL: the time each tenant's jobs held a trainer, clipped to the window, and the jobs that
succeeded there with the tokens they trained on, read off the status changes the real queue
wrote; equal to a plain-Python reading of the same changes on random histories."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Connection, Engine, text

from control_plane.events import add_event
from control_plane.job_status import ACTIVE, TERMINAL, JobStatus
from control_plane.job_usage import TenantJobUsage, job_totals
from control_plane.queue import JobQueue
from control_plane.services import Services
from loraforge.client import Client, LoraforgeError
from loraforge.platform_admin import PlatformAdmin
from tests.api_harness import TenantKeys
from tests.factories import enqueue_jobs, make_base, make_file, make_tenant

T0 = datetime(2026, 3, 1, tzinfo=UTC)


def _at(hours: float) -> datetime:
    return T0 + timedelta(hours=hours)


@dataclass
class World:
    tenants: dict[str, str]  # name -> id
    base: str
    files: dict[str, str]


@pytest.fixture
def world(engine: Engine) -> World:
    base = make_base(engine)
    tenants = {
        name: make_tenant(engine, name, max_running_jobs=100).id for name in ("acme", "bolt")
    }
    files = {name: make_file(engine, tid).id for name, tid in tenants.items()}
    return World(tenants, base.id, files)


def _status_changes(conn: Connection) -> list[tuple[int, str, str]]:
    rows = conn.execute(
        text(
            "SELECT e.id, e.job_id, e.data ->> 'status' AS status FROM job_events e "
            "WHERE e.data -> 'status' IS NOT NULL ORDER BY e.id"
        )
    )
    return [(r.id, r.job_id, r.status) for r in rows]


def _retime(engine: Engine, times: dict[int, datetime]) -> None:
    """Move the status changes the queue wrote (milliseconds apart) to a timeline of hours."""
    with engine.begin() as conn:
        for event_id, when in times.items():
            conn.execute(
                text("UPDATE job_events SET created_at = :at WHERE id = :id"),
                {"at": when, "id": event_id},
            )


def _reference(
    changes: list[tuple[int, str, str, datetime]],
    tenant_of: dict[str, str],
    tokens_of: dict[str, int],
    start: datetime,
    end: datetime,
    now: datetime,
) -> dict[str, tuple[float, int, int]]:
    """Each tenant's (trainer seconds, jobs succeeded, their tokens), by walking every job's
    status changes in order: what the report must equal."""
    by_job: dict[str, list[tuple[int, str, datetime]]] = defaultdict(list)
    for event_id, job_id, status, at in changes:
        by_job[job_id].append((event_id, status, at))
    seconds: dict[str, float] = defaultdict(float)
    succeeded: dict[str, int] = defaultdict(int)
    tokens: dict[str, int] = defaultdict(int)
    for job_id, job_changes in by_job.items():
        tenant = tenant_of[job_id]
        job_changes.sort()
        for i, (_, status, at) in enumerate(job_changes):
            if status in ACTIVE:
                until = job_changes[i + 1][2] if i + 1 < len(job_changes) else now
                began, ended = max(at, start), min(until, end)
                seconds[tenant] += max((ended - began).total_seconds(), 0.0)
            if status == JobStatus.SUCCEEDED and start <= at < end:
                succeeded[tenant] += 1
                tokens[tenant] += tokens_of[job_id]
    return {
        t: (seconds[t], succeeded[t], tokens[t])
        for t in set(seconds) | set(succeeded)
        if seconds[t] > 0 or succeeded[t]
    }


def _report(conn: Connection, start: datetime, end: datetime) -> dict[str, tuple[Any, int, int]]:
    found: list[TenantJobUsage] = job_totals(conn, start, end)
    return {
        u.tenant_id: (
            pytest.approx(u.trainer_seconds, abs=1e-3),
            u.fine_tuning_jobs,
            u.fine_tuning_trained_tokens,
        )
        for u in found
    }


def test_trainer_time_and_succeeded_jobs_from_the_queues_own_moves(
    engine: Engine, world: World
) -> None:
    acme, bolt = world.tenants["acme"], world.tenants["bolt"]
    queue = JobQueue(engine, max_running_per_tenant=100)
    done, retried, handed, going = enqueue_jobs(engine, acme, world.base, world.files["acme"], 4)
    (lost,) = enqueue_jobs(engine, bolt, world.base, world.files["bolt"], 1, max_attempts=1)

    # done: claimed, succeeds with 1,200 tokens. retried: fails, is claimed again, succeeds
    # with 300. handed: handed back by its trainer (a node drained). going: still running.
    # lost: bolt's, cancelled while running, its trainer finishing the cancel.
    for _ in (done, retried, handed, going, lost):
        assert queue.claim("w-1") is not None
    assert queue.complete(done, "w-1", trained_tokens=1200) is not None
    assert queue.fail(retried, "w-1", code="oom", message="out of memory") is not None
    with engine.begin() as conn:
        conn.execute(text("UPDATE jobs SET run_after = now() WHERE id = :id"), {"id": retried})
    assert queue.claim("w-2") is not None
    assert queue.complete(retried, "w-2", trained_tokens=300) is not None
    assert queue.hand_back(handed, "w-1", reason="node drained") is not None
    queue.request_cancel(lost)
    assert queue.finish_cancelled(lost, "w-1") is not None

    with engine.connect() as conn:
        changes = _status_changes(conn)
    by_job: dict[str, list[str]] = defaultdict(list)
    for _, job_id, status in changes:
        by_job[job_id].append(status)
    assert by_job == {
        done: ["running", "succeeded"],
        retried: ["running", "queued", "running", "succeeded"],
        handed: ["running", "queued"],
        going: ["running"],
        lost: ["running", "cancelling", "cancelled"],
    }

    # The same moves, hours apart (hour 0 is T0).
    hours: dict[str, list[float]] = {
        done: [0, 5],
        retried: [1, 2, 3, 6],
        handed: [2, 4],
        going: [7],
        lost: [1, 2, 3.5],
    }
    times: dict[int, datetime] = {}
    seen: dict[str, int] = defaultdict(int)
    for event_id, job_id, _ in changes:
        times[event_id] = _at(hours[job_id][seen[job_id]])
        seen[job_id] += 1
    _retime(engine, times)

    with engine.begin() as conn:
        now = conn.execute(text("SELECT now()")).scalar_one()
        whole = _report(conn, _at(0), _at(10))
        # acme: done 5 h, retried 1 + 3 h, handed 2 h, going 3 h (hours 7 to 10); bolt: 2.5 h.
        assert whole == {acme: (14 * 3600.0, 2, 1500), bolt: (2.5 * 3600.0, 0, 0)}
        # Hours 2 to 4 cut runs at both edges: done 2, retried 1 (3 to 4), handed 2; bolt's
        # run and its cancel 1.5. Nothing succeeded there.
        assert _report(conn, _at(2), _at(4)) == {
            acme: (5 * 3600.0, 0, 0),
            bolt: (1.5 * 3600.0, 0, 0),
        }
        # Hours 5 to 6: retried's second run, and done succeeding at hour 5 (its run ended).
        assert _report(conn, _at(5), _at(6)) == {acme: (3600.0, 1, 1200)}
        # Later: only the job still running, up to now.
        later = _report(conn, _at(8), now + timedelta(hours=1))
        assert later == {acme: ((now - _at(8)).total_seconds(), 0, 0)}
        # Before any of it, nothing.
        assert _report(conn, _at(-5), _at(0)) == {}


_STATUSES = ["running", "cancelling", "queued", "paused", "succeeded", "failed", "cancelled"]


def _lived(steps: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """The steps up to the first that ends the job: nothing moves a job after that."""
    for i, (status, _) in enumerate(steps):
        if status in TERMINAL:
            return steps[: i + 1]
    return steps


# A job's random life: each step a status change some hours after the last.
_LIFE = st.lists(
    st.tuples(st.sampled_from(_STATUSES), st.integers(min_value=0, max_value=6)), max_size=6
).map(_lived)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    lives=st.lists(st.tuples(st.sampled_from(["acme", "bolt"]), _LIFE), min_size=1, max_size=6),
    window=st.tuples(st.integers(-2, 30), st.integers(1, 30)),
    tokens=st.integers(0, 10_000),
)
def test_the_report_equals_a_plain_reading_of_random_histories(
    engine: Engine,
    world: World,
    lives: list[tuple[str, list[tuple[str, int]]]],
    window: tuple[int, int],
    tokens: int,
) -> None:
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE jobs CASCADE"))
    tenant_of: dict[str, str] = {}
    tokens_of: dict[str, int] = {}
    changes: list[tuple[int, str, str, datetime]] = []
    for n, (name, life) in enumerate(lives):
        tenant = world.tenants[name]
        (job_id,) = enqueue_jobs(engine, tenant, world.base, world.files[name], 1)
        tenant_of[job_id], tokens_of[job_id] = tenant, tokens + n
        with engine.begin() as conn:
            conn.execute(
                text("UPDATE jobs SET trained_tokens = :t WHERE id = :id"),
                {"t": tokens + n, "id": job_id},
            )
            hour = n
            for status, gap in life:
                hour += gap
                event_id = add_event(conn, job_id, f"to {status}", data={"status": status})
                changes.append((event_id, job_id, status, _at(hour)))
            if life:  # the job stands where its last change left it, as the queue keeps it
                conn.execute(
                    text("UPDATE jobs SET status = :s WHERE id = :id"),
                    {"s": life[-1][0], "id": job_id},
                )
    _retime(engine, {event_id: at for event_id, _, _, at in changes})

    start = _at(window[0])
    end = start + timedelta(hours=window[1])
    with engine.begin() as conn:
        now = conn.execute(text("SELECT now()")).scalar_one()
        expected = _reference(changes, tenant_of, tokens_of, start, end, now)
        assert _report(conn, start, end) == expected


def test_the_platform_report_adds_each_tenants_fine_tuning_to_its_sessions(
    services: Services, live_url: str, tenant_a: TenantKeys, tenant_b: TenantKeys
) -> None:
    engine = services.engine
    base = make_base(engine)
    queue = JobQueue(engine, max_running_per_tenant=10)
    trained, running = enqueue_jobs(
        engine, tenant_b.tenant_id, base.id, make_file(engine, tenant_b.tenant_id).id, 2
    )
    assert queue.claim("w-1") is not None and queue.claim("w-1") is not None
    assert queue.complete(trained, "w-1", trained_tokens=4096) is not None

    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    start, end = hour - timedelta(hours=2), hour + timedelta(hours=1)
    with engine.connect() as conn:
        changes = _status_changes(conn)
    # trained ran from 20 to 50 minutes into the window; running started 70 minutes in.
    offsets = {(trained, "running"): 20, (trained, "succeeded"): 50, (running, "running"): 70}
    _retime(
        engine,
        {i: start + timedelta(minutes=offsets[(job, status)]) for i, job, status in changes},
    )

    operator = PlatformAdmin(Client(live_url, tenant_a.admin))
    (row,) = operator.usage(start.isoformat(), end.isoformat())
    ran = (datetime.now(UTC) - (start + timedelta(minutes=70))).total_seconds()
    assert row.pop("trainer_seconds") == pytest.approx(30 * 60 + ran, abs=5)
    assert row == {
        "tenant": "tenant-b",
        "training_tokens": 0,
        "prefill_tokens": 0,
        "sampled_tokens": 0,
        "checkpoints": 0,
        "fine_tuning_jobs": 1,
        "fine_tuning_trained_tokens": 4096,
    }
    # The hour before the window's: nothing ran; a tenant's own admin may not read it.
    assert operator.usage((start - timedelta(hours=1)).isoformat(), start.isoformat()) == []
    with pytest.raises(LoraforgeError) as refused:
        PlatformAdmin(Client(live_url, tenant_b.admin)).usage(start.isoformat(), end.isoformat())
    assert refused.value.status == 403
