"""Base models are the platform's (issue 17, items 6-7): registered by platform operators
(admins of the tenants `platform_operator_tenants` names), whose tenants alone see a base's
server-side source; two imports at once both end as their sources deserve."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import IntegrityError

from control_plane import base_catalog
from control_plane.services import Services
from control_plane.settings import DEFAULT_TENANT, Settings
from tests.api_harness import TenantKeys
from tests.fixtures.testbase import TEST_BASE_PATH
from tests.integration.test_reliability_api import jsonl_of_size, stored_file

REPO_ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- platform operators


def test_only_a_platform_operator_registers_a_base_and_sees_its_source(
    services: Services, client: TestClient, tenant_a: TenantKeys, tenant_b: TenantKeys
) -> None:
    """tenant-a is named in `platform_operator_tenants` (see the harness), so its admin is a
    platform operator; tenant-b is not."""
    body = {"name": "declared", "source": "/srv/models/declared", "sha256": "a" * 64}
    body["source_kind"] = "dir"
    refused = client.post("/v1/base_models", json=body, headers=tenant_b.headers("admin"))
    assert refused.status_code == 403, refused.text
    error = refused.json()["error"]
    assert error["code"] == "platform_operator_required"
    assert "LORAFORGE_PLATFORM_OPERATOR_TENANTS" in error["message"]

    member = client.post("/v1/base_models", json=body, headers=tenant_a.headers("member"))
    assert member.status_code == 403  # an operator's tenant, but not an admin key
    created = client.post("/v1/base_models", json=body, headers=tenant_a.headers("admin"))
    assert created.status_code == 200, created.text
    assert created.json()["source"] == "/srv/models/declared"

    for keys, role, sees in (
        (tenant_a, "admin", True),
        (tenant_a, "reader", True),  # the platform's own tenant
        (tenant_b, "admin", False),
        (tenant_b, "reader", False),
    ):
        one = client.get("/v1/base_models/declared", headers=keys.headers(role)).json()
        [listed] = client.get("/v1/base_models", headers=keys.headers(role)).json()["data"]
        expected = "/srv/models/declared" if sees else None
        assert (one["source"], listed["source"]) == (expected, expected), (keys, role)
        assert one["sha256"] == "a" * 64 and one["status"] == "ready"


def test_a_failed_import_keeps_its_server_side_reason_from_tenants(
    services: Services, client: TestClient, tenant_a: TenantKeys, tenant_b: TenantKeys
) -> None:
    reason = "/srv/models/broken has no config.json: not a Hugging Face checkpoint"
    with services.engine.begin() as conn:
        base_catalog.register_base_model(
            conn,
            base_catalog.NewBaseModel(
                name="broken",
                source="/srv/models/broken",
                source_kind="dir",
                status="failed",
                error_message=reason,
            ),
        )
    operator = client.get("/v1/base_models/broken", headers=tenant_a.headers()).json()
    tenant = client.get("/v1/base_models/broken", headers=tenant_b.headers()).json()
    assert operator["error"] == reason
    assert tenant["status"] == "failed" and "/srv" not in json.dumps(tenant)
    assert "platform operator" in tenant["error"]
    training_file = stored_file(services, tenant_b.tenant_id, jsonl_of_size(2000))
    job = client.post(
        "/v1/fine_tuning/jobs",
        json={"model": "broken", "training_file": training_file},
        headers=tenant_b.headers(),
    )
    assert job.status_code == 400 and job.json()["error"]["code"] == "model_not_ready"
    assert "/srv" not in job.text and "platform operator" in job.json()["error"]["message"]


def test_the_embedded_defaults_admin_is_a_platform_operator(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("LORAFORGE_PLATFORM_OPERATOR_TENANTS", raising=False)
    assert DEFAULT_TENANT in Settings().platform_operator_tenants
    monkeypatch.setenv("LORAFORGE_PLATFORM_OPERATOR_TENANTS", '["ops", "infra"]')
    assert Settings().platform_operator_tenants == ["ops", "infra"]


# --------------------------------------------------------------------------- base imports

_IMPORTS = """
import json, sys, threading
from pathlib import Path

from control_plane.services import build_services
from control_plane.settings import Settings
from control_plane.storage import LocalObjectStore
from workers.bases.registration import import_registered_base

database_url, home, groups = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
services = build_services(
    Settings(home=home), database_url=database_url, store=LocalObjectStore(home / "objects")
)
ended = {}

def run(base_id, start):
    start.wait()
    try:
        ended[base_id] = import_registered_base(services, base_id)
    except BaseException as exc:
        ended[base_id] = repr(exc)

for base_ids in groups:  # the imports of a group start together
    start = threading.Barrier(len(base_ids))
    threads = [threading.Thread(target=run, args=(b, start)) for b in base_ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
print(json.dumps(ended))
"""


def test_base_imports_at_once_each_end_as_their_source_deserves(
    database_url: str, engine: Any, tmp_path: Path
) -> None:
    """Imports start two at a time in a fresh process (transformers not yet imported), as in
    celery's thread pool: twice a file that only claims to be GGUF (the GGUF import is the
    first to import transformers' lazy names), then the tiny base twice. Each ends on its own
    merits: `failed` saying it is not GGUF, or `ready`; never an ImportError from threads
    racing transformers' lazy imports."""
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf file")
    sources = {"tiny-1": TEST_BASE_PATH, "tiny-2": TEST_BASE_PATH, "gguf-1": fake, "gguf-2": fake}
    ids = {}
    with engine.begin() as conn:
        for name, source in sources.items():
            ids[name] = base_catalog.register_base_model(
                conn,
                base_catalog.NewBaseModel(
                    name=name, source=str(source), source_kind="dir", status="registering"
                ),
            ).id
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            _IMPORTS,
            database_url,
            str(tmp_path / "home"),
            json.dumps([[ids["gguf-1"], ids["gguf-2"]], [ids["tiny-1"], ids["tiny-2"]]]),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ended = json.loads(result.stdout.strip().splitlines()[-1])
    assert ended == {
        ids["tiny-1"]: "ready",
        ids["tiny-2"]: "ready",
        ids["gguf-1"]: "failed",
        ids["gguf-2"]: "failed",
    }
    with engine.connect() as conn:
        for name in ("gguf-1", "gguf-2"):
            record = base_catalog.get_base_model(conn, name)
            assert record is not None and record.error_message is not None
            assert "not a GGUF file" in record.error_message


def test_only_a_taken_name_is_said_to_be_registered_and_any_other_violation_goes_up(
    engine: Any,
) -> None:
    """Registering a base maps the unique key on its name, and only that, to "already
    registered": a row the table refuses for another reason (a NOT NULL source) is raised as the
    database said it, nothing written and the transaction going on, where it was once reported
    as a name taken."""
    with engine.begin() as conn:
        with pytest.raises(IntegrityError) as refused:
            base_catalog.register_base_model(
                conn,
                base_catalog.NewBaseModel(name="tiny", source=None, source_kind="dir"),  # type: ignore[arg-type]
            )
        assert isinstance(refused.value.orig, psycopg.errors.NotNullViolation)
        assert base_catalog.get_base_model(conn, "tiny") is None
        made = base_catalog.register_base_model(
            conn, base_catalog.NewBaseModel(name="tiny", source="/models/tiny", source_kind="dir")
        )
        with pytest.raises(
            base_catalog.BaseModelExistsError, match="a base model named 'tiny' is already"
        ):
            base_catalog.register_base_model(
                conn, base_catalog.NewBaseModel(name="tiny", source="/elsewhere", source_kind="dir")
            )
        assert base_catalog.get_base_model(conn, "tiny") == made
