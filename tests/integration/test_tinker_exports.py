"""A model's weights taken out of the platform, with the official `tinker` SDK and its CLI, on
the real executor (tiny test base) and the real object store: `save_weights_external` writes
the adapter as a PEFT directory (optionally encrypted to age recipients), listed, capped and
deleted as every checkpoint is; `get_external_weights_urls` gives signed URLs fetched without a
key, which refuse a forged or expired token and a deleted checkpoint; `tinker checkpoint
download` of a save_state path leaves the adapter the model trained on disk and its temporary
export deleted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pyrage
import pytest
import tinker
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from itsdangerous import TimestampSigner, URLSafeTimedSerializer
from safetensors.torch import load as load_tensors
from sqlalchemy import text
from tinker import types

from control_plane import interactive, interactive_runs
from control_plane.api.routes import tinker_exports
from control_plane.services import Services, build_services
from control_plane.settings import Settings
from control_plane.storage import LocalObjectStore, ObjectStore
from loraforge import tasks
from tests.api_harness import TenantKeys
from tests.tinker_harness import DATUM, sdk_service, tinker_settings

pytestmark = pytest.mark.usefixtures("tinker_sdk_env")

PEFT_FILES = {"adapter_config.json", "adapter_model.safetensors"}


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return tinker_settings(tmp_path)


@pytest.fixture
def store_kind() -> str:
    return "local"


@pytest.fixture
def services(
    settings: Settings,
    database_url: str,
    broker_url: str,
    celery_worker: None,
    tmp_path: Path,
    store_kind: str,
    request: pytest.FixtureRequest,
) -> Iterator[Services]:
    """The API's services on a local directory, or on S3 (moto's server) where a test asks."""
    store: ObjectStore = (
        LocalObjectStore(tmp_path / "objects")
        if store_kind == "local"
        else request.getfixturevalue("s3_store")
    )
    built = build_services(settings, database_url=database_url, store=store)
    tasks.configure(built, broker_url=broker_url)
    yield built
    built.close()


def _trained(service: tinker.ServiceClient, base: str) -> Any:
    training = service.create_lora_training_client(base_model=base, rank=4, seed=0).result(
        timeout=120
    )
    training.forward_backward([DATUM], "cross_entropy").result(timeout=120)
    training.optim_step(types.AdamParams(learning_rate=1e-2)).result(timeout=120)
    return training


def _stored(services: Services, tenant_id: str, path: str) -> dict[str, bytes]:
    """The files the platform stored for a checkpoint, read straight from the object store."""
    with services.engine.connect() as conn:
        saved = interactive_runs.find_checkpoint(conn, tenant_id, path)
    keys = services.store.list_keys(saved.storage_prefix)
    return {k[len(saved.storage_prefix) :]: services.store.get_bytes(k) for k in keys}


def _same_tensors(one: bytes, other: bytes) -> None:
    a, b = load_tensors(one), load_tensors(other)
    assert a.keys() == b.keys() and a
    for name in a:
        assert a[name].equal(b[name]), name


def _calls(services: Services) -> int:
    with services.engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM interactive_calls")).scalar_one())


@pytest.mark.parametrize("store_kind", ["local", "s3"])
def test_exported_weights_download_through_signed_urls_without_a_key(
    live_url: str,
    tenant_a: TenantKeys,
    tenant_b: TenantKeys,
    executor: str,
    services: Services,
    store_kind: str,
    moto_server: str,
) -> None:
    with sdk_service(live_url, tenant_a.member) as service:
        training = _trained(service, executor)
        run = training.model_id
        sampler = training.save_weights_for_sampler("same").result(timeout=120).path
        saved = training.save_weights_external("out", ttl_seconds=7200).result(timeout=120)
        assert saved.path == f"tinker://{run}/external_weights/out"

        rest = service.create_rest_client()
        listed = {c.checkpoint_id: c for c in rest.list_checkpoints(run).result().checkpoints}
        external = listed["external_weights/out"]
        assert external.checkpoint_type == "external"
        assert external.tinker_path == saved.path
        assert external.expires_at is not None
        assert external.expires_at - datetime.now(UTC) > timedelta(seconds=7000)

        signed = rest.get_external_weights_urls(saved.path).result()
        assert set(signed.urls) == PEFT_FILES
        assert timedelta(minutes=55) < signed.expires - datetime.now(UTC) <= timedelta(hours=1)
        # Fetched as the CLI fetches them: no key, plain HTTP.
        got = {name: httpx.get(url).raise_for_status().content for name, url in signed.urls.items()}
        assert external.size_bytes == sum(len(body) for body in got.values())

    # The files are the model's trained adapter: the tensors its sampler save holds, in bf16,
    # with a PEFT config a serving engine loads; and what the object store holds, byte for byte.
    plain = _stored(services, tenant_a.tenant_id, sampler)
    _same_tensors(got["adapter_model.safetensors"], plain["adapter_model.safetensors"])
    tensors = load_tensors(got["adapter_model.safetensors"])
    assert {str(t.dtype) for t in tensors.values()} == {"torch.bfloat16"}
    assert any(bool(t.abs().sum() > 0) for n, t in tensors.items() if "lora_B" in n)  # trained
    config = json.loads(got["adapter_config.json"])
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert got == _stored(services, tenant_a.tenant_id, saved.path)

    url = signed.urls["adapter_model.safetensors"]
    if store_kind == "s3":  # the store's own presigned URLs, straight to it
        assert all(u.startswith(moto_server) for u in signed.urls.values())
        assert "X-Amz-Signature=" in url
    else:  # the API's: a forged token is refused, and corrupt bytes are never sent whole
        token = url.rsplit("/", 1)[-1]
        forged = httpx.get(url[: -len(token)] + token[:-2] + ("AA" if token[-2:] != "AA" else "BB"))
        assert forged.status_code == 403 and forged.json()["error"]["code"] == "invalid_signature"
        with services.engine.connect() as conn:
            prefix = interactive_runs.find_checkpoint(conn, tenant_a.tenant_id, saved.path)
        key = prefix.storage_prefix + "adapter_config.json"
        services.store.put_bytes(key, got["adapter_config.json"].replace(b"LORA", b"LoRA"))
        corrupt = httpx.get(signed.urls["adapter_config.json"])
        assert corrupt.status_code == 502
        assert corrupt.json()["error"]["code"] == "checksum_mismatch"
        services.store.put_bytes(key, got["adapter_config.json"])
    # Another tenant asking for the URLs: not found.
    with sdk_service(live_url, tenant_b.member) as other, pytest.raises(tinker.NotFoundError):
        other.create_rest_client().get_external_weights_urls(saved.path).result()

    # A reader's key reads the URLs; another kind of checkpoint has none (400 saying how).
    with sdk_service(live_url, tenant_a.reader) as reading:
        rest = reading.create_rest_client()
        assert set(rest.get_external_weights_urls(saved.path).result().urls) == PEFT_FILES
    # (The SDK checks the path's kind itself; asked over HTTP, the API says what to do.)
    other_kind = httpx.get(
        f"{live_url}/api/v1/training_runs/{run}/checkpoints/sampler_weights/same/"
        "external_weights_urls",
        headers=tenant_a.headers("reader"),
    )
    assert other_kind.status_code == 400
    assert "export this one with save_weights_external" in other_kind.json()["error"]["message"]

    # Deleted, its URLs answer 404 and its files are gone.
    with sdk_service(live_url, tenant_a.member) as service:
        service.create_rest_client().delete_checkpoint_from_tinker_path(saved.path).result()
    assert httpx.get(url).status_code == 404
    assert _stored(services, tenant_a.tenant_id, sampler)
    with pytest.raises(interactive.NotFound):
        _stored(services, tenant_a.tenant_id, saved.path)


class _AnHourAgo(TimestampSigner):
    def get_timestamp(self) -> int:
        return int(time.time()) - tinker_exports.URL_SECONDS - 5


def test_a_signed_url_past_its_hour_is_refused(
    live_url: str, tenant_a: TenantKeys, executor: str, services: Services
) -> None:
    with sdk_service(live_url, tenant_a.member) as service:
        training = _trained(service, executor)
        path = training.save_weights_external("late").result(timeout=120).path
    payload = [tenant_a.tenant_id, path, "adapter_config.json"]
    secret = services.settings.secret_key
    token = URLSafeTimedSerializer(secret, salt=tinker_exports._SALT).dumps(payload)
    late = URLSafeTimedSerializer(secret, salt=tinker_exports._SALT, signer=_AnHourAgo)
    assert httpx.get(f"{live_url}/api/v1/checkpoint_files/{token}").status_code == 200
    refused = httpx.get(f"{live_url}/api/v1/checkpoint_files/{late.dumps(payload)}")
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "url_expired"
    assert "get_external_weights_urls" in refused.json()["error"]["message"]


def test_exported_weights_encrypted_to_age_and_ssh_keys_only_their_owners_read(
    live_url: str, tenant_a: TenantKeys, executor: str, services: Services
) -> None:
    age = pyrage.x25519.Identity.generate()
    ssh_key = ed25519.Ed25519PrivateKey.generate()
    ssh_public = (
        ssh_key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )
    ssh_identity = pyrage.ssh.Identity.from_buffer(
        ssh_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    with sdk_service(live_url, tenant_a.member) as service:
        training = _trained(service, executor)
        plain = training.save_weights_external("plain").result(timeout=120).path
        # The same name saved again, encrypted: its plain files go, its .age files come.
        sealed = training.save_weights_external(
            "plain", age_encryption_recipients=[str(age.to_public()), ssh_public]
        )
        sealed_path = sealed.result(timeout=120).path
        assert sealed_path == plain
        rest = service.create_rest_client()
        urls = rest.get_external_weights_urls(sealed_path).result().urls
        assert set(urls) == {name + ".age" for name in PEFT_FILES}
        bodies = {name: httpx.get(url).raise_for_status().content for name, url in urls.items()}
        assert set(_stored(services, tenant_a.tenant_id, sealed_path)) == set(urls)
        again = training.save_weights_external("clear").result(timeout=120).path
        clear = _stored(services, tenant_a.tenant_id, again)

        # Either identity decrypts every file to the plain export of the same weights.
        for identity in (age, ssh_identity):
            opened = {n[: -len(".age")]: pyrage.decrypt(b, [identity]) for n, b in bodies.items()}
            assert opened["adapter_config.json"] == clear["adapter_config.json"]
            _same_tensors(opened["adapter_model.safetensors"], clear["adapter_model.safetensors"])
        assert b"lora_A" not in bodies["adapter_model.safetensors.age"]
        with pytest.raises(pyrage.DecryptError):
            pyrage.decrypt(bodies["adapter_config.json.age"], [pyrage.x25519.Identity.generate()])

        # The platform cannot read them back: loading them fails saying why.
        with pytest.raises(tinker.RequestFailedError, match="encrypted to their age recipients"):
            service.create_training_client_from_state(sealed_path).result(timeout=120)

        # Nor publish them as an adapter version; an export without recipients publishes.
        publish = f"{live_url}/v1/adapters/exported/versions"
        headers = tenant_a.headers("member")
        refused = httpx.post(publish, json={"from_checkpoint": sealed_path}, headers=headers)
        assert refused.status_code == 400, refused.text
        assert "encrypted to their age recipients" in refused.json()["error"]["message"]
        published = httpx.post(publish, json={"from_checkpoint": again}, headers=headers)
        assert published.status_code == 201, published.text
        assert published.json()["version"] == 1  # the refusal took no number

        # A key that is not one is refused before anything is asked of the model.
        asked = _calls(services)
        with pytest.raises(tinker.BadRequestError, match=r"recipient 1 .*not an age recipient"):
            training.save_weights_external(
                "bad", age_encryption_recipients=[str(age.to_public()), "age1nope"]
            ).result(timeout=60)
        with pytest.raises(tinker.BadRequestError, match="at most 10 age recipients"):
            training.save_weights_external(
                "many", age_encryption_recipients=[str(age.to_public())] * 11
            ).result(timeout=60)
        assert _calls(services) == asked


def test_tinker_checkpoint_download_of_a_saved_state_leaves_the_trained_adapter(
    live_url: str, tenant_a: TenantKeys, executor: str, services: Services, tmp_path: Path
) -> None:
    with sdk_service(live_url, tenant_a.member) as service:
        training = _trained(service, executor)
        state = training.save_state("final").result(timeout=120).path
        sampler = training.save_weights_for_sampler("final").result(timeout=120).path
    env = {
        **os.environ,
        "TINKER_API_KEY": "tml-" + tenant_a.member,
        "TINKER_BASE_URL": live_url,
        "TINKER_TELEMETRY": "0",
        "HOME": str(tmp_path),
    }
    out = tmp_path / "downloads"
    done = subprocess.run(
        [sys.executable, "-m", "tinker.cli", "checkpoint", "download", state, "--output", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr + done.stdout
    target = out / state.replace("tinker://", "").replace("/", "_")
    assert {p.name for p in target.iterdir()} == PEFT_FILES
    _same_tensors(
        (target / "adapter_model.safetensors").read_bytes(),
        _stored(services, tenant_a.tenant_id, sampler)["adapter_model.safetensors"],
    )
    # The CLI's temporary export was deleted after the download; the state is still there.
    with services.engine.connect() as conn:
        kinds = conn.execute(
            text("SELECT kind FROM interactive_checkpoints WHERE tenant_id = :t ORDER BY kind"),
            {"t": tenant_a.tenant_id},
        ).scalars()
        assert list(kinds) == ["sampler", "state"]
