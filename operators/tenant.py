"""`Tenant`: a platform's tenant declared in Git, onboarded through `/v1/tenants`.

`reconcile` runs on every tick of the object's timer, with a platform operator's key. It makes
the tenant exist (created with its limits, or adopted when it already does: made by hand, or by
an earlier tick that crashed after the create), keeps one admin key of it in the object's own
Secret (`adminKeySecret`, keys `url` and `apiKey`, owned by the object so it goes with it), so a
team's `FineTuningJob`s and `AdapterSync`s can name that Secret directly, has the tenant's limits
follow the spec, and mirrors the tenant into status.

Two promises shape the order of things. No live key nobody holds: a key issued but not written
is revoked before the tick gives up, and a key superseded by a newer one (the Secret deleted or
renamed) is revoked once the newer is written. Nothing of anyone else's is touched: a Secret of
that name the object does not own is left as it is, and no tenant is created while it stands.

Deleting the object revokes its key and leaves the tenant and its data: the REST API deletes no
tenant, and a tenant's adapters and jobs outlive a manifest removed by mistake.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import httpx

from loraforge.client import LoraforgeError
from loraforge.platform_admin import PlatformAdmin
from operators.conditions import set_condition
from operators.kube import KubeApi, KubeError

# The key id beside the key in the Secret: a status write lost after the Secret's still finds
# the key to revoke.
KEY_ID_ANNOTATION = "loraforge.dev/api-key-id"
JOB_COUNTS = ("queued", "running", "succeeded", "failed", "cancelled")


class TemporaryFailure(Exception):
    """The API or the Kubernetes API did not answer, or a write failed: the next tick retries."""


def tenant_name(body: dict[str, Any]) -> str:
    """The tenant the object declares: `spec.tenantName`, else the object's name."""
    return str(body["spec"].get("tenantName") or body["metadata"]["name"])


def wanted_limits(spec: dict[str, Any]) -> dict[str, int | None]:
    """The spec's limits as the API's fields; absent is None, the platform's default."""
    return {
        "max_running_jobs": spec.get("maxRunningJobs"),
        "max_priority": spec.get("maxPriority"),
        "max_interactive_models": spec.get("maxInteractiveModels"),
        "max_checkpoint_bytes": spec.get("maxCheckpointBytes"),
    }


def owns(secret: dict[str, Any], uid: str) -> bool:
    refs = secret.get("metadata", {}).get("ownerReferences") or []
    return any(ref.get("uid") == uid for ref in refs)


def _status(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in (body.get("status") or {}).items() if k != "kopf"}


def _not_ready(status: dict[str, Any], reason: str, message: str) -> dict[str, Any]:
    conditions = set_condition(status.get("conditions") or [], "Ready", False, reason, message)
    return status | {"phase": "Failed", "conditions": conditions}


def _mirror(status: dict[str, Any], tenant: dict[str, Any]) -> dict[str, Any]:
    served = tenant.get("last_served_at")
    return status | {
        "tenantId": tenant["id"],
        "maxRunningJobs": tenant["effective_max_running_jobs"],
        "maxPriority": tenant["effective_max_priority"],
        "maxInteractiveModels": tenant["effective_max_interactive_models"],
        "maxCheckpointBytes": tenant["effective_max_checkpoint_bytes"],
        "jobs": {k: tenant["jobs"][k] for k in JOB_COUNTS},
        "lastServedAt": datetime.fromtimestamp(served, UTC).isoformat() if served else None,
    }


def _annotated_key(secret: dict[str, Any] | None) -> str | None:
    """The id of the key an owned Secret holds, from its annotation."""
    annotations = ((secret or {}).get("metadata") or {}).get("annotations") or {}
    return annotations.get(KEY_ID_ANNOTATION)


def _is_live(admin: PlatformAdmin, name: str, key_id: str | None) -> bool:
    """Whether the tenant's key `key_id` is live: one revoked by hand, or after a write that
    failed but took (a timeout), leaves the Secret holding a key that no longer works."""
    return any(k["id"] == key_id and not k["revoked"] for k in admin.list_keys(name))


def _revoke_quietly(admin: PlatformAdmin, name: str, key_id: str) -> bool:
    """Revoke a key; one already revoked (404) is what was wanted. Whether this revoked it."""
    try:
        admin.revoke_key(name, key_id)
    except LoraforgeError as exc:
        if exc.status != 404:
            raise
        return False
    return True


def _write_key(
    admin: PlatformAdmin, kube: KubeApi, body: dict[str, Any], name: str, key: dict[str, Any]
) -> None:
    """The key into the object's Secret; a key that could not be written is revoked first."""
    meta = body["metadata"]
    secret = body["spec"]["adminKeySecret"]["name"]
    try:
        kube.create_secret(
            meta["namespace"],
            secret,
            {"url": admin.client.base_url, "apiKey": key["key"]},
            owner=body,
            annotations={KEY_ID_ANNOTATION: key["id"]},
        )
    except KubeError as exc:
        _revoke_quietly(admin, name, key["id"])
        raise TemporaryFailure(f"Secret {secret}: {exc}; its key {key['id']} revoked") from None


def _tenant_with_key(
    admin: PlatformAdmin,
    kube: KubeApi,
    body: dict[str, Any],
    name: str,
    have_secret: bool,
) -> tuple[dict[str, Any] | None, str | None]:
    """The tenant (created when missing) and the id of an admin key newly written to the
    Secret (None when the Secret already held one). No tenant: the Secret holds a key of a
    tenant that is gone."""
    meta = body["metadata"]
    key_name = f"k8s:{meta['namespace']}/{meta['name']}"
    try:
        tenant: dict[str, Any] | None = admin.get_tenant(name)
    except LoraforgeError as exc:
        if exc.status != 404:
            raise
        tenant = None
    if tenant is None and have_secret:
        return None, None
    if tenant is None:
        try:
            tenant = admin.create_tenant(
                name, **wanted_limits(body["spec"]), admin_key_name=key_name
            )
        except LoraforgeError as exc:
            if exc.status == 409:  # created meanwhile: the next tick adopts it
                raise TemporaryFailure(str(exc)) from None
            raise
        _write_key(admin, kube, body, name, tenant["admin_key"])
        return tenant, str(tenant["admin_key"]["id"])
    if have_secret:
        return tenant, None
    key = admin.create_key(name, role="admin", key_name=key_name)
    _write_key(admin, kube, body, name, key)
    return tenant, str(key["id"])


def reconcile(admin: PlatformAdmin, kube: KubeApi, body: dict[str, Any]) -> dict[str, Any]:
    """The object's new status. The API's refusals (4xx) are a `Ready` False condition with
    the API's code; what may pass (5xx, 429, no answer, a failed write) raises
    `TemporaryFailure`."""
    meta, spec = body["metadata"], body["spec"]
    status = _status(body) | {"observedGeneration": meta.get("generation")}
    # A tenant is never renamed: the one first onboarded stays this object's.
    name = status.get("tenantName") or tenant_name(body)
    secret_name = spec["adminKeySecret"]["name"]
    secret = kube.get_secret(meta["namespace"], secret_name)
    if secret is not None and not owns(secret, meta["uid"]):
        return _not_ready(
            status,
            "SecretNotOwned",
            f"Secret {secret_name} exists and is not this Tenant's; it is left as it is: name "
            "another adminKeySecret, or delete that Secret",
        )
    held = _annotated_key(secret)
    try:
        tenant, new_key = _tenant_with_key(admin, kube, body, name, secret is not None)
        if tenant is None:
            return _not_ready(
                status,
                "TenantMissing",
                f"tenant {name} no longer exists on the platform, and Secret {secret_name} holds "
                "a key of it: delete that Secret to have the tenant created again",
            )
        if new_key is None and not _is_live(admin, name, held):
            return _not_ready(
                status,
                "AdminKeyRevoked",
                f"Secret {secret_name} holds admin key {held} of tenant {name}, which is "
                "revoked: delete the Secret and a new key is written into a new one",
            )
        limits = wanted_limits(spec)
        if {k: tenant[k] for k in limits} != limits:
            tenant = admin.set_limits(name, **limits)
        old_key = status.get("adminKeyId")
        if new_key is not None and old_key and old_key != new_key:
            _revoke_quietly(admin, name, old_key)  # its Secret was deleted or renamed
    except LoraforgeError as exc:
        if exc.status >= 500 or exc.status == 429:
            raise TemporaryFailure(f"loraforge API: {exc}") from None
        return _not_ready(status, exc.code, exc.message)
    except httpx.HTTPError as exc:
        raise TemporaryFailure(f"loraforge API: {exc}") from None
    status = _mirror(status | {"tenantName": name, "adminKeyId": new_key or held}, tenant)
    running, queued = status["jobs"]["running"], status["jobs"]["queued"]
    message = f"tenant {name}: {running} running, {queued} queued"
    if tenant_name(body) != name:
        return _not_ready(
            status,
            "CannotRename",
            f"tenantName is {tenant_name(body)!r} but this object onboarded {name!r}, and a "
            "tenant cannot be renamed: set it back, or declare the new tenant in a new Tenant",
        )
    conditions = set_condition(status.get("conditions") or [], "Ready", True, "Reconciled", message)
    return status | {"phase": "Ready", "conditions": conditions}


def revoke(admin: PlatformAdmin, kube: KubeApi, body: dict[str, Any]) -> tuple[str, str] | None:
    """On deletion: revoke the object's admin key, and leave the tenant with its data (the
    REST API deletes no tenant). The event to post, as (type, message); None when there was no
    key, or it was revoked already."""
    meta, status = body["metadata"], _status(body)
    name = status.get("tenantName") or tenant_name(body)
    key_id = status.get("adminKeyId")
    if not key_id:  # a status write lost after the Secret's
        secret = kube.get_secret(meta["namespace"], body["spec"]["adminKeySecret"]["name"])
        if secret is not None and owns(secret, meta["uid"]):
            key_id = _annotated_key(secret)
    if not key_id:
        return None
    try:
        if not _revoke_quietly(admin, name, key_id):
            return None
    except LoraforgeError as exc:
        if exc.status >= 500 or exc.status == 429:
            raise TemporaryFailure(f"loraforge API: {exc}") from None
        # Refused (say the credentials are no longer an operator's): holding the object
        # forever would not revoke it either.
        return "Warning", f"admin key {key_id} of tenant {name} was not revoked: {exc}"
    except httpx.HTTPError as exc:
        raise TemporaryFailure(f"loraforge API: {exc}") from None
    return "Normal", f"revoked admin key {key_id} of tenant {name}; the tenant and its data stay"
