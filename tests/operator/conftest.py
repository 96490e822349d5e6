"""The operator's world: a fake Kubernetes API server (kmock's emulator, the only fake at the
API-server boundary), the operator running through kopf on the test's event loop, and the real
control plane (API on a socket, PostgreSQL, celery, a trainer thread on the tiny base)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import kmock
import kopf
import pytest
import pytest_asyncio

from control_plane.services import Services
from loraforge.client import Client
from operators.handlers import OperatorConfig, register
from tests.api_harness import TenantKeys
from tests.fixtures.testbase import TEST_BASE_PATH
from workers.runner import JobRunner

NAMESPACE = "serving"
GROUP_PATH = f"/apis/loraforge.dev/v1alpha1/namespaces/{NAMESPACE}"
BASE = "tiny-llama"
_uids = itertools.count(1)


class Emulator(kmock.KubernetesEmulator):
    """kmock's emulator, naming objects created with `generateName` (as kopf's Events are)."""

    async def _handle(self, request: Any) -> Any:
        if request.action == kmock.action.CREATE and isinstance(request.data, dict):
            meta = request.data.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = f"{meta['generateName']}{next(_uids)}"
        return await super()._handle(request)


class FakeKube:
    """kmock's Kubernetes emulator with the resources the operator uses, and a small client."""

    def __init__(self, emulator: Emulator) -> None:
        self.emulator = emulator
        self.url = str(emulator.url).rstrip("/")
        self.http = httpx.AsyncClient(base_url=self.url, timeout=10)
        declare = emulator.resources
        verbs = {"get", "list", "watch", "create", "patch", "update", "delete"}
        for plural, kind in (
            ("finetuningjobs", "FineTuningJob"),
            ("adaptersyncs", "AdapterSync"),
            ("tenants", "Tenant"),
        ):
            declare[f"loraforge.dev/v1alpha1/{plural}"] = kmock.ResourceInfo(
                kind=kind,
                singular=kind.lower(),
                namespaced=True,
                verbs=verbs,
                subresources={"status"},
            )
        for plural, kind in (("pods", "Pod"), ("secrets", "Secret"), ("events", "Event")):
            declare[f"v1/{plural}"] = kmock.ResourceInfo(kind=kind, namespaced=True, verbs=verbs)
        # kopf waits for the namespaces resource to be discoverable (scanning is off: no listing).
        declare["v1/namespaces"] = kmock.ResourceInfo(
            kind="Namespace", namespaced=False, verbs=verbs
        )

    def path(self, plural: str, name: str = "") -> str:
        core = plural in ("pods", "secrets", "events")
        base = f"/api/v1/namespaces/{NAMESPACE}" if core else GROUP_PATH
        return f"{base}/{plural}" + (f"/{name}" if name else "")

    async def create(self, plural: str, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj.setdefault("metadata", {})
        meta.setdefault("namespace", NAMESPACE)
        meta.setdefault("uid", f"uid-{next(_uids)}-{meta['name']}")
        meta.setdefault("resourceVersion", "1")
        meta.setdefault("generation", 1)
        meta.setdefault("creationTimestamp", "2026-01-01T00:00:00Z")
        response = await self.http.post(self.path(plural), json=obj)
        assert response.status_code < 300, response.text
        return dict(response.json())

    async def get(self, plural: str, name: str) -> dict[str, Any] | None:
        response = await self.http.get(self.path(plural, name))
        return None if response.status_code == 404 else dict(response.json())

    async def patch(self, plural: str, name: str, patch: dict[str, Any]) -> None:
        response = await self.http.patch(
            self.path(plural, name),
            json=patch,
            headers={"Content-Type": "application/merge-patch+json"},
        )
        assert response.status_code < 300, response.text

    async def delete(self, plural: str, name: str) -> None:
        response = await self.http.delete(self.path(plural, name))
        assert response.status_code < 300, response.text

    async def secret(self, name: str, data: dict[str, str]) -> None:
        encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
        await self.create("secrets", {"metadata": {"name": name}, "data": encoded})

    async def events(self, reason: str | None = None) -> list[dict[str, Any]]:
        response = await self.http.get(self.path("events"))
        found = response.json().get("items", [])
        return [e for e in found if reason is None or e.get("reason") == reason]


@pytest_asyncio.fixture
async def kube() -> AsyncIterator[FakeKube]:
    async with Emulator() as emulator, kmock.Server(emulator):
        fake = FakeKube(emulator)
        yield fake
        await fake.http.aclose()


@contextlib.asynccontextmanager
async def running_operator(kube: FakeKube, *, sync_seconds: float = 0.5) -> AsyncIterator[None]:
    """The operator's handlers through kopf, on this loop, stopped before the fake goes."""
    registry = kopf.OperatorRegistry()
    connection = kopf.ConnectionInfo(server=kube.url, scheme="Bearer", token="test", insecure=True)
    register(
        registry,
        OperatorConfig(
            sync_seconds=sync_seconds, job_poll_seconds=sync_seconds, connection=connection
        ),
    )
    stop = asyncio.Event()
    task = asyncio.create_task(
        kopf.operator(registry=registry, standalone=True, namespaces=[NAMESPACE], stop_flag=stop)
    )
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def eventually(
    probe: Callable[[], Any], *, timeout: float = 60, what: str = "condition"
) -> Any:
    """Poll `probe` (a function or a coroutine function) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        found = probe()
        if inspect.isawaitable(found):
            found = await found
        if found:
            return found
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)


@dataclass
class Platform:
    url: str
    keys: TenantKeys
    services: Services

    def client(self) -> Client:
        return Client(self.url, self.keys.admin)


def _register_base(url: str, admin_key: str) -> None:
    """The tiny test base, through the public API: registered, imported by celery, ready."""
    with Client(url, admin_key) as client:
        client.request(
            "POST", "/v1/base_models", json={"name": BASE, "source": str(TEST_BASE_PATH)}
        )
        deadline = time.monotonic() + 120
        while client.request("GET", f"/v1/base_models/{BASE}")["status"] != "ready":
            assert time.monotonic() < deadline, "the test base was not imported"
            time.sleep(0.2)


@pytest.fixture
def platform(
    services: Services, live_url: str, tenant_a: TenantKeys, tmp_path: Path
) -> Iterator[Platform]:
    """The real control plane with one trainer thread on the tiny base."""
    _register_base(live_url, tenant_a.admin)
    runner = JobRunner(services, "op-trainer", work_dir=tmp_path / "trainer", heartbeat_seconds=0.5)
    stop = threading.Event()
    thread = threading.Thread(target=runner.run_forever, args=(stop,), kwargs={"idle_wait": 0.2})
    thread.start()
    yield Platform(live_url, tenant_a, services)
    stop.set()
    thread.join(60)
