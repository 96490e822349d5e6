"""A tenant's audit log through the official `tinker` SDK's `AdminClient.get_audit_log`, against
the API on a real socket and the real executor (tiny test base): who published, read (another
tenant too, and for what), gave a time to live, deleted and unpublished its checkpoints, which
expired, who made and revoked its keys and changed its limits, in order, by kind; what failed is
not there; only its admins read it; the retention pass forgets what is past it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import tinker
from sqlalchemy import text
from tinker import types

from control_plane import audit, interactive_runs
from control_plane.services import Services
from control_plane.settings import Settings
from loraforge.client import Client
from loraforge.platform_admin import PlatformAdmin
from tests.api_harness import TenantKeys
from tests.tinker_harness import DATUM, sdk_service, tinker_settings

pytestmark = pytest.mark.usefixtures("tinker_sdk_env")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return tinker_settings(tmp_path)


def _log(url: str, key: str, **asked: Any) -> list[types.AuditLogEntry]:
    admin = tinker.AdminClient(base_url=url, api_key="tml-" + key)
    return list(admin.get_audit_log(**asked).result(timeout=30).entries)


def _said(entries: list[types.AuditLogEntry]) -> list[tuple[str, str | None, str | None]]:
    """Each entry's event, the name of the tenant whose key did it, and its purpose."""
    return [
        (
            e.event,
            (e.event_details.get("actor") or {}).get("tenant_name"),  # type: ignore[union-attr]
            e.purpose,
        )
        for e in entries
    ]


def test_what_was_done_to_a_tenants_checkpoints_and_keys_and_by_whom(
    services: Services, live_url: str, tenant_a: TenantKeys, tenant_b: TenantKeys, executor: str
) -> None:
    owner = tinker.RestClient(base_url=live_url, api_key="tml-" + tenant_a.member)
    with sdk_service(live_url, tenant_a.member) as service:
        training = service.create_lora_training_client(base_model=executor, rank=4).result(
            timeout=120
        )
        training.forward_backward([DATUM], "cross_entropy").result(timeout=120)
        sampler = training.save_weights_for_sampler("s").result(timeout=120).path
        state = training.save_state("st").result(timeout=120).path
        export = training.save_weights_external("x").result(timeout=120).path
        doomed = training.save_state("doomed").result(timeout=120).path
    # Nothing of the training itself is in the log: it records checkpoints read and changed.
    assert _log(live_url, tenant_a.admin) == []

    owner.publish_checkpoint_from_tinker_path(sampler).result(timeout=30)
    with sdk_service(live_url, tenant_b.member) as other:
        # Read twice in the hour by the same key for the same purpose: one entry.
        for _ in range(2):
            other.create_sampling_client(model_path=sampler).result(timeout=60)
        # Not published: refused, and not in the log.
        with pytest.raises(tinker.NotFoundError):
            other.create_training_client_from_state(state).result(timeout=60)
    # A run of tenant-b's own session made once (from the published weights, a read) and asked
    # for again naming tenant-a's private state: answered as made, and no read of it is logged.
    b_headers = {"X-API-Key": "tml-" + tenant_b.member}
    b_session = httpx.post(
        f"{live_url}/api/v1/create_session",
        json={"tags": [], "user_metadata": None, "sdk_version": "0.38"},
        headers=b_headers,
    ).json()["session_id"]
    for path in (sampler, state):
        started = httpx.post(
            f"{live_url}/api/v1/load_weights",
            json={"session_id": b_session, "model_seq_id": 0, "path": path, "optimizer": False},
            headers=b_headers,
        )
        assert started.status_code == 200, started.text
    for _ in range(2):
        owner.get_weights_info_by_tinker_path(state).result(timeout=30)
    owner.get_external_weights_urls(export).result(timeout=30)
    owner.set_checkpoint_ttl_from_tinker_path(state, 7200).result(timeout=30)
    owner.delete_checkpoint_from_tinker_path(export).result(timeout=30)
    owner.unpublish_checkpoint_from_tinker_path(sampler).result(timeout=30)
    # Asked again it changes nothing, and says nothing more.
    owner.unpublish_checkpoint_from_tinker_path(sampler).result(timeout=30)
    with services.engine.begin() as conn:
        conn.execute(
            text("UPDATE interactive_checkpoints SET expires_at = now() WHERE path = :p"),
            {"p": doomed},
        )
    assert interactive_runs.expire_checkpoints(services.engine, services.store) == 1

    headers = {"Authorization": f"Bearer {tenant_a.admin}"}
    made = httpx.post(
        f"{live_url}/v1/api_keys", json={"name": "ci", "role": "reader"}, headers=headers
    ).json()
    assert httpx.delete(f"{live_url}/v1/api_keys/{made['id']}", headers=headers).status_code == 200
    # A key that is not one: refused, not in the log.
    assert httpx.delete(f"{live_url}/v1/api_keys/key-nope", headers=headers).status_code == 404
    # tenant-a's admin operates the platform (the harness): tenant-b's limits are changed.
    PlatformAdmin(Client(live_url, tenant_a.admin)).set_limits("tenant-b", max_running_jobs=3)

    entries = _log(live_url, tenant_a.admin)
    assert _said(entries) == [
        ("checkpoint_published", "tenant-a", None),
        ("checkpoint_read", "tenant-b", "sample"),
        ("checkpoint_read", "tenant-b", "load"),
        ("checkpoint_read", "tenant-a", "weights_info"),
        ("checkpoint_read", "tenant-a", "download"),
        ("checkpoint_ttl_set", "tenant-a", None),
        ("checkpoint_deleted", "tenant-a", None),
        ("checkpoint_unpublished", "tenant-a", None),
        ("checkpoint_expired", None, None),
        ("api_key_created", "tenant-a", None),
        ("api_key_revoked", "tenant-a", None),
    ]
    by_event = {e.event: e for e in entries}
    read = next(e for e in entries if e.purpose == "sample")
    assert read.tinker_path == sampler and read.model_id == training.model_id
    loaded = next(e for e in entries if e.purpose == "load")
    assert loaded.tinker_path == sampler  # not the private state named the second time
    # Another tenant's key is named by its tenant alone; the tenant's own keys by key and role.
    assert read.event_details["actor"] == {
        "tenant_id": tenant_b.tenant_id,
        "tenant_name": "tenant-b",
    }
    own = by_event["checkpoint_ttl_set"].event_details["actor"]
    assert own == {
        "tenant_id": tenant_a.tenant_id,
        "tenant_name": "tenant-a",
        "key_id": own["key_id"],
        "role": "member",
    }
    assert own["key_id"].startswith("key-") and tenant_a.member not in str(entries)
    assert by_event["checkpoint_ttl_set"].event_details["ttl_seconds"] == 7200
    assert by_event["checkpoint_expired"].tinker_path == doomed
    assert by_event["api_key_created"].event_details["key_id"] == made["id"]
    assert by_event["api_key_created"].event_details["role"] == "reader"
    assert made["key"] not in str(entries)
    times = [e.timestamp for e in entries]
    assert times == sorted(times)

    # By kind; another tenant's log holds its own; only an admin reads it.
    assert [e.event for e in _log(live_url, tenant_a.admin, event_type="organizations")] == [
        "api_key_created",
        "api_key_revoked",
    ]
    assert len(_log(live_url, tenant_a.admin, event_type="checkpoints")) == 9
    assert _log(live_url, tenant_a.admin, event_type="projects") == []
    assert _said(_log(live_url, tenant_b.admin)) == [("tenant_limits_changed", "tenant-a", None)]
    changed = _log(live_url, tenant_b.admin)[0].event_details
    assert changed["limits"] == {"max_running_jobs": 3}
    assert changed["actor"] == {"tenant_id": tenant_a.tenant_id, "tenant_name": "tenant-a"}
    with pytest.raises(tinker.PermissionDeniedError):
        _log(live_url, tenant_a.member)
    today = datetime.now(UTC).date()
    assert _log(live_url, tenant_a.admin, day=today - timedelta(days=1)) == []
    future = httpx.get(
        f"{live_url}/api/v1/audit",
        params={"day": str(today + timedelta(days=1))},
        headers={"X-API-Key": "tml-" + tenant_a.admin},
    )
    assert future.status_code == 400 and "has not begun" in future.text

    # The retention pass forgets what is past it, and only that.
    with services.engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE audit_events SET created_at = now() - interval '400 days' "
                "WHERE event LIKE 'api\\_key\\_%'"
            )
        )
    assert audit.forget_older_than(services.engine, 365) == 2
    assert [e.event for e in _log(live_url, tenant_a.admin, event_type="organizations")] == []
    assert len(_log(live_url, tenant_a.admin, event_type="checkpoints")) == 9
