"""`AdapterSync` through kopf: the fake API server's Pods point at stand-in vLLM servers; the
registry is the real one, its versions trained by the real trainer on the tiny base."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from loraforge.client import MARKER
from tests.integration.test_metrics import scrape, value
from tests.operator.conftest import BASE, FakeKube, Platform, eventually, running_operator
from tests.operator.fake_vllm import FakeVllm
from tests.operator.test_finetuningjob import RECORDS

pytestmark = [pytest.mark.operator, pytest.mark.asyncio]

SELECTOR = {
    "matchLabels": {"app": "vllm"},
    "matchExpressions": [{"key": "track", "operator": "NotIn", "values": ["canary"]}],
}


def train(platform: Platform, adapter: str, rank: int, **more: Any) -> int:
    """One version of `adapter`, trained and published; its number."""
    path = platform.services.settings.home / f"{adapter}-{rank}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    with platform.client() as client:
        file_id = client.upload_file(path)["id"]
        hp = {"n_epochs": 1, "batch_size": 8, "lora_rank": rank, "max_seq_length": 64, **more}
        job = client.create_job(
            model=BASE, training_file=file_id, adapter_name=adapter, hyperparameters=hp
        )
        deadline = time.monotonic() + 180
        while (found := client.retrieve_job(job["id"]))["status"] != "succeeded":
            assert found["status"] not in ("failed", "cancelled"), found["error"]
            assert time.monotonic() < deadline
            time.sleep(0.2)
        return int(found["fine_tuned_model"].split("@")[1])


@pytest.fixture
def vllms() -> Iterator[list[FakeVllm]]:
    """Three stand-in vLLM pods: two selected, one canary the selector leaves out."""
    servers = [FakeVllm(BASE, max_lora_rank=16, max_loras=2) for _ in range(3)]
    yield servers
    for server in servers:
        server.stop()


async def given_pods(kube: FakeKube, vllms: list[FakeVllm]) -> None:
    for index, (server, track) in enumerate(
        zip(vllms, ("stable", "stable", "canary"), strict=True)
    ):
        await kube.create("pods", pod(f"vllm-{index}", server, track))


def pod(name: str, server: FakeVllm, track: str, restarts: int = 0) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {"app": "vllm", "track": track}},
        "spec": {
            "containers": [
                {"name": "vllm", "ports": [{"name": "http", "containerPort": server.port}]}
            ]
        },
        "status": {
            "phase": "Running",
            "podIP": "127.0.0.1",
            "containerStatuses": [{"name": "vllm", "restartCount": restarts}],
        },
    }


def adapter_sync(name: str, path: Path, adapters: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "loraforge.dev/v1alpha1",
        "kind": "AdapterSync",
        "metadata": {"name": name},
        "spec": {
            "baseModel": BASE,
            "adapters": adapters,
            "storage": {"path": str(path), "servedModelName": "served-tiny"},
            "podSelector": SELECTOR,
            "vllm": {"portName": "http", "maxLoraRank": 16, "maxLoras": 2},
            "retryBudget": 2,
            "credentialsSecretRef": {"name": "loraforge-api"},
        },
    }


async def sync_status(kube: FakeKube, name: str = "sync") -> dict[str, Any]:
    return dict(((await kube.get("adaptersyncs", name)) or {}).get("status") or {})


def conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status.get("conditions") or []}


async def test_an_adaptersync_follows_the_alias_from_v1_to_v2_in_every_selected_pod(
    kube: FakeKube, platform: Platform, vllms: list[FakeVllm], tmp_path: Path
) -> None:
    first, second = train(platform, "sums", 8), train(platform, "sums", 8)
    with platform.client() as client:
        client.set_alias("sums", "prod", first)
    await kube.secret("loraforge-api", {"url": platform.url, "apiKey": platform.keys.reader})
    await given_pods(kube, vllms)
    stable, canary = vllms[:2], vllms[2]
    volume = tmp_path / "adapters"
    await kube.create(
        "adaptersyncs", adapter_sync("sync", volume, [{"name": "sums", "alias": "prod"}])
    )

    async def ready_on(version: int) -> bool:
        status = await sync_status(kube)
        adapters = status.get("adapters") or [{}]
        return status.get("phase") == "Ready" and adapters[0].get("currentVersion") == version

    async with running_operator(kube):
        await eventually(lambda: ready_on(first), what="sums@1 everywhere")
        assert all(set(s.loaded) == {"sums@1"} for s in stable) and canary.load_calls == []
        pulled = volume / "sums@1"
        assert (
            json.loads((pulled / "adapter_config.json").read_text())["base_model_name_or_path"]
            == "served-tiny"
        )
        assert stable[0].loaded["sums@1"] == str(pulled)

        # The registry moves prod to v2: the same alias, new weights, a new served name.
        with platform.client() as client:
            client.set_alias("sums", "prod", second)
        await eventually(lambda: ready_on(second), what="sums@2 everywhere")
        assert all(set(s.loaded) == {"sums@2"} for s in stable)
        assert not (volume / "sums@1").exists() and (volume / "sums@2" / MARKER).is_file()
        status = await sync_status(kube)
        assert status["serving"] == "sums@2" and status["readyPods"] == 2
        assert {p["name"] for p in status["pods"]} == {"vllm-0", "vllm-1"}
        assert all([i["servedName"] for i in p["loaded"]] == ["sums@2"] for p in status["pods"])
        assert status["adapters"][0]["digest"].startswith("sha256:")
        assert conditions(status)["Ready"]["status"] == "True"
        # kopf posts Events in the background: wait for them rather than race their posting.
        await eventually(lambda: kube.events("Moved"), what="the Moved event")
        await eventually(lambda: kube.events("Unloaded"), what="the Unloaded event")

        # A container restarts: vLLM comes back empty, the pod's restart count goes up.
        stable[1].restart()
        await kube.patch(
            "pods", "vllm-1", {"status": pod("vllm-1", stable[1], "stable", 1)["status"]}
        )
        await eventually(lambda: _restarts_seen(kube, "vllm-1"), what="the restart to be seen")
        await eventually(lambda: set(stable[1].loaded) == {"sums@2"}, what="a reload")
        assert await kube.events("PodRestarted")


async def _restarts_seen(kube: FakeKube, name: str) -> bool:
    status = await sync_status(kube)
    return any(p["name"] == name and p["restarts"] == 1 for p in status.get("pods") or [])


async def test_a_rank_64_adapter_is_refused_by_preflight_for_max_rank_16_pods_and_nothing_loads(
    kube: FakeKube, platform: Platform, vllms: list[FakeVllm], tmp_path: Path
) -> None:
    # The tiny base's k/v projections are 64x32: a rank of 64 fits its square ones only.
    train(platform, "wide", 64, target_modules=["q_proj", "o_proj"])
    await kube.secret("loraforge-api", {"url": platform.url, "apiKey": platform.keys.reader})
    await given_pods(kube, vllms)
    await kube.create("adaptersyncs", adapter_sync("sync", tmp_path / "a", [{"name": "wide"}]))
    async with running_operator(kube):
        await eventually(lambda: _phase(kube, "Failed"), what="the preflight to refuse the adapter")
        await asyncio.sleep(1.5)  # more ticks: still nothing loaded
    status = await sync_status(kube)
    preflight = conditions(status)["Preflight"]
    assert preflight["status"] == "False"
    assert "r=64 exceeds the pods' --max-lora-rank 16" in preflight["message"]
    assert "--max-lora-rank 64" in preflight["message"]
    assert conditions(status)["Ready"]["status"] == "False"
    assert all(s.load_calls == [] for s in vllms)
    assert len(await kube.events("PreflightFailed")) == 1


async def _phase(kube: FakeKube, phase: str) -> bool:
    return (await sync_status(kube)).get("phase") == phase


async def test_a_version_vllm_keeps_refusing_with_a_400_ends_failed_with_its_message(
    kube: FakeKube, platform: Platform, vllms: list[FakeVllm], tmp_path: Path
) -> None:
    train(platform, "sums", 8)
    vllms[1].refuse["sums@1"] = "Loading lora sums@1 failed: target modules mismatch"
    await kube.secret("loraforge-api", {"url": platform.url, "apiKey": platform.keys.reader})
    await given_pods(kube, vllms)
    await kube.create("adaptersyncs", adapter_sync("sync", tmp_path / "a", [{"name": "sums"}]))
    async with running_operator(kube):
        await eventually(lambda: _phase(kube, "Failed"), what="Failed")
        await asyncio.sleep(1.5)  # the budget is spent: no more attempts
    status = await sync_status(kube)
    adapter = status["adapters"][0]
    assert adapter["refusals"] == 2
    assert "target modules mismatch" in adapter["failed"]
    assert vllms[1].load_calls == ["sums@1", "sums@1"]  # the budget, not one more
    assert "target modules mismatch" in conditions(status)["Ready"]["message"]
    assert await kube.events("LoadFailed")
    # The pod that refused nothing got the version; the alias never moved.
    assert set(vllms[0].loaded) == {"sums@1"} and adapter["currentVersion"] is None


def unchanged_index_answers(url: str) -> float | None:
    """How many serving-index polls the platform has answered 304 (its own request metrics)."""
    return value(
        scrape(url),
        "loraforge_http_requests_total",
        method="GET",
        route="/v1/adapters/index",
        status="304",
    )


async def test_an_adaptersync_without_a_list_follows_every_adapter_of_its_base_at_the_alias(
    kube: FakeKube, platform: Platform, vllms: list[FakeVllm], tmp_path: Path
) -> None:
    """No `adapters`: every adapter of the base that has the alias is served, and one whose
    alias goes away is unloaded and removed from the volume. Between changes, the operator
    polls the serving index with its ETag and the registry answers 304."""
    alpha, beta = train(platform, "alpha", 8), train(platform, "beta", 8)
    with platform.client() as client:
        client.set_alias("alpha", "prod", alpha)
        client.set_alias("beta", "prod", beta)
    await kube.secret("loraforge-api", {"url": platform.url, "apiKey": platform.keys.reader})
    await given_pods(kube, vllms)
    stable = vllms[:2]
    volume = tmp_path / "adapters"
    every = adapter_sync("sync", volume, [])
    del every["spec"]["adapters"]
    every["spec"]["alias"] = "prod"
    await kube.create("adaptersyncs", every)

    async with running_operator(kube):
        both = {f"alpha@{alpha}", f"beta@{beta}"}
        await eventually(
            lambda: all(set(s.loaded) == both for s in stable), what="alpha and beta everywhere"
        )
        # Later syncs ask with the index's ETag: unchanged, the registry answers 304.
        await eventually(
            lambda: (unchanged_index_answers(platform.url) or 0) >= 2, what="304s for the index"
        )
        with platform.client() as client:
            client.delete_alias("beta", "prod")
        only = {f"alpha@{alpha}"}
        await eventually(lambda: all(set(s.loaded) == only for s in stable), what="beta unloaded")
        await eventually(lambda: not (volume / f"beta@{beta}").exists(), what="beta removed")
    assert (volume / f"alpha@{alpha}" / MARKER).is_file()
