"""Reliability of the API's promises (issue 17, items 5-7), against the real app on a real
socket, real PostgreSQL, and a local directory or a moto S3 server as the object store.

- a file endpoint never completes a 200 with bytes that fail their sha256;
- the registry's name rules refuse an adapter name at job create, not after the training;
- `loraforge pull`'s refusals are one line on stderr;
- a cancel answered `cancelling` never ends in a success, and publication stays exactly-once.

Base models (platform operators, concurrent imports) are in test_platform_bases.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from control_plane import registry
from control_plane.records import BaseModelRecord
from control_plane.services import Services, build_services
from control_plane.settings import Settings
from control_plane.storage import CHUNK_SIZE, ObjectStore
from loraforge.cli import main
from loraforge.client import ChecksumError, Client
from tests.api_harness import TenantKeys
from tests.factories import make_base, store_file
from tests.integration.test_registry import claim_job, flip_byte, lineage_for

REPO_ROOT = Path(__file__).resolve().parents[2]
WEIGHTS = "adapter_model.safetensors"
LARGE = 3 * CHUNK_SIZE + 12345  # more chunks than the server reads ahead


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


def stored_file(services: Services, tenant_id: str, data: bytes) -> str:
    """A file row and its bytes, as an upload leaves them (without the dataset checks)."""
    return store_file(services, tenant_id, data, format="text", examples=1, tokens=1)


def jsonl_of_size(size: int) -> bytes:
    line = json.dumps({"text": "x" * 1000}).encode() + b"\n"
    data = line * (size // len(line) + 1)
    return data[:size]


def adapter_dir(path: Path, weights_size: int) -> Path:
    """What publication stores: a config and a weights file (here of arbitrary bytes)."""
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (path / WEIGHTS).write_bytes(os.urandom(weights_size))
    return path


def publish_version(
    services: Services, tenant_id: str, base: BaseModelRecord, source: Path, name: str
) -> registry.AdapterVersionRecord:
    job = claim_job(services, tenant_id, base.id, adapter_name=name)
    published = registry.publish_job_adapter(
        services,
        job=job,
        worker_id="worker-1",
        adapter_dir=source,
        lineage=lineage_for(job),
        metrics={},
    )
    assert published is not None
    return published.version


def fetch(url: str, key: str) -> httpx.Response:
    return httpx.get(url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


# --------------------------------------------------------------------------- verified bytes


@pytest.mark.parametrize("store_kind", ["local", "s3"])
def test_a_corrupt_file_is_never_served_as_a_complete_200(
    services: Services, store: ObjectStore, live_url: str, tenant_a: TenantKeys
) -> None:
    small, large = jsonl_of_size(5000), jsonl_of_size(LARGE)
    small_id = stored_file(services, tenant_a.tenant_id, small)
    large_id = stored_file(services, tenant_a.tenant_id, large)
    url = f"{live_url}/v1/files/{{}}/content"

    for file_id, data in ((small_id, small), (large_id, large)):
        good = fetch(url.format(file_id), tenant_a.reader)
        assert good.status_code == 200 and good.content == data
        assert good.headers["X-Content-SHA256"] == hashlib.sha256(data).hexdigest()

    with services.engine.connect() as conn:
        keys = {
            f: conn.execute(
                text("SELECT object_key FROM files WHERE id = :id"), {"id": f}
            ).scalar_one()
            for f in (small_id, large_id)
        }
    for key in keys.values():
        flip_byte(store, key)

    refused = fetch(url.format(small_id), tenant_a.reader)  # verified before any byte is sent
    assert refused.status_code == 502
    error = refused.json()["error"]
    assert error["code"] == "checksum_mismatch"
    assert error["expected_sha256"] == hashlib.sha256(small).hexdigest()
    assert error["actual_sha256"] != error["expected_sha256"] and len(error["actual_sha256"]) == 64

    with pytest.raises(httpx.RemoteProtocolError):  # the 200's body ends short
        fetch(url.format(large_id), tenant_a.reader)
    auth = f"Authorization: Bearer {tenant_a.reader}"
    result = subprocess.run(
        ["curl", "-sS", "-o", os.devnull, "-H", auth, url.format(large_id)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0, "curl took the cut-short body for a complete download"


def test_a_corrupt_adapter_file_is_never_served_as_a_complete_200(
    services: Services,
    live_url: str,
    tenant_a: TenantKeys,
    base: BaseModelRecord,
    tmp_path: Path,
) -> None:
    source = adapter_dir(tmp_path / "adapter", LARGE)
    version = publish_version(services, tenant_a.tenant_id, base, source, "bot")
    url = f"{live_url}/v1/adapters/bot/versions/1/files/{{}}"
    for name in ("adapter_config.json", WEIGHTS):
        good = fetch(url.format(name), tenant_a.reader)
        assert good.status_code == 200 and good.content == (source / name).read_bytes()

    target = tmp_path / "pulled" / "bot"
    with Client(live_url, tenant_a.reader) as sdk:
        sdk.pull("bot@1", target)
        before = {p.name: p.read_bytes() for p in target.iterdir()}
        flip_byte(services.store, version.object_prefix + WEIGHTS)
        with pytest.raises(httpx.RemoteProtocolError):
            fetch(url.format(WEIGHTS), tenant_a.reader)
        with pytest.raises(httpx.TransportError):
            sdk.pull("bot@1", target, base_model_name="served-name")
        assert {p.name: p.read_bytes() for p in target.iterdir()} == before

        flip_byte(services.store, version.object_prefix + "adapter_config.json")
        refused = fetch(url.format("adapter_config.json"), tenant_a.reader)
        assert (refused.status_code, refused.json()["error"]["code"]) == (
            502,
            "checksum_mismatch",
        )
        with pytest.raises(ChecksumError) as caught:
            sdk.pull("bot@1", tmp_path / "elsewhere")
        assert caught.value.filename == "adapter_config.json"
        assert caught.value.actual == refused.json()["error"]["actual_sha256"]
    assert not (tmp_path / "elsewhere").exists()


# --------------------------------------------------------------------------- names and pull


def test_an_adapter_name_the_registry_refuses_is_refused_at_create(
    services: Services, client: TestClient, tenant_a: TenantKeys, base: BaseModelRecord
) -> None:
    training_file = stored_file(services, tenant_a.tenant_id, jsonl_of_size(2000))
    for name, words in (("index", "reserved"), ("../escape", "path separator")):
        response = client.post(
            "/v1/fine_tuning/jobs",
            json={"model": base.name, "training_file": training_file, "adapter_name": name},
            headers=tenant_a.headers(),
        )
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert (error["code"], error["param"]) == ("invalid_name", "adapter_name")
        assert words in error["message"] and name in error["message"]
    with services.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM jobs")).scalar_one() == 0
    accepted = client.post(
        "/v1/fine_tuning/jobs",
        json={"model": base.name, "training_file": training_file, "adapter_name": "index-2"},
        headers=tenant_a.headers(),
    )
    assert accepted.status_code == 200, accepted.text


def test_pull_into_a_foreign_directory_says_so_in_one_line(
    services: Services,
    live_url: str,
    tenant_a: TenantKeys,
    base: BaseModelRecord,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    publish_version(services, tenant_a.tenant_id, base, adapter_dir(tmp_path / "a", 1000), "bot")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not an adapter")
    args = ["--url", live_url, "--api-key", tenant_a.reader]

    code = main(["pull", "bot@1", str(foreign), *args])
    err = capsys.readouterr().err
    assert code != 0
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "was not written by `loraforge pull`" in err and str(foreign) in err
    assert (foreign / "notes.txt").read_text() == "not an adapter"

    code = main(["pull", "bot@1", str(tmp_path / "x"), "--url", "http://127.0.0.1:9", *args[2:]])
    err = capsys.readouterr().err
    assert code != 0 and len(err.strip().splitlines()) == 1 and "Traceback" not in err


# --------------------------------------------------------------------------- cancel


class CancelsBeforeTheManifest:
    """The store, except that the cancel request arrives while publication uploads (just
    before the manifest is written, the last object)."""

    def __init__(self, store: ObjectStore, cancel: Any) -> None:
        self._store = store
        self._cancel = cancel
        self.replies: list[httpx.Response] = []

    def put_bytes(self, key: str, data: bytes, *, write_once: bool = False) -> Any:
        if key.endswith(registry.MANIFEST):
            self.replies.append(self._cancel())
        return self._store.put_bytes(key, data, write_once=write_once)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def test_a_cancel_during_publication_is_honoured_and_nothing_is_published(
    services: Services,
    client: TestClient,
    tenant_a: TenantKeys,
    base: BaseModelRecord,
    tmp_path: Path,
) -> None:
    job = claim_job(services, tenant_a.tenant_id, base.id, adapter_name="bot")
    cancel_url = f"/v1/fine_tuning/jobs/{job.id}/cancel"
    store = CancelsBeforeTheManifest(
        services.store, lambda: client.post(cancel_url, headers=tenant_a.headers())
    )
    parts = SimpleNamespace(engine=services.engine, queue=services.queue, store=store)
    published = registry.publish_job_adapter(
        parts,  # type: ignore[arg-type]
        job=job,
        worker_id="worker-1",
        adapter_dir=adapter_dir(tmp_path / "a", 1000),
        lineage=lineage_for(job),
        metrics={},
    )
    [reply] = store.replies
    assert reply.status_code == 200 and reply.json()["status"] == "cancelling"
    assert published is None
    final = client.get(f"/v1/fine_tuning/jobs/{job.id}", headers=tenant_a.headers()).json()
    assert (final["status"], final["fine_tuned_model"]) == ("cancelled", None)
    with services.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM adapter_versions")).scalar_one() == 0
    assert services.store.list_keys(f"tenants/{tenant_a.tenant_id}/adapters/") == []


def test_a_cancel_after_publication_is_refused_and_the_version_stays_the_only_one(
    services: Services,
    client: TestClient,
    tenant_a: TenantKeys,
    base: BaseModelRecord,
    tmp_path: Path,
) -> None:
    version = publish_version(
        services, tenant_a.tenant_id, base, adapter_dir(tmp_path / "a", 1000), "bot"
    )
    refused = client.post(
        f"/v1/fine_tuning/jobs/{version.job_id}/cancel", headers=tenant_a.headers()
    )
    assert refused.status_code == 409 and "succeeded" in refused.json()["error"]["message"]
    job = client.get(f"/v1/fine_tuning/jobs/{version.job_id}", headers=tenant_a.headers())
    assert (job.json()["status"], job.json()["fine_tuned_model"]) == ("succeeded", "bot@1")
    with services.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM adapter_versions")).scalar_one() == 1
