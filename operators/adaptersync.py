"""`AdapterSync`: keep every selected vLLM pod serving the registry's versions, version-aware.

One `sync` per tick of the object's timer:

1. resolve each followed adapter's alias (or pinned version) to a version and its digest;
2. pull each version, verified and swapped in atomically, into `<path>/<name>@<version>`;
3. preflight it (vLLM's rules, rank ≤ the pods' max rank, the base, the slot count): a
   violation is a condition and the version is never loaded;
4. load it into every selected pod under the immutable name `<name>@<version>`: the name
   changes with the weights, so new weights behind an old alias are always loaded; a pod whose
   `/v1/models` lacks a version it should hold (a restarted container, drift) is reloaded;
5. only when every pod holds the new version does `currentVersion` move to it; then the old one
   is unloaded and its directory garbage-collected.

vLLM's 4xx is permanent: after `retryBudget` refusals of one version it is Failed with vLLM's
message. A pod that does not answer is temporary: retried with exponential backoff.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from loraforge.client import MARKER, Client, LoraforgeError
from operators.conditions import set_condition
from operators.finetuningjob import TemporaryFailure, version_digest
from operators.serving_versions import IndexCache, preflight, resolve
from operators.vllm import VllmPod, VllmRefused, VllmUnreachable

_SERVED = re.compile(r"(?P<name>.+)@(?P<version>\d+)")
BACKOFF_SECONDS = (2, 4, 8, 16, 32, 60)


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event for the object: `kind` Normal or Warning."""

    kind: str
    reason: str
    message: str


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _is_preflight(adapter: dict[str, Any]) -> bool:
    return str(adapter.get("failed", "")).startswith("preflight")


def pod_url(pod: dict[str, Any], vllm: dict[str, Any]) -> str | None:
    """The pod's vLLM URL: its IP and the container port named `portName` (else `port`)."""
    ip = (pod.get("status") or {}).get("podIP")
    if not ip:
        return None
    port = vllm.get("port", 8000)
    for container in (pod.get("spec") or {}).get("containers") or []:
        for p in container.get("ports") or []:
            if p.get("name") == vllm.get("portName", "http"):
                port = p["containerPort"]
    return f"{vllm.get('scheme', 'http')}://{ip}:{port}"


def _restarts(pod: dict[str, Any]) -> int:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return sum(int(s.get("restartCount", 0)) for s in statuses)


@dataclass
class _Adapter:
    """One followed adapter during a sync (becomes an item of `status.adapters`)."""

    name: str
    desired: int
    current: int | None
    digest: str
    path: Path
    refusals: int = 0
    failed: str = ""

    @property
    def served(self) -> str:
        return f"{self.name}@{self.desired}"

    def status(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "desiredVersion": self.desired,
            "currentVersion": self.current,
            "digest": self.digest,
            "servedName": self.served,
            "refusals": self.refusals,
            "failed": self.failed,
        }


class _Sync:
    """The state of one sync: the adapters, the events it raises, its conditions."""

    def __init__(
        self,
        client: Client,
        spec: dict[str, Any],
        status: dict[str, Any],
        cache: IndexCache | None = None,
    ) -> None:
        self.client, self.spec, self.status, self.cache = client, spec, status, cache
        self.events: list[Event] = []
        self.conditions: list[dict[str, Any]] = status.get("conditions") or []
        self.adapters: list[_Adapter] = []
        self.managed = {a["name"] for a in status.get("adapters") or []}

    def condition(self, kind: str, ok: bool, reason: str, message: str = "") -> None:
        self.conditions = set_condition(self.conditions, kind, ok, reason, message)

    def is_managed(self, served: str) -> bool:
        match = _SERVED.fullmatch(served)
        if match is None:
            return False
        return not self.spec.get("adapters") or match["name"] in self.managed

    # -- resolve, pull, preflight ------------------------------------------------------------

    def prepare(self) -> None:
        previous = {a["name"]: a for a in self.status.get("adapters") or []}
        root = Path(self.spec["storage"]["path"])
        rewrite = self.spec["storage"].get("servedModelName")
        for version in resolve(self.client, self.spec, self.cache):
            name, number = version["adapter"], int(version["version"])
            self.managed.add(name)
            old = previous.get(name, {})
            same = old.get("desiredVersion") == number
            adapter = _Adapter(
                name=name,
                desired=number,
                current=old.get("currentVersion"),
                digest=version_digest(version["files"]),
                path=root / f"{name}@{number}",
                refusals=old.get("refusals", 0) if same else 0,
                # A refusal by vLLM stays with its version; preflight is judged afresh each time.
                failed=old.get("failed", "") if same and not _is_preflight(old) else "",
            )
            if not same:
                self.events.append(Event("Normal", "Resolved", f"{name} → version {number}"))
            self.client.pull(adapter.served, adapter.path, base_model_name=rewrite)
            problems = preflight(self.spec, version, adapter.path)
            if problems:
                adapter.failed = "preflight: " + "; ".join(problems)
            self.adapters.append(adapter)
        loadable = self.loadable()
        slots = self.spec["vllm"].get("maxLoras", 4)
        if len(loadable) > slots:
            for adapter in loadable:
                adapter.failed = f"preflight: {len(loadable)} adapters, the pods hold {slots}"
        refused = [a for a in self.adapters if a.failed.startswith("preflight")]
        if refused:
            self.condition(
                "Preflight", False, "Refused", "; ".join(f"{a.served}: {a.failed}" for a in refused)
            )
            for adapter in refused:
                if adapter.refusals == 0:  # once per version, not on every tick
                    self.events.append(
                        Event("Warning", "PreflightFailed", f"{adapter.served}: {adapter.failed}")
                    )
                    adapter.refusals = 1
        else:
            self.condition("Preflight", True, "Passed")

    def loadable(self) -> list[_Adapter]:
        return [a for a in self.adapters if not a.failed]

    # -- pods -------------------------------------------------------------------------------

    def needed(self) -> set[str]:
        """Served names to keep loaded: the desired ones (a version vLLM refused on one pod
        stays where it loaded), and the current ones until their successor is everywhere."""
        names = {a.served for a in self.adapters}
        names |= {f"{a.name}@{a.current}" for a in self.adapters if a.current is not None}
        return names

    def load_into(self, vllm: VllmPod, record: dict[str, Any], served_now: set[str]) -> None:
        previously = {item["servedName"] for item in record.get("loaded") or []}
        loaded = {
            item["servedName"]: item
            for item in record.get("loaded") or []
            if item["servedName"] in served_now
        }
        slots = self.spec["vllm"].get("maxLoras", 4)
        for adapter in self.loadable():
            if adapter.served in served_now:
                loaded.setdefault(adapter.served, self._loaded_item(adapter))
                continue
            if adapter.served in previously:
                self.events.append(
                    Event("Warning", "Drift", f"{record['name']} lost {adapter.served}; reloading")
                )
            mine = sorted(n for n in served_now if self.is_managed(n))
            stale = [n for n in mine if n not in self.needed()]
            while len(mine) >= slots and stale:  # make room: unneeded ones go first
                vllm.unload(stale[0])
                served_now.discard(stale[0])
                mine.remove(stale.pop(0))
            try:
                vllm.load(adapter.served, str(adapter.path))
            except VllmRefused as exc:
                adapter.refusals += 1
                budget = self.spec.get("retryBudget", 3)
                record["lastError"] = f"{adapter.served}: {exc}"
                if adapter.refusals >= budget:
                    adapter.failed = f"vLLM refused {adapter.refusals} times: {exc}"
                    self.events.append(
                        Event("Warning", "LoadFailed", f"{adapter.served}: {adapter.failed}")
                    )
                continue
            served_now.add(adapter.served)
            loaded[adapter.served] = self._loaded_item(adapter)
            self.events.append(Event("Normal", "Loaded", f"{adapter.served} into {record['name']}"))
        record["loaded"] = sorted(loaded.values(), key=lambda item: item["servedName"])

    @staticmethod
    def _loaded_item(adapter: _Adapter) -> dict[str, Any]:
        return {"servedName": adapter.served, "digest": adapter.digest, "loadedAt": _iso(_now())}

    def visit(
        self, pods: list[dict[str, Any]], open_pod: Callable[[str], VllmPod]
    ) -> tuple[list[dict[str, Any]], dict[str, tuple[VllmPod, set[str]]]]:
        """Load what each pod lacks; returns the pods' records and the reachable pods."""
        previous = {p["uid"]: p for p in self.status.get("pods") or []}
        records, reachable = [], {}
        for pod in sorted(pods, key=lambda p: p["metadata"]["name"]):
            meta = pod["metadata"]
            url = pod_url(pod, self.spec["vllm"])
            if url is None or (pod.get("status") or {}).get("phase", "Running") != "Running":
                continue
            record = dict(previous.get(meta["uid"], {}))
            restarts = _restarts(pod)
            if record and record.get("restarts", 0) != restarts:
                self.events.append(Event("Normal", "PodRestarted", f"{meta['name']}: reloading"))
                record["loaded"] = []
            record |= {
                "uid": meta["uid"],
                "name": meta["name"],
                "restarts": restarts,
                "lastError": "",
            }
            retry_at = previous.get(meta["uid"], {}).get("retryAt")
            if retry_at and _now() < datetime.fromisoformat(retry_at.replace("Z", "+00:00")):
                record["lastError"] = previous[meta["uid"]].get("lastError", "")
                records.append(record)
                continue
            vllm = open_pod(url)
            try:
                served_now = vllm.models()
                self.load_into(vllm, record, served_now)
                record |= {"failures": 0, "retryAt": None}
                reachable[meta["uid"]] = (vllm, served_now)
            except VllmUnreachable as exc:
                failures = int(record.get("failures") or 0) + 1
                delay = BACKOFF_SECONDS[min(failures, len(BACKOFF_SECONDS)) - 1]
                record |= {
                    "lastError": str(exc),
                    "failures": failures,
                    "retryAt": _iso(_now() + timedelta(seconds=delay)),
                }
                vllm.close()
            records.append(record)
        return records, reachable

    # -- move, unload, collect --------------------------------------------------------------

    def move_and_unload(
        self, records: list[dict[str, Any]], reachable: dict[str, tuple[VllmPod, set[str]]]
    ) -> None:
        everywhere = bool(records) and all(r["uid"] in reachable for r in records)
        for adapter in self.loadable():
            held = all(
                adapter.served in reachable[r["uid"]][1] for r in records if r["uid"] in reachable
            )
            if everywhere and held and adapter.current != adapter.desired:
                self.events.append(
                    Event(
                        "Normal",
                        "Moved",
                        f"{adapter.name}: version {adapter.current} → {adapter.desired}",
                    )
                )
                adapter.current = adapter.desired
        needed = self.needed()
        for record in records:
            if record["uid"] not in reachable:
                continue
            vllm, served_now = reachable[record["uid"]]
            for name in sorted(n for n in served_now if self.is_managed(n) and n not in needed):
                try:
                    vllm.unload(name)
                    self.events.append(Event("Normal", "Unloaded", f"{name} from {record['name']}"))
                except (VllmRefused, VllmUnreachable) as exc:
                    record["lastError"] = f"unload {name}: {exc}"
                record["loaded"] = [i for i in record["loaded"] if i["servedName"] != name]

    def collect(self) -> None:
        """Remove pulled directories no longer needed (only ones `pull` wrote)."""
        root = Path(self.spec["storage"]["path"])
        keep = self.needed() | {a.served for a in self.adapters}
        if not root.is_dir():
            return
        for directory in root.iterdir():
            stale = self.is_managed(directory.name) and directory.name not in keep
            if stale and (directory / MARKER).is_file():
                shutil.rmtree(directory, ignore_errors=True)

    def finish(self, records: list[dict[str, Any]], generation: int | None) -> dict[str, Any]:
        loadable = self.loadable()
        failed = [a for a in self.adapters if a.failed]
        errors = [r for r in records if r.get("lastError")]
        holding = [
            r
            for r in records
            if {a.served for a in loadable} <= {i["servedName"] for i in r.get("loaded") or []}
        ]
        all_loaded = bool(records) and len(holding) == len(records)
        moved = all(a.current == a.desired for a in loadable)
        self.condition(
            "Loaded",
            all_loaded and not failed,
            "AllPods" if all_loaded else ("NoPods" if not records else "Pending"),
            f"{len(holding)}/{len(records)} pods hold every version",
        )
        self.condition(
            "Degraded",
            bool(errors),
            "PodErrors" if errors else "None",
            "; ".join(r["lastError"] for r in errors),
        )
        if failed:
            phase = "Failed"
            self.condition(
                "Ready", False, "Failed", "; ".join(f"{a.served}: {a.failed}" for a in failed)
            )
        elif all_loaded and moved:
            phase = "Ready"
            self.condition("Ready", True, "Synced")
        else:
            phase = "Degraded" if errors else "Syncing"
            self.condition("Ready", False, phase)
        return {
            "phase": phase,
            "serving": ", ".join(f"{a.name}@{a.current}" for a in self.adapters if a.current),
            "readyPods": len(holding),
            "observedGeneration": generation,
            "adapters": [a.status() for a in self.adapters],
            "pods": records,
            "conditions": self.conditions,
        }


def sync(
    client: Client,
    spec: dict[str, Any],
    status: dict[str, Any],
    pods: list[dict[str, Any]],
    *,
    generation: int | None = None,
    open_pod: Callable[[str], VllmPod] = VllmPod,
    cache: IndexCache | None = None,
) -> tuple[dict[str, Any], list[Event]]:
    """One reconciliation; the new status and the events to post. `cache` keeps the serving
    index between reconciliations of the same object."""
    state = _Sync(client, spec, status, cache)
    try:
        state.prepare()
    except LoraforgeError as exc:
        if exc.status >= 500 or exc.status == 429:
            raise TemporaryFailure(str(exc)) from None
        state.condition("Resolved", False, exc.code, exc.message)
        state.condition("Ready", False, "Unresolved", exc.message)
        new = status | {
            "phase": "Failed",
            "observedGeneration": generation,
            "conditions": state.conditions,
        }
        return new, [Event("Warning", "ResolveFailed", exc.message)]
    except (httpx.HTTPError, OSError) as exc:
        raise TemporaryFailure(f"resolve/pull: {exc}") from None
    state.condition("Resolved", True, "Resolved", ", ".join(a.served for a in state.adapters))
    state.condition("Downloaded", True, "Verified", "sha256 checked")
    records, reachable = state.visit(pods, open_pod)
    try:
        state.move_and_unload(records, reachable)
    finally:
        for vllm, _ in reachable.values():
            vllm.close()
    state.collect()
    return state.finish(records, generation), state.events
