"""`Tenant` through kopf against the fake API server and the real control plane: a platform's
tenants declared as objects, onboarded through `/v1/tenants` with a platform operator's key
(tenant-a's admin is one in the harness; tenant-b's is not)."""

from __future__ import annotations

import base64
from typing import Any

import kmock
import pytest

from control_plane.services import Services
from loraforge.client import Client, LoraforgeError
from loraforge.platform_admin import PlatformAdmin
from tests.api_harness import TenantKeys
from tests.operator.conftest import FakeKube, eventually, running_operator

pytestmark = [pytest.mark.operator, pytest.mark.asyncio]

OPERATOR_SECRET = "platform-operator"


def tenant(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "loraforge.dev/v1alpha1",
        "kind": "Tenant",
        "metadata": {"name": name},
        "spec": {
            "credentialsSecretRef": {"name": OPERATOR_SECRET},
            "adminKeySecret": {"name": f"{name}-key"},
            **spec,
        },
    }


async def given_credentials(kube: FakeKube, url: str, key: str) -> None:
    await kube.secret(OPERATOR_SECRET, {"url": url, "apiKey": key})


def platform_admin(url: str, keys: TenantKeys) -> PlatformAdmin:
    return PlatformAdmin(Client(url, keys.admin))


def ready_is(kube: FakeKube, name: str, value: str, reason: str | None = None) -> Any:
    """A probe for the object's status once its `Ready` condition is `value` (and `reason`)."""

    async def probe() -> dict[str, Any] | None:
        status = ((await kube.get("tenants", name)) or {}).get("status") or {}
        ready = next((c for c in status.get("conditions") or [] if c["type"] == "Ready"), None)
        if ready and ready["status"] == value and reason in (None, ready["reason"]):
            return dict(status)
        return None

    return probe


async def secret_data(kube: FakeKube, name: str) -> dict[str, str]:
    secret = await kube.get("secrets", name) or {}
    return {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}


def answers(url: str, key: str) -> int:
    """The status a tenant's plain request gets with `key`."""
    try:
        with Client(url, key) as client:
            client.request("GET", "/v1/fine_tuning/jobs")
    except LoraforgeError as exc:
        return exc.status
    return 200


async def test_a_tenant_object_onboards_its_tenant_with_its_limits_and_a_working_admin_key(
    kube: FakeKube, live_url: str, tenant_a: TenantKeys
) -> None:
    await given_credentials(kube, live_url, tenant_a.admin)
    created = await kube.create(
        "tenants",
        tenant(
            "team-x",
            maxRunningJobs=3,
            maxPriority=5,
            maxInteractiveModels=4,
            maxCheckpointBytes=20 * 10**9,
        ),
    )
    async with running_operator(kube):
        status = await eventually(ready_is(kube, "team-x", "True"), what="Ready")
    admin = platform_admin(live_url, tenant_a)
    found = admin.get_tenant("team-x")
    assert (found["max_running_jobs"], found["max_priority"], found["max_interactive_models"]) == (
        3,
        5,
        4,
    )
    assert found["max_checkpoint_bytes"] == 20 * 10**9
    assert status["tenantId"] == found["id"] and status["phase"] == "Ready"
    assert (status["maxRunningJobs"], status["maxPriority"], status["maxInteractiveModels"]) == (
        3,
        5,
        4,
    )
    assert status["maxCheckpointBytes"] == 20 * 10**9
    assert status["jobs"] == {
        "queued": 0,
        "running": 0,
        "succeeded": 0,
        "failed": 0,
        "cancelled": 0,
    }
    secret = await kube.get("secrets", "team-x-key") or {}
    (owner,) = secret["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"]) == (
        "Tenant",
        "team-x",
        created["metadata"]["uid"],
    )
    data = await secret_data(kube, "team-x-key")
    assert data["url"] == live_url and answers(data["url"], data["apiKey"]) == 200
    # The key is team-x's one admin key, named after the object, and status records it.
    keys = [(k["id"], k["role"], k["name"]) for k in admin.list_keys("team-x")]
    assert keys == [(status["adminKeyId"], "admin", "k8s:serving/team-x")]


async def test_the_tenants_limits_follow_the_spec_and_return_to_the_platform_default(
    kube: FakeKube, live_url: str, tenant_a: TenantKeys, services: Services
) -> None:
    await given_credentials(kube, live_url, tenant_a.admin)
    await kube.create("tenants", tenant("team-x", maxRunningJobs=3, maxPriority=5))
    admin = platform_admin(live_url, tenant_a)

    def limits() -> tuple[Any, ...]:
        found = admin.get_tenant("team-x")
        return (
            found["max_running_jobs"],
            found["max_priority"],
            found["max_interactive_models"],
            found["max_checkpoint_bytes"],
        )

    async with running_operator(kube):
        await eventually(ready_is(kube, "team-x", "True"), what="Ready")
        new = {
            "maxRunningJobs": 1,
            "maxPriority": -7,
            "maxInteractiveModels": 12,
            "maxCheckpointBytes": 5 * 10**11,
        }
        await kube.patch("tenants", "team-x", {"spec": new})
        await eventually(lambda: limits() == (1, -7, 12, 5 * 10**11), what="the new limits")
        await eventually(
            lambda: _status_has(kube, "team-x", "maxInteractiveModels", 12), what="status"
        )
        await eventually(
            lambda: _status_has(kube, "team-x", "maxCheckpointBytes", 5 * 10**11), what="status"
        )
        await kube.patch("tenants", "team-x", {"spec": dict.fromkeys(new)})
        await eventually(
            lambda: limits() == (None, None, None, None), what="the platform's defaults"
        )
        default = services.settings.max_running_jobs_per_tenant
        await eventually(
            lambda: _status_has(kube, "team-x", "maxRunningJobs", default), what="status"
        )
    status = (await kube.get("tenants", "team-x") or {})["status"]
    assert status.get("maxPriority") == services.settings.max_priority_per_tenant
    assert status["maxInteractiveModels"] == services.settings.max_interactive_models_per_tenant
    assert status.get("maxCheckpointBytes") == services.settings.max_checkpoint_bytes_per_tenant


async def _status_has(kube: FakeKube, name: str, key: str, value: Any) -> bool:
    found = await kube.get("tenants", name) or {}
    return bool(found.get("status", {}).get(key) == value)


async def test_an_existing_tenant_is_adopted_with_a_new_admin_key_and_its_old_keys_untouched(
    kube: FakeKube, live_url: str, tenant_a: TenantKeys
) -> None:
    admin = platform_admin(live_url, tenant_a)
    made = admin.create_tenant("team-y", max_running_jobs=2)
    old_key = made["admin_key"]
    await given_credentials(kube, live_url, tenant_a.admin)
    await kube.create("tenants", tenant("team-y", maxRunningJobs=2))
    async with running_operator(kube):
        status = await eventually(ready_is(kube, "team-y", "True"), what="Ready")
    assert [t["id"] for t in admin.list_tenants() if t["name"] == "team-y"] == [made["id"]]
    assert status["tenantId"] == made["id"]
    data = await secret_data(kube, "team-y-key")
    assert data["apiKey"] != old_key["key"] and answers(live_url, data["apiKey"]) == 200
    assert answers(live_url, old_key["key"]) == 200
    keys = {k["id"]: (k["name"], k["revoked"]) for k in admin.list_keys("team-y")}
    assert keys == {
        old_key["id"]: ("admin", False),
        status["adminKeyId"]: ("k8s:serving/team-y", False),
    }


async def test_a_secret_the_object_does_not_own_is_left_as_it_was(
    kube: FakeKube, live_url: str, tenant_a: TenantKeys
) -> None:
    admin = platform_admin(live_url, tenant_a)
    made = admin.create_tenant("team-y")
    await kube.secret("team-y-key", {"url": "https://elsewhere", "apiKey": "theirs"})
    before = await kube.get("secrets", "team-y-key")
    await given_credentials(kube, live_url, tenant_a.admin)
    await kube.create("tenants", tenant("team-y"))
    async with running_operator(kube):
        status = await eventually(
            ready_is(kube, "team-y", "False", "SecretNotOwned"), what="SecretNotOwned"
        )
    assert status["phase"] == "Failed"
    assert await kube.get("secrets", "team-y-key") == before
    assert [k["id"] for k in admin.list_keys("team-y")] == [made["admin_key"]["id"]]


async def test_deleting_a_tenant_object_revokes_its_key_and_leaves_the_tenant(
    kube: FakeKube, live_url: str, tenant_a: TenantKeys
) -> None:
    await given_credentials(kube, live_url, tenant_a.admin)
    await kube.create("tenants", tenant("team-x"))
    async with running_operator(kube):
        await eventually(ready_is(kube, "team-x", "True"), what="Ready")
        key = (await secret_data(kube, "team-x-key"))["apiKey"]
        assert answers(live_url, key) == 200
        await kube.delete("tenants", "team-x")
        # The finalizer holds the object until its key is revoked.
        await eventually(
            lambda: _gone(kube, "team-x"), timeout=30, what="the object to be released"
        )
    assert answers(live_url, key) == 401
    assert platform_admin(live_url, tenant_a).get_tenant("team-x")["name"] == "team-x"


async def _gone(kube: FakeKube, name: str) -> bool:
    return await kube.get("tenants", name) is None


async def test_a_non_operators_credentials_are_refused_and_nothing_is_created(
    kube: FakeKube, live_url: str, tenant_a: TenantKeys, tenant_b: TenantKeys
) -> None:
    await given_credentials(kube, live_url, tenant_b.admin)
    await kube.create("tenants", tenant("team-w"))
    async with running_operator(kube):
        status = await eventually(
            ready_is(kube, "team-w", "False", "platform_operator_required"), what="the refusal"
        )
    assert status["phase"] == "Failed" and "tenantId" not in status
    assert await kube.get("secrets", "team-w-key") is None
    with pytest.raises(LoraforgeError) as refused:
        platform_admin(live_url, tenant_a).get_tenant("team-w")
    assert refused.value.status == 404


async def test_a_key_whose_write_failed_is_revoked_and_its_secret_replaced_once_deleted(
    kube: FakeKube, live_url: str, tenant_a: TenantKeys
) -> None:
    """The first write of the key answers 500 but takes (as a timeout after the API server
    stored it can): the key is revoked at once, the Secret holding it is reported, and once
    deleted a new key is written."""
    failed: list[str] = []

    def first_key_write(request: kmock.Request) -> bool:
        if failed or request.action != kmock.action.CREATE or request.resource is None:
            return False
        name = (request.data or {}).get("metadata", {}).get("name")
        if request.resource.plural == "secrets" and name == "team-v-key":
            failed.append(name)
        return bool(failed)

    kube.emulator[first_key_write] << 500
    await given_credentials(kube, live_url, tenant_a.admin)
    await kube.create("tenants", tenant("team-v"))
    admin = platform_admin(live_url, tenant_a)
    async with running_operator(kube):
        await eventually(ready_is(kube, "team-v", "False", "AdminKeyRevoked"), what="reported")
        assert failed == ["team-v-key"]
        stale = (await secret_data(kube, "team-v-key"))["apiKey"]
        assert answers(live_url, stale) == 401
        await kube.delete("secrets", "team-v-key")
        status = await eventually(ready_is(kube, "team-v", "True"), what="a new key")
    fresh = (await secret_data(kube, "team-v-key"))["apiKey"]
    assert answers(live_url, fresh) == 200
    keys = [(k["id"] == status["adminKeyId"], k["revoked"]) for k in admin.list_keys("team-v")]
    assert sorted(keys) == [(False, True), (True, False)]


async def test_a_tenant_is_never_renamed_and_no_second_tenant_is_created(
    kube: FakeKube, live_url: str, tenant_a: TenantKeys
) -> None:
    await given_credentials(kube, live_url, tenant_a.admin)
    await kube.create("tenants", tenant("team-x"))
    async with running_operator(kube):
        await eventually(ready_is(kube, "team-x", "True"), what="Ready")
        await kube.patch("tenants", "team-x", {"spec": {"tenantName": "team-renamed"}})
        status = await eventually(
            ready_is(kube, "team-x", "False", "CannotRename"), what="CannotRename"
        )
    names = [t["name"] for t in platform_admin(live_url, tenant_a).list_tenants()]
    assert "team-x" in names and "team-renamed" not in names
    assert status["tenantName"] == "team-x"
