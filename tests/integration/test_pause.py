"""Pausing and resuming a fine-tuning job (OpenAI's `pause` and `resume`), on a real
PostgreSQL: a queued job pauses at once and is claimed by no one until resumed; a running one
is asked to, and its worker's hand-back leaves it `paused` with its attempt not used. The
queue's bookkeeping stays exact through every step (`queue_stats.drift`). A real trainer
pausing a job mid-training is in `test_trainer.py`."""

from __future__ import annotations

import time

import openai
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from control_plane.queue import JobQueue, JobStateError
from control_plane.services import Services
from tests.api_harness import TenantKeys
from tests.factories import (
    assert_no_drift,
    create_validating_job,
    enqueue_jobs,
    make_base,
    make_file,
    make_tenant,
)


def _messages(engine: Engine, job_id: str) -> list[str]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                text("SELECT message FROM job_events WHERE job_id = :id ORDER BY id"),
                {"id": job_id},
            ).scalars()
        )


def _state(engine: Engine, job_id: str) -> tuple[str, bool, int, str | None]:
    with engine.connect() as conn:
        row = conn.execute(
            text("SELECT status, pause_requested, attempt, lease_owner FROM jobs WHERE id = :id"),
            {"id": job_id},
        ).one()
    return row.status, row.pause_requested, row.attempt, row.lease_owner


def test_a_queued_job_pauses_at_once_and_resumes_through_the_openai_client(
    services: Services, live_url: str, tenant_a: TenantKeys
) -> None:
    engine = services.engine
    base_id = make_base(engine, "tiny-pause").id
    file = make_file(engine, tenant_a.tenant_id)
    [job_id, other_id] = enqueue_jobs(engine, tenant_a.tenant_id, base_id, file.id, 2)
    client = openai.OpenAI(base_url=f"{live_url}/v1", api_key=tenant_a.admin, max_retries=0)

    paused = client.fine_tuning.jobs.pause(job_id)
    assert paused.id == job_id and paused.status == "paused"
    assert _state(engine, job_id) == ("paused", False, 0, None)
    assert_no_drift(engine)
    assert client.fine_tuning.jobs.pause(job_id).status == "paused"  # again: nothing changes
    assert client.fine_tuning.jobs.retrieve(job_id).status == "paused"
    listed = {j.id: j.status for j in client.fine_tuning.jobs.list().data}
    assert listed == {job_id: "paused", other_id: "queued"}

    # Out of the queue: the other job is claimed, then nothing is.
    claimed = services.queue.claim("w1")
    assert claimed is not None and claimed.id == other_id
    assert services.queue.claim("w2") is None
    assert_no_drift(engine)

    resumed = client.fine_tuning.jobs.resume(job_id)
    assert resumed.status == "queued"
    assert client.fine_tuning.jobs.resume(job_id).status == "queued"  # a queued job stays
    assert_no_drift(engine)
    again = services.queue.claim("w2")
    assert again is not None and again.id == job_id and again.attempt == 1
    assert _messages(engine, job_id)[-3:] == [
        "Job paused; resume it to go on from its newest checkpoint",
        "Job resumed",
        "Job started by w2 (attempt 1 of 3)",
    ]

    # Only queued and running jobs pause; only paused ones resume.
    assert services.queue.complete(job_id, "w2") is not None
    with pytest.raises(openai.ConflictError) as finished:
        client.fine_tuning.jobs.pause(job_id)
    assert finished.value.code == "job_not_pausable"
    assert "is succeeded" in finished.value.message
    with pytest.raises(openai.ConflictError) as not_paused:
        client.fine_tuning.jobs.resume(job_id)
    assert not_paused.value.code == "job_not_resumable"
    validating = create_validating_job(engine, tenant_a.tenant_id, base_id, file.id)
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.pause(validating)
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.pause("ftjob-nothing")
    assert_no_drift(engine)


def test_another_tenants_job_and_a_reader_key_pause_nothing(
    services: Services, client: TestClient, tenant_a: TenantKeys, tenant_b: TenantKeys
) -> None:
    engine = services.engine
    base = make_base(engine, "tiny-pause")
    [job_id] = enqueue_jobs(
        engine, tenant_a.tenant_id, base.id, make_file(engine, tenant_a.tenant_id).id, 1
    )
    for role_headers, status, code in [
        (tenant_b.headers(), 404, "fine_tuning_job_not_found"),
        (tenant_a.headers("reader"), 403, "read_only_key"),
    ]:
        for action in ("pause", "resume"):
            answer = client.post(f"/v1/fine_tuning/jobs/{job_id}/{action}", headers=role_headers)
            assert answer.status_code == status and answer.json()["error"]["code"] == code
    assert _state(engine, job_id)[0] == "queued"


@pytest.fixture
def world(engine: Engine) -> dict[str, str]:
    tenant = make_tenant(engine, "acme", max_running_jobs=1)
    base = make_base(engine)
    return {"tenant": tenant.id, "base": base.id, "file": make_file(engine, tenant.id).id}


def test_a_running_job_asked_to_pause_is_paused_by_its_workers_hand_back(
    engine: Engine, world: dict[str, str]
) -> None:
    ids = enqueue_jobs(engine, world["tenant"], world["base"], world["file"], 2)
    queue = JobQueue(engine, max_running_per_tenant=1)
    claimed = queue.claim("w1")
    assert claimed is not None
    job_id, [next_id] = claimed.id, [i for i in ids if i != claimed.id]

    asked = queue.request_pause(job_id)
    assert asked.status == "running" and asked.pause_requested
    assert queue.request_pause(job_id).pause_requested  # asked again: one event
    beat = queue.heartbeat(job_id, "w1")
    assert beat.held and beat.pause_requested and not beat.cancel_requested
    # Withdrawn before the worker stopped: it goes on.
    assert queue.resume(job_id).status == "running"
    assert not queue.heartbeat(job_id, "w1").pause_requested
    queue.request_pause(job_id)
    assert_no_drift(engine)
    assert queue.claim("w2") is None  # the tenant's one running slot is still held

    handed = queue.hand_back(job_id, "w1", reason="asked to; stopped by w1 with a checkpoint")
    assert handed is not None and handed.status == "paused"
    assert _state(engine, job_id) == ("paused", False, 0, None)  # the attempt is not used
    assert_no_drift(engine)
    # Its slot is free: the tenant's next job is claimed, not the paused one.
    second = queue.claim("w2")
    assert second is not None and second.id == next_id
    assert queue.complete(next_id, "w2") is not None
    assert queue.claim("w2") is None
    assert queue.resume(job_id).status == "queued"
    third = queue.claim("w3")
    assert third is not None and third.id == job_id
    assert third.attempt == 1
    assert _messages(engine, job_id)[1:] == [
        "Pause requested: the job stops at its next step, with a checkpoint",
        "Pause withdrawn",
        "Pause requested: the job stops at its next step, with a checkpoint",
        "Job paused (asked to; stopped by w1 with a checkpoint); resume it to go on from its "
        "newest checkpoint",
        "Job resumed",
        "Job started by w3 (attempt 1 of 3)",
    ]
    assert_no_drift(engine)


def test_a_pause_asked_for_holds_when_the_worker_is_lost_or_the_attempt_fails(
    engine: Engine, world: dict[str, str]
) -> None:
    """What else ends a run sends a job asked to pause to `paused`, not back to the queue: its
    lease expiring (the attempt given back) and a failure another attempt would retry."""
    ids = enqueue_jobs(engine, world["tenant"], world["base"], world["file"], 2)
    queue = JobQueue(engine, lease_seconds=0.2, retry_backoff_seconds=0, max_running_per_tenant=1)
    job = queue.claim("w1")
    assert job is not None
    lost, [failing] = job.id, [i for i in ids if i != job.id]
    queue.request_pause(lost)
    time.sleep(0.3)
    [reaped] = queue.reap_expired_leases()
    assert reaped.id == lost and reaped.status == "paused"
    assert _state(engine, lost) == ("paused", False, 0, None)
    assert _messages(engine, lost)[-1].startswith("Attempt 1 stopped (the worker w1 stopped")
    assert_no_drift(engine)

    job = queue.claim("w2")
    assert job is not None and job.id == failing
    queue.request_pause(failing)
    failed = queue.fail(failing, "w2", code="oom", message="out of memory")
    assert failed is not None and failed.status == "paused" and failed.attempt == 1
    assert _messages(engine, failing)[-1] == (
        "Attempt 1 ended (out of memory); job paused; resume it to go on from its newest checkpoint"
    )
    assert_no_drift(engine)

    # A paused job cancels at once.
    assert queue.request_cancel(lost).status == "cancelled"
    with pytest.raises(JobStateError):
        queue.request_pause(lost)
    assert_no_drift(engine)
