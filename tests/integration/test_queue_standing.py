"""A queued job's standing in the queue (`control_plane.queue_standing`, `GET
/v1/fine_tuning/jobs/{id}/queue`): what it waits for and how many go before it, as the claim
ranks it. On random queues every queued job's standing equals a plain-Python ranking's, and the
job that stands `trainer` is the one the next claim takes; through the API, a person reads it
with their key, and a job that is not queued is refused with a reason."""

from __future__ import annotations

import secrets
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, text

from control_plane import trainers
from control_plane.job_status import ACTIVE, JobStatus
from control_plane.queue import JobQueue
from control_plane.queue_standing import standing
from control_plane.queue_stats import drift
from control_plane.services import Services
from loraforge import Client
from tests.api_harness import TenantKeys
from tests.factories import enqueue_jobs, insert_queued_jobs, make_base, make_file, make_tenant

DEFAULT_LIMIT = 2


@dataclass(frozen=True)
class Row:
    id: str
    tenant_id: str
    status: str
    priority: int
    created_at: datetime
    ready: bool


def reference_standing(
    rows: list[Row], limits: dict[str, int | None], served: dict[str, int], job: Row
) -> dict[str, Any]:
    """The claim's order written plainly (priority, then share = running + rank in the tenant's
    own order, then the tenant served least recently, never served first, then age and id; jobs
    backing off and tenants at their limit wait), and where `job` stands in it."""
    running = Counter(r.tenant_id for r in rows if r.status in ACTIVE)

    def limit(tenant: str) -> int:
        value = limits[tenant]
        return DEFAULT_LIMIT if value is None else value

    def served_key(tenant: str) -> tuple[int, int]:
        last = served.get(tenant)
        return (0, 0) if last is None else (1, last)

    claimable = [r for r in rows if r.status == JobStatus.QUEUED and r.ready]

    def order(r: Row) -> tuple[Any, ...]:
        return (-r.priority, r.created_at, r.id)

    tenant = job.tenant_id
    own_ahead = sum(1 for r in claimable if r.tenant_id == tenant and order(r) < order(job))
    found: dict[str, Any] = {
        "own_jobs_ahead": own_ahead,
        "share": running[tenant] + own_ahead + 1,
        "tenant_running": running[tenant],
        "tenant_limit": limit(tenant),
        "tenants_ahead": None,
    }
    if not job.ready:
        return found | {"waiting_for": "retry_backoff"}
    if running[tenant] >= limit(tenant):
        return found | {"waiting_for": "tenant_limit"}
    if own_ahead:
        return found | {"waiting_for": "own_jobs"}

    def key(r: Row) -> tuple[Any, ...]:
        return (-r.priority, running[r.tenant_id] + 1, served_key(r.tenant_id), r.created_at, r.id)

    ahead = {
        r.tenant_id
        for r in claimable
        if r.tenant_id != tenant and running[r.tenant_id] < limit(r.tenant_id) and key(r) < key(job)
    }
    return found | {
        "tenants_ahead": len(ahead),
        "waiting_for": "other_tenants" if ahead else "trainer",
    }


JOB = st.tuples(
    st.integers(0, 3),  # tenant (modulo the tenants drawn)
    st.integers(0, 1),  # base: a tenant's jobs on two bases are two lines
    st.integers(0, 2),  # priority
    st.integers(0, 4),  # created, seconds after the start (ties fall to the id)
    st.integers(0, 5),  # 0: backing off for an hour
)
OP = st.one_of(
    st.just(("claim",)),
    st.just(("claim",)),
    st.tuples(st.just("complete"), st.integers(0, 99)),
    st.tuples(st.just("fail"), st.integers(0, 99)),
    st.tuples(st.just("enqueue"), st.lists(JOB, min_size=1, max_size=3)),
)


@pytest.fixture
def scene(engine: Engine) -> dict[str, Any]:
    home = make_tenant(engine, "home")
    return {
        "bases": [make_base(engine, "base-a").id, make_base(engine, "base-b").id],
        "file": make_file(engine, home.id).id,
    }


@settings(
    max_examples=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    limits=st.lists(st.sampled_from([None, 1, 3]), min_size=1, max_size=4),
    initial=st.lists(JOB, min_size=3, max_size=14),
    ops=st.lists(OP, min_size=6, max_size=16),
)
def test_every_queued_jobs_standing_is_the_reference_rankings_and_next_is_what_is_claimed(
    engine: Engine,
    scene: dict[str, Any],
    limits: list[int | None],
    initial: list[tuple[int, int, int, int, int]],
    ops: list[tuple[Any, ...]],
) -> None:
    tag = secrets.token_hex(4)
    tenants = [
        make_tenant(engine, f"s-{tag}-{n}", max_running_jobs=limit).id
        for n, limit in enumerate(limits)
    ]
    tenant_limits = dict(zip(tenants, limits, strict=True))
    queue = JobQueue(engine, retry_backoff_seconds=3600, max_running_per_tenant=DEFAULT_LIMIT)
    start = datetime.now(UTC) - timedelta(days=1)
    served: dict[str, int] = {}

    def enqueue(specs: list[tuple[int, int, int, int, int]]) -> None:
        rows = [
            {
                "id": f"ftjob-{secrets.token_hex(12)}",
                "tenant_id": tenants[t % len(tenants)],
                "base_model_id": scene["bases"][b],
                "priority": p,
                "created_at": start + timedelta(seconds=c),
                "run_after": start + timedelta(days=2 if off == 0 else 0),
                "file": scene["file"],
            }
            for t, b, p, c, off in specs
        ]
        with engine.begin() as conn:
            insert_queued_jobs(conn, rows)

    def rows() -> list[Row]:
        with engine.connect() as conn:
            found = conn.execute(
                text(
                    "SELECT id, tenant_id, status, priority, created_at, run_after <= now() "
                    "FROM jobs WHERE tenant_id = ANY(:t)"
                ),
                {"t": tenants},
            ).all()
        return [Row(*r) for r in found]

    def next_by_standing(step: int) -> str | None:
        """Every queued job's standing against the reference's; the one standing `trainer`."""
        snapshot = rows()
        nexts = []
        with engine.connect() as conn:
            for job in (r for r in snapshot if r.status == JobStatus.QUEUED):
                got = standing(conn, job.id, queue)
                assert got is not None
                expected = reference_standing(snapshot, tenant_limits, served, job)
                seen = {k: getattr(got, k) for k in expected}
                assert seen == expected, f"step {step}: {job}"
                if got.waiting_for == "trainer":
                    nexts.append(job.id)
            for job in (r for r in snapshot if r.status != JobStatus.QUEUED):
                assert standing(conn, job.id, queue) is None
        assert len(nexts) <= 1, f"step {step}: more than one job stands next: {nexts}"
        return nexts[0] if nexts else None

    enqueue(initial)
    try:
        for step, op in enumerate(ops):
            expected_next = next_by_standing(step)
            if op[0] == "claim":
                job = queue.claim(f"w{step}")
                assert (job.id if job else None) == expected_next, f"step {step}"
                if job is not None:
                    served[job.tenant_id] = step
            elif op[0] == "enqueue":
                enqueue(op[1])
            else:
                held = sorted(r.id for r in rows() if r.status == JobStatus.RUNNING)
                if not held:
                    continue
                job_id = held[op[1] % len(held)]
                if op[0] == "complete":
                    assert queue.complete(job_id, _owner(engine, job_id)) is not None
                else:  # a retry backing off for an hour
                    queue.fail(job_id, _owner(engine, job_id), code="x", message="m")
        next_by_standing(len(ops))
        with engine.connect() as conn:
            assert drift(conn) == []
    finally:
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM tenants WHERE id = ANY(:t)"), {"t": tenants})


def _report(engine: Engine, trainer_id: str, job_id: str | None) -> None:
    with engine.begin() as conn:
        trainers.report(
            conn, trainers.TrainerReport(trainer_id, "host", 1, "cpu", current_job_id=job_id)
        )


def _owner(engine: Engine, job_id: str) -> str:
    with engine.connect() as conn:
        return str(
            conn.execute(
                text("SELECT lease_owner FROM jobs WHERE id = :id"), {"id": job_id}
            ).scalar_one()
        )


def test_a_person_reads_why_their_job_waits_and_it_moves_up_as_jobs_start(
    services: Services,
    client: TestClient,
    live_url: str,
    tenant_a: TenantKeys,
    tenant_b: TenantKeys,
) -> None:
    engine = services.engine
    queue = services.queue  # its default limit: 4 jobs running per tenant
    base_id = make_base(engine, "tiny-standing").id
    file_a = make_file(engine, tenant_a.tenant_id).id
    file_b = make_file(engine, tenant_b.tenant_id).id
    [b_first] = enqueue_jobs(engine, tenant_b.tenant_id, base_id, file_b, 1)
    # One at a time: each its own created_at, the oldest first.
    mine = [enqueue_jobs(engine, tenant_a.tenant_id, base_id, file_a, 1)[0] for _ in range(3)]
    sdk = openai.OpenAI(base_url=f"{live_url}/v1", api_key=tenant_a.reader, max_retries=0)

    def read(job_id: str) -> dict[str, Any]:
        got = sdk.get(f"/fine_tuning/jobs/{job_id}/queue", cast_to=object)
        assert isinstance(got, dict)
        return got

    last = read(mine[2])
    assert last["object"] == "fine_tuning.job.queue_standing"
    assert last["fine_tuning_job_id"] == mine[2]
    assert (last["waiting_for"], last["own_jobs_ahead"], last["share"]) == ("own_jobs", 2, 3)
    assert (
        last["message"] == "2 jobs of your own go first (a higher priority, or submitted earlier)."
    )
    # Tenant b's job is older; neither tenant was served: b goes first.
    first = read(mine[0])
    assert (first["waiting_for"], first["tenants_ahead"], first["own_jobs_ahead"]) == (
        "other_tenants",
        1,
        0,
    )
    assert first["message"] == (
        "It is your next job; 1 other organization's next job goes first (a higher priority, "
        "fewer jobs running, or served longer ago)."
    )

    claimed = queue.claim("w1")
    assert claimed is not None and claimed.id == b_first
    first = read(mine[0])
    assert (first["waiting_for"], first["tenants_ahead"]) == ("trainer", 0)
    assert (first["trainers_alive"], first["trainers_idle"]) == (0, 0)
    # An interactive executor, idle on the same base, takes no job: it is not a trainer.
    with engine.begin() as conn:
        trainers.report(
            conn,
            trainers.TrainerReport(
                "executor-0", "host", 1, "cpu", resident_base="tiny-standing", kind="interactive"
            ),
        )
    first = read(mine[0])
    assert (first["trainers_alive"], first["trainers_idle"]) == (0, 0)
    assert first["message"] == (
        "It is next, but no trainer is running: nothing takes it until one starts (ask the "
        "platform's operators)."
    )
    # Trainers heard from (a heartbeat's row): idle, then both busy.
    _report(engine, "trainer-0", None)
    _report(engine, "trainer-1", None)
    assert read(mine[0])["message"] == "It is next: an idle trainer takes it now."
    _report(engine, "trainer-0", b_first)
    _report(engine, "trainer-1", b_first)
    busy = read(mine[0])
    assert (busy["trainers_alive"], busy["trainers_idle"]) == (2, 0)
    assert busy["message"] == "It is next: the first of 2 busy trainers to finish its job takes it."
    assert queue.claim("w2").id == mine[0]  # type: ignore[union-attr]
    # The platform's own client reads the same.
    last = Client(live_url, tenant_a.reader).queue_standing(mine[2])
    assert (last["own_jobs_ahead"], last["share"], last["tenant_running"]) == (1, 3, 1)

    # The tenant at its limit: every queued job waits for one of its running jobs to end.
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE tenants SET max_running_jobs = 1 WHERE id = :t"),
            {"t": tenant_a.tenant_id},
        )
    last = read(mine[2])
    assert (last["waiting_for"], last["tenant_running"], last["tenant_limit"]) == (
        "tenant_limit",
        1,
        1,
    )
    assert last["message"] == (
        "Your organization runs 1 job and may run 1 at a time: this one starts when one of "
        "them ends."
    )

    # A retry backing off says until when.
    running = queue.claim("w3")
    assert running is None  # tenant a at its limit, b has nothing queued
    queue.fail(mine[0], "w2", code="x", message="m")
    backing = read(mine[0])
    assert backing["waiting_for"] == "retry_backoff"
    assert backing["run_after"] is not None and backing["run_after"] > datetime.now(UTC).timestamp()
    until = datetime.fromtimestamp(backing["run_after"], UTC).isoformat(timespec="seconds")
    assert backing["message"] == (
        f"A retry waiting out its backoff: no trainer takes it before {until}."
    )

    # Not queued: 409 with the reason; another tenant's job: 404; no key: 401.
    response = client.get(
        f"/v1/fine_tuning/jobs/{b_first}/queue", headers=tenant_b.headers("reader")
    )
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "job_not_queued"
    assert (
        "is running; only a queued job has a place in the queue"
        in response.json()["error"]["message"]
    )
    assert (
        client.get(f"/v1/fine_tuning/jobs/{mine[1]}/queue", headers=tenant_b.headers()).status_code
        == 404
    )
    assert client.get(f"/v1/fine_tuning/jobs/{mine[1]}/queue").status_code == 401
