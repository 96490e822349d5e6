"""The kopf handlers, registered on a registry of the caller's (the CLI's, or a test's).

Each handler is a few lines around a plain function: the timers mirror external state
(loraforge's job, the registry, the vLLM pods, the platform's tenant) into status on every tick,
so status-only changes never need a handler of their own; deleting a `FineTuningJob` cancels its
job, deleting a `Tenant` revokes its admin key (a finalizer).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import kopf

from loraforge.platform_admin import PlatformAdmin
from operators import adaptersync, finetuningjob, tenant
from operators.kube import KubeApi, KubeError, api_client

GROUP, VERSION = "loraforge.dev", "v1alpha1"
FINALIZER = "loraforge.dev/operator"

_F = TypeVar("_F", bound=Callable[..., Any])


@dataclass
class OperatorConfig:
    """What `loraforge operator` (or a test) decides; `connection` None means kopf's own login
    (in-cluster service account, else kubeconfig)."""

    sync_seconds: float = 30.0
    job_poll_seconds: float = 10.0
    connection: kopf.ConnectionInfo | None = None
    # The kinds this operator serves: a serving cluster runs AdapterSync alone (`--only`), with
    # RBAC for nothing else.
    resources: frozenset[str] = frozenset({"finetuningjobs", "adaptersyncs", "tenants"})


class _State:
    kube: KubeApi | None = None


def register(registry: kopf.OperatorRegistry, config: OperatorConfig) -> None:
    """Register the operator's handlers on `registry`."""
    state = _State()

    def kube() -> KubeApi:
        if state.kube is None:
            raise kopf.TemporaryError("not logged in to Kubernetes yet", delay=1)
        return state.kube

    def watching(resource: str, decorator: Callable[[_F], _F]) -> Callable[[_F], _F]:
        """`decorator` when this operator serves `resource`; otherwise the handler is left out
        (kopf would watch the kind, and list calls outside its RBAC would fail)."""
        return decorator if resource in config.resources else (lambda handler: handler)

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.finalizer = FINALIZER
        settings.posting.level = logging.INFO
        settings.scanning.disabled = True  # the CRDs come with the chart; no CRD watching

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        info = (
            config.connection
            or kopf.login_with_service_account(**kwargs)
            or kopf.login_with_kubeconfig(**kwargs)
        )
        if info is not None:
            state.kube = KubeApi(info)
        return info

    @kopf.on.cleanup(registry=registry)
    def close(**_: Any) -> None:
        if state.kube is not None:
            state.kube.close()

    @watching(
        "finetuningjobs",
        kopf.timer(
            GROUP, VERSION, "finetuningjobs", interval=config.job_poll_seconds, registry=registry
        ),
    )
    def mirror_job(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        raw: dict[str, Any] = dict(body)
        meta = raw["metadata"]
        if meta.get("deletionTimestamp"):
            return
        api = kube()

        def delete() -> None:
            api.delete(meta["namespace"], "finetuningjobs", meta["name"])

        try:
            with api_client(api, meta["namespace"], raw["spec"]) as client:
                status = finetuningjob.reconcile(client, api, raw, delete=delete)
        except (finetuningjob.TemporaryFailure, KubeError) as exc:
            raise kopf.TemporaryError(str(exc), delay=config.job_poll_seconds) from None
        old = raw.get("status") or {}
        if status.get("phase") != old.get("phase"):
            kind = "Warning" if status.get("phase") == "Failed" else "Normal"
            kopf.event(body, type=kind, reason=str(status.get("phase")), message=_why(status))
        patch.status.update(status)

    @watching("finetuningjobs", kopf.on.delete(GROUP, VERSION, "finetuningjobs", registry=registry))
    def cancel_job(body: kopf.Body, **_: Any) -> None:
        raw: dict[str, Any] = dict(body)
        api = kube()
        try:
            with api_client(api, raw["metadata"]["namespace"], raw["spec"]) as client:
                done = finetuningjob.cancel(client, dict(raw.get("status") or {}))
        except KubeError as exc:
            if exc.status == 404:  # the credentials Secret went first: nothing to cancel with
                return
            raise kopf.TemporaryError(str(exc), delay=5) from None
        if done:
            kopf.info(body, reason="Cancelled", message=done)

    @watching(
        "adaptersyncs",
        kopf.timer(GROUP, VERSION, "adaptersyncs", interval=config.sync_seconds, registry=registry),
    )
    def sync_adapters(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
        raw: dict[str, Any] = dict(body)
        meta, spec = raw["metadata"], raw["spec"]
        status = {k: v for k, v in (raw.get("status") or {}).items() if k != "kopf"}
        api = kube()
        try:
            pods = api.pods(meta["namespace"], spec.get("podSelector") or {})
            with api_client(api, meta["namespace"], spec) as client:
                new, events = adaptersync.sync(
                    client, spec, status, pods, generation=meta.get("generation"), cache=memo
                )
        except (finetuningjob.TemporaryFailure, KubeError) as exc:
            raise kopf.TemporaryError(str(exc), delay=config.sync_seconds) from None
        for event in events:
            kopf.event(body, type=event.kind, reason=event.reason, message=event.message)
        patch.status.update(new)

    @watching(
        "tenants",
        kopf.timer(GROUP, VERSION, "tenants", interval=config.job_poll_seconds, registry=registry),
    )
    def onboard_tenant(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        raw: dict[str, Any] = dict(body)
        meta = raw["metadata"]
        if meta.get("deletionTimestamp"):
            return
        api = kube()
        try:
            with api_client(api, meta["namespace"], raw["spec"]) as client:
                status = tenant.reconcile(PlatformAdmin(client), api, raw)
        except (tenant.TemporaryFailure, KubeError) as exc:
            raise kopf.TemporaryError(str(exc), delay=config.job_poll_seconds) from None
        old = raw.get("status") or {}
        if status.get("phase") != old.get("phase"):
            kind = "Warning" if status.get("phase") == "Failed" else "Normal"
            ready = next(c for c in status["conditions"] if c["type"] == "Ready")
            kopf.event(body, type=kind, reason=ready["reason"], message=ready["message"])
        patch.status.update(status)

    @watching("tenants", kopf.on.delete(GROUP, VERSION, "tenants", registry=registry))
    def revoke_tenant_key(body: kopf.Body, **_: Any) -> None:
        raw: dict[str, Any] = dict(body)
        api = kube()
        try:
            with api_client(api, raw["metadata"]["namespace"], raw["spec"]) as client:
                done = tenant.revoke(PlatformAdmin(client), api, raw)
        except KubeError as exc:
            if exc.status == 404:  # the credentials Secret went first: nothing to revoke with
                return
            raise kopf.TemporaryError(str(exc), delay=5) from None
        except tenant.TemporaryFailure as exc:
            raise kopf.TemporaryError(str(exc), delay=5) from None
        if done:
            kind, message = done
            reason = "AdminKeyRevoked" if kind == "Normal" else "RevokeRefused"
            kopf.event(body, type=kind, reason=reason, message=message)


def _why(status: dict[str, Any]) -> str:
    error = status.get("error") or {}
    if error:
        return f"{error.get('code')}: {error.get('message')}"
    return f"job {status.get('jobId', '-')} is {status.get('jobStatus', status.get('phase'))}"
