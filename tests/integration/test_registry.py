"""The adapter registry end to end: publication, the REST API, pull, aliases, rebuild, faults.

Real PostgreSQL; a real S3-protocol server (moto in server mode, through boto3) and the local
store; real transformers + peft on the tiny test base. Tests parametrized on `store_kind` run
once per store; the others use the local store. Jobs are inserted and claimed through the
real queue (the trainer is not needed to publish a PEFT directory).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from control_plane import registry
from control_plane.records import BaseModelRecord, JobRecord
from control_plane.services import Services, build_services
from control_plane.settings import Settings
from control_plane.storage import LocalObjectStore, ObjectStore, S3ObjectStore
from loraforge.client import ChecksumError, Client
from loraforge.registry_cli import add_registry_commands
from loraforge.vllm_rules import vllm_problems
from tests.api_harness import TenantKeys
from tests.factories import enqueue_jobs, make_base, make_file, make_tenant
from tests.fixtures.testbase import TEST_BASE_PATH
from tests.integration.test_reads_at_scale import _statements_of
from tests.s3_server import S3_ACCESS_KEY_ID, S3_PREFIX, S3_REGION, S3_SECRET_ACCESS_KEY

BOTH = pytest.mark.parametrize("store_kind", ["local", "s3"])
WEIGHTS = "adapter_model.safetensors"

# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def store_kind() -> str:
    return "local"


@pytest.fixture
def store(request: pytest.FixtureRequest, store_kind: str) -> ObjectStore:
    found: ObjectStore = request.getfixturevalue(f"{store_kind}_store")
    return found


@pytest.fixture
def services(settings: Settings, database_url: str, store: ObjectStore) -> Iterator[Services]:
    """Overrides the harness's services: this module's store, and no celery worker."""
    built = build_services(settings, database_url=database_url, store=store)
    yield built
    built.close()


@pytest.fixture
def base(services: Services) -> BaseModelRecord:
    return make_base(services.engine, "tiny-llama")


# --------------------------------------------------------------------------- helpers


def claim_job(
    services: Services,
    tenant_id: str,
    base_id: str,
    *,
    adapter_name: str | None = None,
    worker: str = "worker-1",
) -> JobRecord:
    """A job running under `worker`'s lease, as a trainer holds it when it publishes."""
    engine = services.engine
    file = make_file(engine, tenant_id)
    [job_id] = enqueue_jobs(engine, tenant_id, base_id, file.id, 1)
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE jobs SET adapter_name = :n WHERE id = :id"),
            {"n": adapter_name, "id": job_id},
        )
    job = services.queue.claim(worker)
    assert job is not None and job.id == job_id
    return job


def lineage_for(job: JobRecord) -> dict[str, Any]:
    return {
        "job_id": job.id,
        "base_model": {"name": "tiny-llama", "revision": "main", "sha256": "ab" * 32},
        "datasets": {
            "training": {
                "file_id": job.training_file_id,
                "sha256": "cd" * 32,
                "examples": 120,
                "tokens": 4096,
            },
            "validation": None,
        },
        "hyperparameters": job.hyperparameters,
        "libraries": {"torch": "2.13.0", "transformers": "5.23.0", "peft": "0.21.2"},
        "parent_version": None,
        "metrics": {"train_loss": 1.25, "eval_loss": 1.5},
        "notes": {"unicode": "é✓", "mixed": [1, 2.5, None, True]},
    }


def publish(
    services: Services, job: JobRecord, adapter_dir: Path, *, worker: str = "worker-1"
) -> registry.PublishedVersion:
    published = registry.publish_job_adapter(
        services,
        job=job,
        worker_id=worker,
        adapter_dir=adapter_dir,
        lineage=lineage_for(job),
        metrics={"train_loss": 1.25},
    )
    assert published is not None
    return published


def publish_new(
    services: Services, tenant_id: str, base: BaseModelRecord, adapter_dir: Path, name: str
) -> registry.AdapterVersionRecord:
    return publish(
        services, claim_job(services, tenant_id, base.id, adapter_name=name), adapter_dir
    ).version


def flip_byte(store: ObjectStore, key: str) -> None:
    """Corrupt a stored object behind the store's back, keeping its recorded sha256."""
    if isinstance(store, LocalObjectStore):
        path = store.root / key
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        with path.open("r+b") as f:
            f.write(data)
        return
    assert isinstance(store, S3ObjectStore)
    full = f"{store.prefix}/{key}"
    raw = store.client.get_object(Bucket=store.bucket, Key=full)
    data = bytearray(raw["Body"].read())
    data[len(data) // 2] ^= 0xFF
    store.client.put_object(
        Bucket=store.bucket, Key=full, Body=bytes(data), Metadata=raw["Metadata"]
    )


def tree(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def key_id(engine: Engine, plaintext: str) -> str:
    with engine.connect() as conn:
        return str(
            conn.execute(
                text("SELECT id FROM api_keys WHERE prefix = :p"), {"p": plaintext[:10]}
            ).scalar_one()
        )


def job_row(engine: Engine, job_id: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(text("SELECT * FROM jobs WHERE id = :id"), {"id": job_id}).one()


def version_count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM adapter_versions")).scalar_one())


def logits(adapter_dir: Path | None) -> Any:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(TEST_BASE_PATH)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    with torch.no_grad():
        return model(torch.tensor([[5, 17, 42, 99, 3]])).logits


# --------------------------------------------------------------------------- the happy path


@BOTH
def test_publish_list_alias_pull_and_load_with_peft(
    services: Services,
    store: ObjectStore,
    client: TestClient,
    live_url: str,
    tenant_a: TenantKeys,
    base: BaseModelRecord,
    peft_adapter: Path,
    tmp_path: Path,
) -> None:
    import torch

    job = claim_job(services, tenant_a.tenant_id, base.id, adapter_name="support-bot")
    published = publish(services, job, peft_adapter)
    assert published.created and published.version.number == 1
    finished = job_row(services.engine, job.id)
    assert (finished.status, finished.fine_tuned_model) == ("succeeded", "support-bot@1")
    prefix = published.version.object_prefix
    assert store.list_keys(prefix) == [
        prefix + n for n in (*registry.ADAPTER_FILES, "manifest.json")
    ]

    reader = tenant_a.headers("reader")
    adapters = client.get("/v1/adapters", headers=reader).json()["data"]
    assert [(a["name"], a["base_model"], a["latest_version"]) for a in adapters] == [
        ("support-bot", "tiny-llama", 1)
    ]
    versions = client.get("/v1/adapters/support-bot/versions", headers=reader).json()["data"]
    assert [v["model"] for v in versions] == ["support-bot@1"]
    moved = client.put(
        "/v1/adapters/support-bot/aliases/prod",
        json={"version": 1},
        headers=tenant_a.headers("member"),
    )
    assert moved.status_code == 200, moved.text
    by_alias = client.get("/v1/adapters/support-bot/versions/prod", headers=reader).json()
    assert (by_alias["version"], by_alias["aliases"], by_alias["job_id"]) == (1, ["prod"], job.id)
    lineage = client.get("/v1/adapters/support-bot/versions/prod/lineage", headers=reader).json()
    assert lineage["lineage"] == lineage_for(job)
    files = client.get("/v1/adapters/support-bot/versions/1/files", headers=reader).json()["data"]
    assert {f["via"] for f in files} == {"presigned" if store_kind_of(store) == "s3" else "api"}

    target = tmp_path / "serving" / "support-bot"
    with Client(live_url, tenant_a.reader) as sdk:
        assert sdk.lineage("support-bot", "prod") == lineage_for(job)
        pulled = sdk.pull("support-bot@prod", target, base_model_name="served-tiny")
        assert pulled == target
        config = json.loads((target / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == "served-tiny"
        assert config["peft_type"] == "LORA"
        assert vllm_problems(target) == []  # vLLM's --lora-modules would take it as it is
        assert (target / WEIGHTS).read_bytes() == (peft_adapter / WEIGHTS).read_bytes()
        assert torch.equal(logits(target), logits(peft_adapter))
        assert not torch.equal(logits(target), logits(None))

        # The right version is already there: nothing is downloaded (the now-corrupt object
        # would be refused if it were), nothing is rewritten.
        flip_byte(store, prefix + WEIGHTS)
        before = {p.name: p.stat().st_mtime_ns for p in target.iterdir()}
        assert sdk.pull("support-bot@1", target, base_model_name="served-tiny") == target
        assert {p.name: p.stat().st_mtime_ns for p in target.iterdir()} == before
    assert sorted(p.name for p in target.parent.iterdir()) == ["support-bot"]


def store_kind_of(store: ObjectStore) -> str:
    return "s3" if isinstance(store, S3ObjectStore) else "local"


def test_cli_pull_and_rebuild(
    services: Services,
    store: ObjectStore,
    live_url: str,
    tenant_a: TenantKeys,
    base: BaseModelRecord,
    peft_adapter: Path,
    database_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    publish_new(services, tenant_a.tenant_id, base, peft_adapter, "cli-bot")
    parser = argparse.ArgumentParser(prog="loraforge")
    add_registry_commands(parser.add_subparsers(dest="command", required=True))
    target = tmp_path / "cli-bot"
    args = parser.parse_args(
        ["pull", "cli-bot", str(target), "--url", live_url, "--api-key", tenant_a.reader]
    )
    assert args.func(args, Settings()) == 0
    assert (target / WEIGHTS).read_bytes() == (peft_adapter / WEIGHTS).read_bytes()

    assert isinstance(store, LocalObjectStore)
    with services.engine.begin() as conn:
        conn.execute(text("DELETE FROM adapters"))
    args = parser.parse_args(["registry", "rebuild"])
    settings = Settings(database_url=database_url, local_store_dir=store.root, home=tmp_path / "h")
    capsys.readouterr()
    assert args.func(args, settings) == 0
    assert json.loads(capsys.readouterr().out)["versions_restored"] == 1


# --------------------------------------------------------------------------- exactly once


@BOTH
def test_version_numbers_stay_unique_under_concurrent_publishes(
    services: Services, store: ObjectStore, base: BaseModelRecord, peft_adapter: Path
) -> None:
    tenant = make_tenant(services.engine, "busy", max_running_jobs=16)
    jobs = [
        claim_job(services, tenant.id, base.id, adapter_name="shared", worker=f"w{i}")
        for i in range(8)
    ]
    start = threading.Barrier(8)

    def run(i: int) -> registry.PublishedVersion:
        start.wait()
        return publish(services, jobs[i], peft_adapter, worker=f"w{i}")

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, range(8)))
    assert sorted(r.version.number for r in results) == list(range(1, 9))
    for job, result in zip(jobs, results, strict=True):
        assert job_row(services.engine, job.id).fine_tuned_model == result.version.model_id
        assert result.version.job_id == job.id
    assert version_count(services.engine) == 8
    manifests = [k for k in store.list_keys("tenants/") if k.endswith("/manifest.json")]
    assert len(manifests) == 8


@BOTH
def test_duplicated_publish_of_one_job_yields_one_version(
    services: Services,
    store: ObjectStore,
    tenant_a: TenantKeys,
    base: BaseModelRecord,
    peft_adapter: Path,
) -> None:
    job = claim_job(services, tenant_a.tenant_id, base.id, adapter_name="dup")
    start = threading.Barrier(4)

    def run(_: int) -> registry.PublishedVersion:
        start.wait()
        return publish(services, job, peft_adapter)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, range(4)))
    assert sum(r.created for r in results) == 1
    assert len({r.version.id for r in results}) == 1
    assert version_count(services.engine) == 1
    # The losers removed what they had uploaded: one version's objects in the store.
    winner = results[0].version
    assert [k for k in store.list_keys("tenants/") if "/adapters/" in k] == [
        winner.object_prefix + n for n in (*registry.ADAPTER_FILES, "manifest.json")
    ]
    # A retry after the job succeeded publishes nothing new.
    again = publish(services, job, peft_adapter)
    assert (again.created, again.version.id) == (False, winner.id)
    assert version_count(services.engine) == 1


def test_publish_after_the_lease_was_lost_publishes_nothing(
    services: Services,
    store: ObjectStore,
    tenant_a: TenantKeys,
    base: BaseModelRecord,
    peft_adapter: Path,
) -> None:
    job = claim_job(services, tenant_a.tenant_id, base.id, adapter_name="late")
    result = registry.publish_job_adapter(
        services,
        job=job,
        worker_id="someone-else",
        adapter_dir=peft_adapter,
        lineage={},
        metrics={},
    )
    assert result is None
    assert version_count(services.engine) == 0
    assert job_row(services.engine, job.id).status == "running"
    assert [k for k in store.list_keys("tenants/") if "/adapters/" in k] == []


# --------------------------------------------------------------------------- aliases and index


def test_alias_history_records_actor_and_time(
    services: Services,
    client: TestClient,
    tenant_a: TenantKeys,
    base: BaseModelRecord,
    peft_adapter: Path,
) -> None:
    for _ in range(2):
        publish_new(services, tenant_a.tenant_id, base, peft_adapter, "bot")
    url = "/v1/adapters/bot/aliases/prod"
    began = time.time()
    assert (
        client.put(url, json={"version": 1}, headers=tenant_a.headers("admin")).status_code == 200
    )
    assert (
        client.put(url, json={"version": 2}, headers=tenant_a.headers("member")).status_code == 200
    )
    assert (
        client.put(url, json={"version": 2}, headers=tenant_a.headers("member")).status_code == 200
    )
    assert client.delete(url, headers=tenant_a.headers("member")).status_code == 200
    refused = client.put(url, json={"version": 1}, headers=tenant_a.headers("reader"))
    assert refused.status_code == 403
    missing = client.put(url, json={"version": 9}, headers=tenant_a.headers("member"))
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "version_not_found")

    history = client.get(f"{url}/history", headers=tenant_a.headers("reader")).json()["data"]
    admin, member = (
        key_id(services.engine, tenant_a.admin),
        key_id(services.engine, tenant_a.member),
    )
    assert [(e["from_version"], e["to_version"], e["actor_key_id"]) for e in history] == [
        (None, 1, admin),
        (1, 2, member),
        (2, None, member),
    ]
    times = [e["created_at"] for e in history]
    assert times == sorted(times) and began - 1 <= times[0] <= time.time() + 1
    assert client.get("/v1/adapters/bot/aliases", headers=tenant_a.headers()).json()["data"] == []


def test_version_is_deleted_only_when_no_alias_points_at_it(
    services: Services,
    store: ObjectStore,
    client: TestClient,
    tenant_a: TenantKeys,
    base: BaseModelRecord,
    peft_adapter: Path,
) -> None:
    first = publish_new(services, tenant_a.tenant_id, base, peft_adapter, "bot")
    publish_new(services, tenant_a.tenant_id, base, peft_adapter, "bot")
    member = tenant_a.headers("member")
    client.put("/v1/adapters/bot/aliases/staging", json={"version": 1}, headers=member)
    refused = client.delete("/v1/adapters/bot/versions/1", headers=member)
    assert (refused.status_code, refused.json()["error"]["code"]) == (409, "version_in_use")
    assert "staging" in refused.json()["error"]["message"]

    client.delete("/v1/adapters/bot/aliases/staging", headers=member)
    deleted = client.delete("/v1/adapters/bot/versions/1", headers=member)
    assert deleted.status_code == 200 and deleted.json()["objects_removed"] is True
    assert store.list_keys(first.object_prefix) == []
    assert client.get("/v1/adapters/bot/versions/1", headers=member).status_code == 404
    listed = client.get("/v1/adapters/bot/versions", headers=member).json()["data"]
    assert [v["version"] for v in listed] == [2]


def test_serving_index_etag_and_304(
    services: Services,
    client: TestClient,
    tenant_a: TenantKeys,
    base: BaseModelRecord,
    peft_adapter: Path,
) -> None:
    other = make_base(services.engine, "other-base")
    for name in ("alpha", "alpha", "beta"):
        publish_new(services, tenant_a.tenant_id, base, peft_adapter, name)
    publish_new(services, tenant_a.tenant_id, other, peft_adapter, "gamma")
    h = tenant_a.headers("member")
    client.put("/v1/adapters/alpha/aliases/prod", json={"version": 1}, headers=h)
    client.put("/v1/adapters/beta/aliases/prod", json={"version": 1}, headers=h)
    client.put("/v1/adapters/gamma/aliases/prod", json={"version": 1}, headers=h)

    params = {"base_model": "tiny-llama", "alias": "prod"}
    first = client.get("/v1/adapters/index", params=params, headers=h)
    assert first.status_code == 200
    etag = first.headers["ETag"]
    assert [v["model"] for v in first.json()["data"]] == ["alpha@1", "beta@1"]
    with services.engine.connect() as conn:
        assert etag == f'"{registry.serving_etag(conn, tenant_a.tenant_id, "tiny-llama", "prod")}"'
    answers = []
    statements = _statements_of(
        services.engine,
        lambda: answers.append(
            client.get("/v1/adapters/index", params=params, headers={**h, "If-None-Match": etag})
        ),
    )
    (unchanged,) = answers
    assert (unchanged.status_code, unchanged.content, unchanged.headers["ETag"]) == (304, b"", etag)
    # Unchanged, the answer reads the base and one serving generation: no adapter, no version.
    read = " ".join(statement for statement, _ in statements)
    assert "serving_generations" in read
    assert not any(table in read for table in ("adapter_versions", "adapter_aliases", "adapters"))

    client.put("/v1/adapters/alpha/aliases/prod", json={"version": 2}, headers=h)
    changed = client.get("/v1/adapters/index", params=params, headers={**h, "If-None-Match": etag})
    assert changed.status_code == 200 and changed.headers["ETag"] != etag
    assert [v["model"] for v in changed.json()["data"]] == ["alpha@2", "beta@1"]

    latest = client.get("/v1/adapters/index", params={"base_model": "tiny-llama"}, headers=h)
    assert [v["model"] for v in latest.json()["data"]] == ["alpha@2", "beta@1"]
    unknown = client.get("/v1/adapters/index", params={"base_model": "nope"}, headers=h)
    assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "base_model_not_found")


def test_every_change_to_what_an_index_holds_changes_its_etag(
    services: Services,
    client: TestClient,
    tenant_a: TenantKeys,
    tenant_b: TenantKeys,
    base: BaseModelRecord,
    peft_adapter: Path,
) -> None:
    """Each write that changes an index (a publish, an alias set, moved or deleted, a version
    deleted, a tenant's adapters deleted with it) answers the held ETag with 200 and the new
    content; writes that cannot change it (another tenant's, another base's) leave it at 304."""
    other = make_base(services.engine, "other-base")
    h = tenant_a.headers("member")

    def index(alias: str = "prod") -> tuple[str, list[str]]:
        answer = client.get(
            "/v1/adapters/index", params={"base_model": "tiny-llama", "alias": alias}, headers=h
        )
        assert answer.status_code == 200
        return answer.headers["ETag"], [v["model"] for v in answer.json()["data"]]

    def unchanged(etag: str, alias: str = "prod") -> bool:
        answer = client.get(
            "/v1/adapters/index",
            params={"base_model": "tiny-llama", "alias": alias},
            headers={**h, "If-None-Match": etag},
        )
        return answer.status_code == 304

    publish_new(services, tenant_a.tenant_id, base, peft_adapter, "alpha")
    etag, models = index()
    latest, _ = index("latest")
    assert models == []
    steps: list[tuple[Any, str, list[str]]] = [
        (
            lambda: publish_new(services, tenant_a.tenant_id, base, peft_adapter, "alpha"),
            "latest",
            ["alpha@2"],
        ),
        (
            lambda: client.put("/v1/adapters/alpha/aliases/prod", json={"version": 1}, headers=h),
            "prod",
            ["alpha@1"],
        ),
        (
            lambda: client.put("/v1/adapters/alpha/aliases/prod", json={"version": 2}, headers=h),
            "prod",
            ["alpha@2"],
        ),
        (lambda: client.delete("/v1/adapters/alpha/aliases/prod", headers=h), "prod", []),
        (
            lambda: client.delete("/v1/adapters/alpha/versions/2", headers=tenant_a.headers()),
            "latest",
            ["alpha@1"],
        ),
    ]
    held = {"prod": etag, "latest": latest}
    for write, alias, expected in steps:
        answer = write()
        assert getattr(answer, "status_code", 200) < 300, answer
        assert not unchanged(held[alias], alias)
        held[alias], models = index(alias)
        assert models == expected
        assert unchanged(held[alias], alias)

    # Another tenant's publish and this tenant's on another base: the index cannot change. (A
    # change to one alias's index may change the others' ETags: each is taken afresh first.)
    held = {alias: index(alias)[0] for alias in held}
    publish_new(services, tenant_b.tenant_id, base, peft_adapter, "alpha")
    publish_new(services, tenant_a.tenant_id, other, peft_adapter, "gamma")
    assert unchanged(held["latest"], "latest") and unchanged(held["prod"])

    # Writes around the API (a cascade): the tenant's adapters deleted with their rows.
    with services.engine.begin() as conn:
        conn.execute(text("DELETE FROM adapters WHERE tenant_id = :t"), {"t": tenant_a.tenant_id})
    assert not unchanged(held["latest"], "latest")
    assert index("latest")[1] == []


# --------------------------------------------------------------------------- bad input and faults


@BOTH
def test_corrupted_object_fails_pull_and_leaves_the_target_as_it_was(
    services: Services,
    store: ObjectStore,
    live_url: str,
    tenant_a: TenantKeys,
    base: BaseModelRecord,
    peft_adapter: Path,
    tmp_path: Path,
) -> None:
    publish_new(services, tenant_a.tenant_id, base, peft_adapter, "bot")
    second = publish_new(services, tenant_a.tenant_id, base, peft_adapter, "bot")
    target = tmp_path / "pulled" / "bot"
    with Client(live_url, tenant_a.reader) as sdk:
        sdk.pull("bot@1", target)
        before = tree(target.parent)
        flip_byte(store, second.object_prefix + WEIGHTS)
        with pytest.raises(ChecksumError) as caught:
            sdk.pull("bot@2", target)
    expected = second.file(WEIGHTS)
    assert expected is not None
    error = caught.value
    assert (error.filename, error.expected) == (WEIGHTS, expected["sha256"])
    assert error.actual != error.expected and len(error.actual) == 64
    assert WEIGHTS in str(error) and error.expected in str(error) and error.actual in str(error)
    assert tree(target.parent) == before  # same files, same bytes, no temp directory left


def test_unsafe_names_are_refused_with_4xx(
    services: Services,
    store: ObjectStore,
    client: TestClient,
    tenant_a: TenantKeys,
    base: BaseModelRecord,
    peft_adapter: Path,
) -> None:
    publish_new(services, tenant_a.tenant_id, base, peft_adapter, "bot")
    h = tenant_a.headers("member")
    for path in (
        "/v1/adapters/%2E%2E",
        "/v1/adapters/%2E%2E/versions",
        "/v1/adapters/a..b/versions/1",
        "/v1/adapters/bot%0Ax",
        "/v1/adapters/" + "a" * 129,
        "/v1/adapters/a%5Cb",
        "/v1/adapters/bot/versions/%2E%2E",
    ):
        response = client.get(path, headers=h)
        assert response.status_code == 400, path
        assert response.json()["error"]["code"] == "invalid_name", path
    # A NUL is refused before any route reads the name (control_plane.api.text_input).
    response = client.get("/v1/adapters/bot%00x/versions/latest", headers=h)
    assert response.status_code == 400
    assert (response.json()["error"]["code"], response.json()["error"]["param"]) == (
        "invalid_text",
        "name",
    )
    assert 400 <= client.get("/v1/adapters/a%2Fb/versions", headers=h).status_code < 500
    for alias in ("%2E%2E", "7", "latest", "x" * 65, "a%01b"):
        response = client.put(f"/v1/adapters/bot/aliases/{alias}", json={"version": 1}, headers=h)
        assert response.status_code == 400, alias

    for bad in ("../evil", "a/b", "x\x00", "\u0085y", "z" * 129, "index", "..", ".hidden"):
        with pytest.raises(registry.InvalidNameError):
            registry.validate_adapter_name(bad)
    derived = registry.derive_adapter_name("HuggingFaceTB/SmolLM2-135M-Instruct", "ftjob-1")
    assert derived == "SmolLM2-135M-Instruct-ftjob-1"
    assert registry.validate_adapter_name(registry.derive_adapter_name("..x y\n", "a..b"))
    job = claim_job(services, tenant_a.tenant_id, base.id, adapter_name="../../escape")
    with pytest.raises(registry.InvalidNameError):
        publish(services, job, peft_adapter)
    assert job_row(services.engine, job.id).status == "running"
    assert not any("escape" in k for k in store.list_keys(""))
    with pytest.raises(ValueError), Client("http://127.0.0.1:9", "k") as sdk:
        sdk.pull("../bot@1", Path("unused"))


def test_another_tenants_adapter_is_invisible(
    services: Services,
    client: TestClient,
    tenant_a: TenantKeys,
    tenant_b: TenantKeys,
    base: BaseModelRecord,
    peft_adapter: Path,
) -> None:
    publish_new(services, tenant_a.tenant_id, base, peft_adapter, "secret")
    client.put("/v1/adapters/secret/aliases/prod", json={"version": 1}, headers=tenant_a.headers())
    b = tenant_b.headers("admin")
    assert client.get("/v1/adapters", headers=b).json()["data"] == []
    for method, path in (
        ("GET", "/v1/adapters/secret"),
        ("GET", "/v1/adapters/secret/versions"),
        ("GET", "/v1/adapters/secret/versions/1"),
        ("GET", "/v1/adapters/secret/versions/prod"),
        ("GET", "/v1/adapters/secret/versions/1/lineage"),
        ("GET", "/v1/adapters/secret/versions/1/files"),
        ("GET", f"/v1/adapters/secret/versions/1/files/{WEIGHTS}"),
        ("GET", "/v1/adapters/secret/aliases"),
        ("GET", "/v1/adapters/secret/aliases/prod/history"),
        ("DELETE", "/v1/adapters/secret/aliases/prod"),
        ("DELETE", "/v1/adapters/secret/versions/1"),
    ):
        response = client.request(method, path, headers=b)
        assert response.status_code == 404, (method, path)
        assert response.json()["error"]["code"] == "adapter_not_found"
    moved = client.put("/v1/adapters/secret/aliases/prod", json={"version": 1}, headers=b)
    assert moved.status_code == 404
    index = client.get("/v1/adapters/index", params={"base_model": "tiny-llama"}, headers=b)
    assert index.json()["data"] == []
    # The same name is free in tenant b and starts its own line of versions.
    own = publish_new(services, tenant_b.tenant_id, base, peft_adapter, "secret")
    assert own.number == 1
    a_view = client.get("/v1/adapters/secret/versions/prod", headers=tenant_a.headers())
    assert a_view.json()["id"] != own.id


@pytest.fixture
def dead_endpoint() -> str:
    """An address where no S3 server answers (connection refused at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_store_outage_during_publish_leaves_the_job_retryable(
    services: Services,
    s3_store: S3ObjectStore,
    dead_endpoint: str,
    tenant_a: TenantKeys,
    base: BaseModelRecord,
    peft_adapter: Path,
) -> None:
    unreachable = boto3.session.Session().client(
        "s3",
        endpoint_url=dead_endpoint,
        region_name=S3_REGION,
        aws_access_key_id=S3_ACCESS_KEY_ID,
        aws_secret_access_key=S3_SECRET_ACCESS_KEY,
        config=Config(
            retries={"max_attempts": 1}, connect_timeout=1, s3={"addressing_style": "path"}
        ),
    )
    down = dataclasses.replace(services, store=S3ObjectStore(unreachable, "gone", S3_PREFIX))
    job = claim_job(services, tenant_a.tenant_id, base.id, adapter_name="bot")
    with pytest.raises(registry.StoreUnavailableError) as caught:
        publish(down, job, peft_adapter)
    assert caught.value.retryable

    class BucketVanishesMidPublish(S3ObjectStore):
        """The store loses its bucket right after the first file is uploaded."""

        def put_file(self, key: str, path: Path, **kwargs: Any) -> Any:
            info = super().put_file(key, path, **kwargs)
            for k in self.list_keys(""):
                self.delete(k)
            self.client.delete_bucket(Bucket=self.bucket)
            return info

    vanishing = BucketVanishesMidPublish(s3_store.client, s3_store.bucket, S3_PREFIX)
    with pytest.raises(registry.StoreUnavailableError):
        publish(dataclasses.replace(services, store=vanishing), job, peft_adapter)

    assert version_count(services.engine) == 0
    row = job_row(services.engine, job.id)
    assert (row.status, row.lease_owner, row.fine_tuned_model) == ("running", "worker-1", None)
    failed = services.queue.fail(
        job.id, "worker-1", code=caught.value.code, message=str(caught.value), retryable=True
    )
    assert failed is not None and failed.status == "queued"

    # The store is back: the retried job publishes (numbers 1 and 2 were used up: a gap).
    s3_store.client.create_bucket(Bucket=s3_store.bucket)
    with services.engine.begin() as conn:
        conn.execute(text("UPDATE jobs SET run_after = now() WHERE id = :id"), {"id": job.id})
    retried = services.queue.claim("worker-2")
    assert retried is not None and retried.id == job.id
    published = registry.publish_job_adapter(
        dataclasses.replace(services, store=s3_store),
        job=retried,
        worker_id="worker-2",
        adapter_dir=peft_adapter,
        lineage=lineage_for(retried),
        metrics={},
    )
    assert published is not None and published.version.number == 3


# --------------------------------------------------------------------------- lineage and rebuild


def test_continue_from_resolves_parents(
    services: Services,
    store: ObjectStore,
    tenant_a: TenantKeys,
    tenant_b: TenantKeys,
    base: BaseModelRecord,
    peft_adapter: Path,
    tmp_path: Path,
) -> None:
    first = publish_new(services, tenant_a.tenant_id, base, peft_adapter, "bot")
    second = publish_new(services, tenant_a.tenant_id, base, peft_adapter, "bot")
    other = make_base(services.engine, "other-base")
    with services.engine.begin() as conn:
        registry.set_alias(
            conn,
            store,
            tenant_id=tenant_a.tenant_id,
            adapter_name="bot",
            alias="prod",
            version=1,
            actor_key_id=None,
        )
    with services.engine.connect() as conn:
        a = tenant_a.tenant_id
        assert registry.resolve_parent(conn, a, "bot@1").id == first.id
        assert registry.resolve_parent(conn, a, "bot@prod").id == first.id
        assert registry.resolve_parent(conn, a, "bot").id == second.id
        assert registry.resolve_parent(conn, a, "bot@latest", base_model_id=base.id).id == second.id
        for ref, error in (
            ("bot@7", registry.VersionNotFoundError),
            ("bot@canary", registry.AliasNotFoundError),
            ("nope@1", registry.AdapterNotFoundError),
            ("../bot@1", registry.InvalidNameError),
        ):
            with pytest.raises(error):
                registry.resolve_parent(conn, a, ref)
        with pytest.raises(registry.AdapterNotFoundError):
            registry.resolve_parent(conn, tenant_b.tenant_id, "bot@1")
        with pytest.raises(registry.BaseModelMismatchError):
            registry.resolve_parent(conn, a, "bot@1", base_model_id=other.id)

    # A job that continues from bot@prod publishes into the same adapter, with its parent.
    job = claim_job(services, tenant_a.tenant_id, base.id)
    with services.engine.begin() as conn:
        conn.execute(
            text("UPDATE jobs SET parent_version_id = :p WHERE id = :id"),
            {"p": first.id, "id": job.id},
        )
        parent = registry.job_parent_version(conn, job.id)
    assert parent is not None and parent.id == first.id
    fetched = registry.fetch_version_files(store, parent, tmp_path / "start")
    assert (fetched / WEIGHTS).read_bytes() == (peft_adapter / WEIGHTS).read_bytes()
    child = publish(services, job, peft_adapter).version
    assert (child.model_id, child.parent_version_id, child.parent_ref) == (
        "bot@3",
        first.id,
        "bot@1",
    )


def dump_registry(engine: Engine) -> dict[str, list[Any]]:
    queries = {
        "adapters": "SELECT * FROM adapters ORDER BY id",
        "versions": "SELECT * FROM adapter_versions ORDER BY id",
        "aliases": "SELECT * FROM adapter_aliases ORDER BY id",
        "events": "SELECT adapter_id, alias, from_version, to_version, actor_key_id, created_at "
        "FROM alias_events ORDER BY id",
        "job_parents": "SELECT id, parent_version_id FROM jobs ORDER BY id",
    }
    with engine.connect() as conn:
        return {k: [tuple(r) for r in conn.execute(text(q))] for k, q in queries.items()}


@BOTH
def test_rebuild_from_manifests_gives_the_same_registry_back(
    services: Services,
    store: ObjectStore,
    tenant_a: TenantKeys,
    tenant_b: TenantKeys,
    base: BaseModelRecord,
    peft_adapter: Path,
) -> None:
    a, engine = tenant_a.tenant_id, services.engine
    publish_new(services, a, base, peft_adapter, "bot")
    second = publish_new(services, a, base, peft_adapter, "bot")
    job = claim_job(services, a, base.id)
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE jobs SET parent_version_id = :p WHERE id = :id"),
            {"p": second.id, "id": job.id},
        )
    assert publish(services, job, peft_adapter).version.parent_ref == "bot@2"
    publish_new(services, tenant_b.tenant_id, base, peft_adapter, "other")

    def alias(name: str, version: int) -> None:
        with engine.begin() as conn:
            registry.set_alias(
                conn,
                store,
                tenant_id=a,
                adapter_name="bot",
                alias=name,
                version=version,
                actor_key_id="key-x",
            )

    alias("prod", 3)
    alias("staging", 1)
    alias("staging", 2)
    with engine.begin() as conn:
        gone = registry.delete_version(conn, a, "bot", 1)
    registry.remove_version_objects(store, gone.object_prefix)
    # A manifest whose publish never committed (a crash before the commit): never restored.
    orphan = second.object_prefix.replace("/2/", "/9/")
    manifest = json.loads(store.get_bytes(second.object_prefix + "manifest.json"))
    manifest["version"].update(number=9, id="adver-orphan", model_id="bot@9")
    for f in registry.ADAPTER_FILES:
        store.put_bytes(orphan + f, store.get_bytes(second.object_prefix + f))
    store.put_bytes(orphan + "manifest.json", json.dumps(manifest).encode())

    before = dump_registry(engine)
    assert len(before["versions"]) == 3 and len(before["events"]) == 3
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM adapters"))  # cascades to versions, aliases, history
    assert dump_registry(engine)["versions"] == []

    report = registry.rebuild_from_manifests(engine, store)
    assert dump_registry(engine) == before
    assert (report.versions, report.aliases) == (3, 2)
    assert [s for s in report.skipped if orphan in s] and len(report.skipped) == 1
    again = registry.rebuild_from_manifests(engine, store)
    assert (again.versions, again.aliases) == (0, 0)
    # Version numbers carry on after the rebuild.
    assert publish_new(services, a, base, peft_adapter, "bot").number == 4


def test_publish_refuses_a_directory_without_peft_files(
    services: Services, tenant_a: TenantKeys, base: BaseModelRecord, tmp_path: Path
) -> None:
    job = claim_job(services, tenant_a.tenant_id, base.id, adapter_name="bot")
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(registry.AdapterFilesError) as caught:
        publish(services, job, tmp_path)
    assert WEIGHTS in str(caught.value) and not caught.value.retryable
    assert version_count(services.engine) == 0
    assert job_row(services.engine, job.id).status == "running"


def test_job_create_continues_from_a_version_over_the_api(
    services: Services,
    client: TestClient,
    tenant_a: TenantKeys,
    tenant_b: TenantKeys,
    base: BaseModelRecord,
    peft_adapter: Path,
) -> None:
    first = publish_new(services, tenant_a.tenant_id, base, peft_adapter, "bot")
    second = publish_new(services, tenant_a.tenant_id, base, peft_adapter, "bot")
    make_base(services.engine, "other-base")
    with services.engine.begin() as conn:
        # The parent was trained at rank 4 on q/v only: a continuing job must take that shape.
        conn.execute(
            text(
                "UPDATE adapter_versions SET lineage = jsonb_set(jsonb_set(lineage, "
                "'{hyperparameters,lora_rank}', '4'), '{hyperparameters,target_modules}', "
                '\'["q_proj", "v_proj"]\')'
            )
        )
    a = tenant_a.headers()
    assert (
        client.put("/v1/adapters/bot/aliases/prod", json={"version": 1}, headers=a).status_code
        == 200
    )
    training_file = make_file(services.engine, tenant_a.tenant_id).id
    body = {"model": "tiny-llama", "training_file": training_file}

    def jobs_written() -> int:
        with services.engine.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM jobs")).scalar_one())

    before = jobs_written()
    created = client.post(
        "/v1/fine_tuning/jobs",
        json={**body, "continue_from": "bot@prod", "hyperparameters": {"n_epochs": 2}},
        headers=a,
    )
    assert created.status_code == 200, created.text
    job = created.json()
    assert job["continue_from"] == "bot@1"
    assert job["hyperparameters"]["lora_rank"] == 4
    assert job["hyperparameters"]["target_modules"] == ["q_proj", "v_proj"]
    assert job["hyperparameters"]["n_epochs"] == 2
    with services.engine.connect() as conn:
        assert registry.job_parent_version(conn, job["id"]).id == first.id  # type: ignore[union-attr]
    latest = client.post("/v1/fine_tuning/jobs", json={**body, "continue_from": "bot"}, headers=a)
    assert latest.json()["continue_from"] == "bot@2"
    assert (
        client.get(f"/v1/fine_tuning/jobs/{latest.json()['id']}", headers=a).json()["continue_from"]
        == second.model_id
    )
    assert jobs_written() == before + 2

    for ref, hp, code, param in (
        ("bot@9", {}, "version_not_found", "continue_from"),
        ("bot@canary", {}, "alias_not_found", "continue_from"),
        ("nope", {}, "adapter_not_found", "continue_from"),
        ("../bot", {}, "invalid_name", "continue_from"),
        ("bot@1", {"lora_rank": 8}, "adapter_shape_mismatch", "hyperparameters.lora_rank"),
        ("bot@1", {"target_modules": "all-linear"}, "adapter_shape_mismatch", None),
    ):
        refused = client.post(
            "/v1/fine_tuning/jobs",
            json={**body, "continue_from": ref, "hyperparameters": hp},
            headers=a,
        )
        assert refused.status_code == 400, (ref, refused.text)
        error = refused.json()["error"]
        assert error["code"] == code, (ref, error)
        assert param is None or error["param"] == param
        assert error["message"]
    mismatch = client.post(
        "/v1/fine_tuning/jobs",
        json={"model": "other-base", "training_file": training_file, "continue_from": "bot@1"},
        headers=a,
    )
    assert mismatch.status_code == 400
    assert mismatch.json()["error"]["code"] == "base_model_mismatch"
    assert "trained on base model tiny-llama" in mismatch.json()["error"]["message"]
    # Another tenant cannot continue from tenant a's adapter: it does not exist for them.
    b_file = make_file(services.engine, tenant_b.tenant_id).id
    foreign = client.post(
        "/v1/fine_tuning/jobs",
        json={"model": "tiny-llama", "training_file": b_file, "continue_from": "bot@1"},
        headers=tenant_b.headers(),
    )
    assert foreign.status_code == 400
    assert foreign.json()["error"]["code"] == "adapter_not_found"
    assert jobs_written() == before + 2

    # A version an unfinished job starts from cannot be deleted until that job ends.
    refused = client.delete("/v1/adapters/bot/versions/2", headers=a)
    assert refused.status_code == 409
    assert latest.json()["id"] in refused.json()["error"]["message"]
    cancelled = client.post(f"/v1/fine_tuning/jobs/{latest.json()['id']}/cancel", headers=a)
    assert cancelled.json()["status"] == "cancelled"
    assert client.delete("/v1/adapters/bot/versions/2", headers=a).status_code == 200


def test_vllm_rules_name_what_a_serving_cluster_would_refuse(
    peft_adapter: Path, tmp_path: Path
) -> None:
    import shutil

    from loraforge.vllm_rules import smallest_vllm_max_lora_rank

    def variant(name: str, **changes: Any) -> Path:
        out = tmp_path / name
        shutil.copytree(peft_adapter, out)
        config = json.loads((out / "adapter_config.json").read_text())
        (out / "adapter_config.json").write_text(json.dumps({**config, **changes}))
        return out

    assert vllm_problems(peft_adapter) == []
    for name, changes, expected in (
        ("dora", {"use_dora": True}, "DoRA"),
        ("bias", {"bias": "all"}, "bias"),
        ("saved", {"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ("huge", {"r": 1024}, "max-lora-rank"),
        ("ia3", {"peft_type": "IA3"}, "peft_type"),
    ):
        problems = vllm_problems(variant(name, **changes))
        assert len(problems) == 1 and expected in problems[0], (name, problems)
    missing = variant("missing")
    (missing / WEIGHTS).unlink()
    assert "adapter_model.safetensors" in vllm_problems(missing)[0]
    assert [smallest_vllm_max_lora_rank(r) for r in (4, 16, 17, 512, 513)] == [8, 16, 32, 512, None]
