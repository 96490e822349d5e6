"""`FineTuningJob` through kopf against the fake API server and the real control plane."""

from __future__ import annotations

import asyncio
import functools
import http.server
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import insert, text

from control_plane.db.tables import Job
from control_plane.ids import new_id
from operators.finetuningjob import version_digest
from tests.factories import ADDITION_CHATS as RECORDS
from tests.factories import enqueue_jobs, make_file
from tests.operator.conftest import FakeKube, Platform, eventually, running_operator

pytestmark = [pytest.mark.operator, pytest.mark.asyncio]

FAST = {
    "nEpochs": 3,
    "batchSize": 4,
    "learningRateMultiplier": 10,
    "loraRank": 8,
    "maxSeqLength": 64,
}


async def given_credentials(kube: FakeKube, platform: Platform) -> None:
    await kube.secret("loraforge-api", {"url": platform.url, "apiKey": platform.keys.member})


def job(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "loraforge.dev/v1alpha1",
        "kind": "FineTuningJob",
        "metadata": {"name": name},
        "spec": {"credentialsSecretRef": {"name": "loraforge-api"}, "model": "tiny-llama", **spec},
    }


def status_of(kube: FakeKube, name: str, key: str) -> Any:
    async def probe() -> Any:
        found = await kube.get("finetuningjobs", name)
        return (found or {}).get("status", {}).get(key)

    return probe


async def test_a_finetuningjob_becomes_exactly_one_job_and_ends_succeeded_with_its_version(
    kube: FakeKube, platform: Platform
) -> None:
    await given_credentials(kube, platform)
    data = "".join(json.dumps(r) + "\n" for r in RECORDS)
    await kube.secret("sums-data", {"train.jsonl": data})
    spec = {
        "dataset": {"secretRef": {"name": "sums-data", "key": "train.jsonl"}},
        "adapterName": "sums",
        "hyperparameters": FAST,
    }
    await kube.create("finetuningjobs", job("sums", **spec))
    async with running_operator(kube):
        job_id = await eventually(status_of(kube, "sums", "jobId"), what="a submitted job")
    # The operator stops, and the status write that recorded the job is lost: a restarted
    # operator submits again with the same idempotency key (the object's UID) and gets the same
    # job back, never a second one.
    await kube.patch("finetuningjobs", "sums", {"status": {"jobId": None}})
    async with running_operator(kube):
        await eventually(
            lambda: _phase_is(kube, "sums", "Succeeded"), timeout=180, what="Succeeded"
        )
    status = (await kube.get("finetuningjobs", "sums") or {})["status"]
    with platform.client() as client:
        jobs = client.request("GET", "/v1/fine_tuning/jobs")["data"]
        version = client.get_version("sums", 1)
    assert [j["id"] for j in jobs] == [job_id] and status["jobId"] == job_id
    assert status["jobStatus"] == "succeeded" and status["progress"] == pytest.approx(1.0)
    assert status["adapter"]["model"] == "sums@1" and status["adapter"]["version"] == 1
    assert status["adapter"]["digest"] == version_digest(version["files"])
    assert status["adapter"]["lineage"]["job_id"] == job_id
    assert status["adapter"]["lineage"]["datasets"][0]["sha256"]
    assert "train_loss" in status["metrics"] or "final_train_loss" in status["metrics"]
    assert status["observedGeneration"] == 1
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Submitted"]["status"] == "True"
    assert conditions["Succeeded"]["status"] == "True"
    assert conditions["Running"]["status"] == "False"
    assert await kube.events("Succeeded")


async def _phase_is(kube: FakeKube, name: str, phase: str) -> bool:
    found = await kube.get("finetuningjobs", name) or {}
    return bool(found.get("status", {}).get("phase") == phase)


async def test_deleting_a_running_finetuningjob_cancels_its_job(
    kube: FakeKube, platform: Platform
) -> None:
    await given_credentials(kube, platform)
    with platform.client() as client:
        data = "".join(json.dumps(r) + "\n" for r in RECORDS * 8)
        path = platform.services.settings.home / "long.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(data)
        file_id = client.upload_file(path)["id"]
    spec = {
        "dataset": {"fileId": file_id},
        "hyperparameters": {**FAST, "nEpochs": 20, "batchSize": 2},
    }
    await kube.create("finetuningjobs", job("long", **spec))
    async with running_operator(kube):
        await eventually(lambda: _phase_is(kube, "long", "Running"), timeout=120, what="Running")
        job_id = await status_of(kube, "long", "jobId")()
        await kube.delete("finetuningjobs", "long")
        # The finalizer holds the object until the job is told to cancel.
        await eventually(lambda: _gone(kube, "long"), timeout=30, what="the object to be released")
    with platform.client() as client:
        for _ in range(100):
            state = client.retrieve_job(job_id)["status"]
            if state == "cancelled":
                break
            await asyncio.sleep(0.2)
    assert state == "cancelled"


async def test_suspending_a_running_finetuningjob_pauses_its_job_and_unsuspending_resumes_it(
    kube: FakeKube, platform: Platform
) -> None:
    """`spec.suspend`, as on a Kubernetes Job: true pauses the submitted job (it stops at its
    next step with a checkpoint and the object shows `Suspended`), false resumes it from there."""
    await given_credentials(kube, platform)
    with platform.client() as client:
        path = platform.services.settings.home / "long.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS * 8))
        file_id = client.upload_file(path)["id"]
    spec = {
        "dataset": {"fileId": file_id},
        "hyperparameters": {**FAST, "nEpochs": 20, "batchSize": 2},
    }
    await kube.create("finetuningjobs", job("pausable", **spec))
    async with running_operator(kube):
        await eventually(
            lambda: _phase_is(kube, "pausable", "Running"), timeout=120, what="Running"
        )
        job_id = await status_of(kube, "pausable", "jobId")()
        await kube.patch("finetuningjobs", "pausable", {"spec": {"suspend": True}})
        await eventually(
            lambda: _phase_is(kube, "pausable", "Suspended"), timeout=60, what="Suspended"
        )
        assert await status_of(kube, "pausable", "jobStatus")() == "paused"
        with platform.client() as client:
            assert client.retrieve_job(job_id)["status"] == "paused"
            checkpoints = client.request("GET", f"/v1/fine_tuning/jobs/{job_id}/checkpoints")
        assert checkpoints["data"]  # it paused at a checkpoint
        await kube.patch("finetuningjobs", "pausable", {"spec": {"suspend": False}})
        await eventually(
            lambda: _phase_is(kube, "pausable", "Running"), timeout=120, what="Running again"
        )
        with platform.client() as client:
            messages = [e["message"] for e in client.list_events(job_id, limit=1000)["data"]]
        assert "Job resumed" in messages
        assert any(m.startswith("resumed from step") for m in messages)
        await kube.delete("finetuningjobs", "pausable")
        await eventually(lambda: _gone(kube, "pausable"), timeout=30, what="the object to go")


def given_the_tenant_runs_its_one_job(platform: Platform) -> tuple[str, str]:
    """The tenant may run one job at a time and runs one, under a holder's lease from the start
    (inserted so: the trainer never sees it). The holder's job id, and the tiny base's id."""
    engine = platform.services.engine
    tenant = platform.keys.tenant_id
    with engine.begin() as conn:
        conn.execute(text("UPDATE tenants SET max_running_jobs = 1 WHERE id = :t"), {"t": tenant})
        base_id = conn.execute(
            text("SELECT id FROM base_models WHERE name = 'tiny-llama'")
        ).scalar_one()
    holder = new_id("job")
    with engine.begin() as conn:
        conn.execute(
            insert(Job),
            [
                {
                    "id": holder,
                    "tenant_id": tenant,
                    "status": "running",
                    "base_model_id": base_id,
                    "training_file_id": make_file(engine, tenant).id,
                    "hyperparameters": {},
                    "attempt": 1,
                    "lease_owner": "holder",
                    "lease_expires_at": datetime.now(UTC) + timedelta(hours=1),
                    "started_at": datetime.now(UTC),
                }
            ],
        )
    return holder, base_id


async def test_a_queued_finetuningjob_says_what_it_waits_for_until_it_runs(
    kube: FakeKube, platform: Platform
) -> None:
    """While its job is queued, status says why (`queue`, and a `Waiting` condition with the
    reason): here its tenant holds its one running job (a holder's lease, not the trainer's)."""
    await given_credentials(kube, platform)
    holder, _ = given_the_tenant_runs_its_one_job(platform)
    data = "".join(json.dumps(r) + "\n" for r in RECORDS)
    await kube.secret("wait-data", {"train.jsonl": data})
    spec = {
        "dataset": {"secretRef": {"name": "wait-data", "key": "train.jsonl"}},
        # Long enough to be seen `Running` between two polls (FAST's few steps can end first).
        "hyperparameters": {**FAST, "nEpochs": 50},
    }
    await kube.create("finetuningjobs", job("waiting", **spec))
    async with running_operator(kube):
        await eventually(lambda: _phase_is(kube, "waiting", "Queued"), timeout=60, what="Queued")
        queue = await eventually(status_of(kube, "waiting", "queue"), what="its standing")
        assert queue["waitingFor"] == "tenant_limit" and queue["ownJobsAhead"] == 0
        assert "runs 1 job and may run 1 at a time" in queue["message"]
        conditions = {c["type"]: c for c in await status_of(kube, "waiting", "conditions")()}
        assert conditions["Waiting"]["status"] == "True"
        assert conditions["Waiting"]["reason"] == "TenantLimit"
        assert conditions["Waiting"]["message"] == queue["message"]

        # The holder's job ends: the trainer claims this one, and nothing is waited for.
        assert platform.services.queue.complete(holder, "holder") is not None
        await eventually(lambda: _phase_is(kube, "waiting", "Running"), timeout=60, what="Running")
        await eventually(
            lambda: _waiting_is(kube, "waiting", "False"), timeout=30, what="Waiting False"
        )
        assert await status_of(kube, "waiting", "queue")() is None
        await kube.delete("finetuningjobs", "waiting")
        await eventually(lambda: _gone(kube, "waiting"), timeout=30, what="the object to go")


async def test_raising_a_queued_finetuningjobs_priority_moves_it_before_its_tenants_older_jobs(
    kube: FakeKube, platform: Platform
) -> None:
    """`spec.priority` is followed after submission: raised, the queued job takes its new place
    at once (none of its tenant's jobs ahead of it any more), and when its tenant's slot frees
    the trainer takes it before the jobs submitted earlier. Above its tenant's cap it is not
    taken, and a `PriorityRefused` condition says why until the cap is lifted."""
    await given_credentials(kube, platform)
    holder, base_id = given_the_tenant_runs_its_one_job(platform)
    engine, tenant = platform.services.engine, platform.keys.tenant_id
    older = enqueue_jobs(engine, tenant, base_id, make_file(engine, tenant).id, 2)
    data = "".join(json.dumps(r) + "\n" for r in RECORDS)
    await kube.secret("urgent-data", {"train.jsonl": data})
    spec = {
        "dataset": {"secretRef": {"name": "urgent-data", "key": "train.jsonl"}},
        "hyperparameters": FAST,
    }
    await kube.create("finetuningjobs", job("urgent", **spec))
    async with running_operator(kube):
        await eventually(lambda: _own_jobs_ahead_are(kube, "urgent", 2), what="2 jobs ahead")
        job_id = await status_of(kube, "urgent", "jobId")()
        _cap_priority(platform, 20)
        await kube.patch("finetuningjobs", "urgent", {"spec": {"priority": 50}})
        await eventually(
            lambda: _condition_is(kube, "urgent", "PriorityRefused", "True"), what="refused"
        )
        conditions = await status_of(kube, "urgent", "conditions")()
        [refused] = [c for c in conditions if c["type"] == "PriorityRefused"]
        assert refused["reason"] == "AboveTenantCap" and "above 20" in refused["message"]
        assert await status_of(kube, "urgent", "priority")() == 0
        assert await _own_jobs_ahead_are(kube, "urgent", 2)
        _cap_priority(platform, None)
        await eventually(lambda: _own_jobs_ahead_are(kube, "urgent", 0), what="none ahead")
        assert await _condition_is(kube, "urgent", "PriorityRefused", "False")
        assert await status_of(kube, "urgent", "priority")() == 50
        with platform.client() as client:
            assert client.retrieve_job(job_id)["priority"] == 50
            # The holder's job ends: the trainer takes this one before its tenant's older ones.
            assert platform.services.queue.complete(holder, "holder") is not None
            await eventually(
                lambda: client.retrieve_job(job_id)["status"] != "queued", what="its claim"
            )
            assert [client.retrieve_job(j)["status"] for j in older] == ["queued", "queued"]
            for older_id in older:
                client.cancel_job(older_id)
        await kube.delete("finetuningjobs", "urgent")
        await eventually(lambda: _gone(kube, "urgent"), timeout=30, what="the object to go")


async def _own_jobs_ahead_are(kube: FakeKube, name: str, count: int) -> bool:
    queue = await status_of(kube, name, "queue")() or {}
    return bool(queue.get("ownJobsAhead") == count)


async def _waiting_is(kube: FakeKube, name: str, value: str) -> bool:
    return await _condition_is(kube, name, "Waiting", value)


async def _condition_is(kube: FakeKube, name: str, kind: str, value: str) -> bool:
    conditions = await status_of(kube, name, "conditions")() or []
    return any(c["type"] == kind and c["status"] == value for c in conditions)


def _cap_priority(platform: Platform, cap: int | None) -> None:
    """The highest priority the tenant's jobs may ask for (`loraforge admin tenant`)."""
    with platform.services.engine.begin() as conn:
        conn.execute(
            text("UPDATE tenants SET max_priority = :cap WHERE id = :id"),
            {"cap": cap, "id": platform.keys.tenant_id},
        )


async def _gone(kube: FakeKube, name: str) -> bool:
    return await kube.get("finetuningjobs", name) is None


async def test_a_spec_the_api_refuses_ends_failed_with_the_api_error_code(
    kube: FakeKube, platform: Platform
) -> None:
    await given_credentials(kube, platform)
    bad = job("bad", dataset={"fileId": "file-nope"}, model="no-such-base")
    await kube.create("finetuningjobs", bad)
    async with running_operator(kube):
        await eventually(lambda: _phase_is(kube, "bad", "Failed"), what="Failed")
        await asyncio.sleep(1.5)  # further ticks leave a refused spec alone
    status = (await kube.get("finetuningjobs", "bad") or {})["status"]
    assert status["error"]["code"] == "model_not_found"
    assert "no base model named 'no-such-base'" in status["error"]["message"]
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True" and failed["reason"] == "model_not_found"
    assert "jobId" not in status
    with platform.client() as client:
        assert client.request("GET", "/v1/fine_tuning/jobs")["data"] == []
    assert len(await kube.events("Failed")) == 1


async def test_a_job_its_serving_target_could_not_serve_ends_failed_before_it_trains(
    kube: FakeKube, platform: Platform
) -> None:
    """`servingTarget` reaches the API's check at create: a rank-64 adapter for max-rank-16 pods
    is refused before a job exists, with the rank the pods would need."""
    await given_credentials(kube, platform)
    data = "".join(json.dumps(r) + "\n" for r in RECORDS)
    await kube.secret("wide-data", {"train.jsonl": data})
    spec = {
        "dataset": {"secretRef": {"name": "wide-data", "key": "train.jsonl"}},
        "hyperparameters": {**FAST, "loraRank": 64},
        "servingTarget": {"maxLoraRank": 16, "servedModel": "tiny-llama"},
    }
    await kube.create("finetuningjobs", job("wide", **spec))
    async with running_operator(kube):
        await eventually(lambda: _phase_is(kube, "wide", "Failed"), what="Failed")
    status = (await kube.get("finetuningjobs", "wide") or {})["status"]
    assert status["error"]["code"] == "unservable_adapter"
    assert "--max-lora-rank 64" in status["error"]["message"]
    assert "jobId" not in status
    with platform.client() as client:
        assert client.request("GET", "/v1/fine_tuning/jobs")["data"] == []


@pytest.fixture
def dataset_url(tmp_path: Path) -> Iterator[str]:
    """The training data served over HTTP, as a dataset URL points at it."""
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/train.jsonl"
    server.shutdown()
    server.server_close()


async def test_a_dataset_by_url_is_uploaded_once_and_a_finished_job_goes_after_its_ttl(
    kube: FakeKube, platform: Platform, dataset_url: str
) -> None:
    await given_credentials(kube, platform)
    spec = {
        "dataset": {"url": dataset_url},
        "adapterName": "from-url",
        "hyperparameters": FAST,
        "ttlSecondsAfterFinished": 2,
    }
    await kube.create("finetuningjobs", job("from-url", **spec))
    async with running_operator(kube):
        file_id = await eventually(status_of(kube, "from-url", "trainingFileId"), what="upload")
        await eventually(
            lambda: _phase_is(kube, "from-url", "Succeeded"), timeout=180, what="Succeeded"
        )
        await eventually(lambda: _gone(kube, "from-url"), timeout=30, what="deleted after ttl")
    served = httpx.get(dataset_url).content
    with platform.client() as client:
        files = client.request("GET", "/v1/files")["data"]
        assert [f["id"] for f in files] == [file_id]  # uploaded once
        assert files[0]["bytes"] == len(served)
        (done,) = client.request("GET", "/v1/fine_tuning/jobs")["data"]
    assert done["status"] == "succeeded" and done["training_file"] == file_id


async def test_a_finetuningjob_with_method_dpo_submits_a_dpo_job_with_its_beta(
    kube: FakeKube, platform: Platform
) -> None:
    """`spec.method` reaches the API in OpenAI's shape: a DPO job on a preference dataset, its
    beta stored; a supervised object given a preference dataset ends Failed with the API's
    code rather than training on it."""
    from tests.integration.test_dpo_recipe import PAIRS

    await given_credentials(kube, platform)
    with platform.client() as client:
        path = platform.services.settings.home / "prefs.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
        file_id = client.upload_file(path)["id"]
    dpo = {
        "dataset": {"fileId": file_id},
        "method": {"type": "dpo", "beta": 0.3},
        "hyperparameters": FAST,
    }
    await kube.create("finetuningjobs", job("prefs", **dpo))
    await kube.create("finetuningjobs", job("wrong", dataset={"fileId": file_id}))
    async with running_operator(kube):
        job_id = await eventually(status_of(kube, "prefs", "jobId"), what="a submitted job")
        await eventually(lambda: _phase_is(kube, "wrong", "Failed"), timeout=60, what="Failed")
    with platform.client() as client:
        submitted = client.retrieve_job(job_id)
    assert submitted["method"]["type"] == "dpo"
    assert submitted["method"]["dpo"]["hyperparameters"]["beta"] == pytest.approx(0.3)
    assert submitted["hyperparameters"]["dpo_beta"] == pytest.approx(0.3)
    conditions = (await kube.get("finetuningjobs", "wrong") or {})["status"]["conditions"]
    failed = next(c for c in conditions if c["type"] == "Failed")
    assert failed["reason"] == "invalid_file_format" or "invalid_file_format" in failed["message"]
