"""`FineTuningJob`: submit the spec as one loraforge job and mirror that job into status.

`reconcile` is called on every tick of the object's timer. It submits once (the object's UID is
the API's idempotency key, so an operator restarted between the submission and its status write
gets the same job back, never a second one), then has the job follow `spec.suspend` and
`spec.priority`, and copies the job's state, priority, progress, ETA, latest metrics, while it
is queued what it waits for (its standing in the queue, and a `Waiting` condition whose reason
says why) and, on success, the adapter version with its digest and lineage into status.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from loraforge.client import Client, LoraforgeError
from operators.conditions import set_condition
from operators.kube import KubeApi

PHASES = {
    "validating_files": "Submitted",
    "queued": "Queued",
    "running": "Running",
    "cancelling": "Cancelling",
    "paused": "Suspended",
    "succeeded": "Succeeded",
    "failed": "Failed",
    "cancelled": "Cancelled",
}
FINISHED = {"Succeeded", "Failed", "Cancelled"}
# A queued job's `waiting_for` (GET .../queue) as the `Waiting` condition's reason.
WAITING_REASONS = {
    "retry_backoff": "RetryBackoff",
    "tenant_limit": "TenantLimit",
    "own_jobs": "OwnJobsAhead",
    "other_tenants": "OtherTenantsAhead",
    "trainer": "NextForATrainer",
}


class TemporaryFailure(Exception):
    """The API or a download did not answer: the next tick tries again."""


def snake(name: str) -> str:
    """`loraRank` → `lora_rank` (the CRD speaks Kubernetes' camelCase, the API snake_case)."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def version_digest(files: list[dict[str, Any]]) -> str:
    """One digest for a version: sha256 over its files' names and sha256, in name order."""
    lines = "".join(f"{f['name']} {f['sha256']}\n" for f in sorted(files, key=lambda f: f["name"]))
    return "sha256:" + hashlib.sha256(lines.encode()).hexdigest()


def job_body(
    spec: dict[str, Any], training_file: str, validation_file: str | None
) -> dict[str, Any]:
    """The POST /v1/fine_tuning/jobs body the spec describes."""
    hp = {snake(k): v for k, v in (spec.get("hyperparameters") or {}).items()}
    if hp.get("target_modules") == ["all-linear"]:
        hp["target_modules"] = "all-linear"
    body: dict[str, Any] = {
        "model": spec["model"],
        "training_file": training_file,
        "hyperparameters": hp,
        "priority": spec.get("priority", 0),
    }
    optional = {
        "validation_file": validation_file,
        "adapter_name": spec.get("adapterName"),
        "suffix": spec.get("suffix"),
        "continue_from": spec.get("continueFrom"),
        "max_attempts": spec.get("maxAttempts"),
        "serving_target": _serving_target(spec.get("servingTarget")),
        "method": _method(spec.get("method")),
    }
    return body | {k: v for k, v in optional.items() if v is not None}


def _method(method: dict[str, Any] | None) -> dict[str, Any] | None:
    """`spec.method` in OpenAI's shape: `{"type": "dpo", "dpo": {"hyperparameters": {"beta"}}}`;
    a beta beside another type goes as sent, for the API to refuse with its reason."""
    if method is None:
        return None
    kind = method.get("type", "supervised")
    if "beta" not in method:
        return {"type": kind}
    return {"type": kind, kind: {"hyperparameters": {"beta": method["beta"]}}}


def _serving_target(target: dict[str, Any] | None) -> dict[str, Any] | None:
    if target is None:
        return None
    return {snake(k): v for k, v in target.items()}


def upload_dataset(
    client: Client, kube: KubeApi, namespace: str, dataset: dict[str, Any], filename: str
) -> str:
    """The file id of `dataset`: as given, or uploaded from its URL or Secret key."""
    if "fileId" in dataset:
        return str(dataset["fileId"])
    if "url" in dataset:
        try:
            response = httpx.get(dataset["url"], timeout=120, follow_redirects=True)
        except httpx.HTTPError as exc:
            raise TemporaryFailure(f"dataset.url: {exc}") from None
        if response.status_code >= 400:
            raise LoraforgeError(
                400, "dataset_download_failed", f"dataset.url answered {response.status_code}"
            )
        content = response.content
    else:
        ref = dataset["secretRef"]
        data = kube.secret_data(namespace, ref["name"])
        if ref["key"] not in data:
            raise LoraforgeError(
                400, "dataset_secret_key_missing", f"Secret {ref['name']} has no key {ref['key']}"
            )
        content = data[ref["key"]].encode()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / filename
        path.write_bytes(content)
        return str(client.upload_file(path)["id"])


def _failed(status: dict[str, Any], error: LoraforgeError) -> dict[str, Any]:
    conditions = set_condition(
        status.get("conditions") or [], "Failed", True, error.code, error.message
    )
    return status | {
        "phase": "Failed",
        "error": {"code": error.code, "message": error.message, "param": error.param or ""},
        "conditions": conditions,
    }


def _submit(
    client: Client, kube: KubeApi, body: dict[str, Any], status: dict[str, Any]
) -> dict[str, Any]:
    meta, spec = body["metadata"], body["spec"]
    namespace, name = meta["namespace"], meta["name"]
    status = dict(status)
    if "trainingFileId" not in status:
        status["trainingFileId"] = upload_dataset(
            client, kube, namespace, spec["dataset"], f"{name}.jsonl"
        )
    if spec.get("validationDataset") and "validationFileId" not in status:
        status["validationFileId"] = upload_dataset(
            client, kube, namespace, spec["validationDataset"], f"{name}-validation.jsonl"
        )
    request = job_body(spec, status["trainingFileId"], status.get("validationFileId"))
    job = client.create_job(idempotency_key=meta["uid"], **request)
    conditions = set_condition(
        status.get("conditions") or [], "Submitted", True, "JobCreated", f"job {job['id']}"
    )
    return status | {"jobId": job["id"], "conditions": conditions}


def _latest_metrics(client: Client, job_id: str) -> dict[str, Any] | None:
    events = client.list_events(job_id, order="desc", limit=50)["data"]
    return next((e["data"] for e in events if e["type"] == "metrics" and e["data"]), None)


def _queue_standing(client: Client, job_id: str) -> dict[str, Any] | None:
    """A queued job's standing in status' camelCase, or None when it left the queue meanwhile."""
    try:
        found = client.queue_standing(job_id)
    except LoraforgeError as exc:
        if exc.status == 409:
            return None
        raise
    return {
        "waitingFor": found["waiting_for"],
        "message": found["message"],
        "ownJobsAhead": found["own_jobs_ahead"],
        "tenantsAhead": found["tenants_ahead"],
        "share": found["share"],
    }


def _mirror(client: Client, job: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
    phase = PHASES.get(job["status"], "Submitted")
    conditions = status.get("conditions") or []
    conditions = set_condition(conditions, "Running", phase == "Running", job["status"])
    queue = _queue_standing(client, job["id"]) if phase == "Queued" else None
    if queue is None:
        conditions = set_condition(conditions, "Waiting", False, job["status"])
    else:
        reason = WAITING_REASONS.get(queue["waitingFor"], "Queued")
        conditions = set_condition(conditions, "Waiting", True, reason, queue["message"])
    out = status | {
        "phase": phase,
        "jobStatus": job["status"],
        "priority": job["priority"],
        "progress": job.get("progress"),
        "etaSeconds": job.get("eta_seconds") if phase == "Running" else None,
        "queue": queue,
        "error": None,
    }
    metrics = _latest_metrics(client, job["id"])
    if metrics is not None:
        out["metrics"] = metrics
    if job.get("finished_at"):
        out["finishedAt"] = datetime.fromtimestamp(job["finished_at"], UTC).isoformat()
    if job.get("error"):
        error = job["error"]
        out["error"] = {k: error.get(k) or "" for k in ("code", "message", "param")}
    if phase in FINISHED:
        reason = (job.get("error") or {}).get("code") or job["status"]
        message = (job.get("error") or {}).get("message") or ""
        conditions = set_condition(conditions, phase, True, reason, message)
    if phase == "Succeeded" and job.get("fine_tuned_model") and "adapter" not in status:
        name, _, number = job["fine_tuned_model"].partition("@")
        version = client.get_version(name, number)
        out["adapter"] = {
            "name": name,
            "version": version["version"],
            "model": version["model"],
            "digest": version_digest(version["files"]),
            "lineage": client.lineage(name, version["version"]),
        }
    out["conditions"] = conditions
    return out


def _follow_suspend(client: Client, spec: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    """`spec.suspend` on a submitted job, like a Kubernetes Job's: true pauses it (a running
    job stops at its next step with a checkpoint and frees its trainer; asked again each tick
    until it has, which changes nothing), false again resumes it from that checkpoint."""
    if spec.get("suspend") and job["status"] in ("queued", "running"):
        return client.pause_job(job["id"])
    if not spec.get("suspend") and job["status"] == "paused":
        return client.resume_job(job["id"])
    return job


def _follow_priority(
    client: Client, spec: dict[str, Any], job: dict[str, Any]
) -> tuple[dict[str, Any], str | None]:
    """`spec.priority` on a submitted job: a queued job takes its new place in the queue at
    once, a validating, paused or running one keeps it for when it is queued. A job that is
    cancelling (or ended meanwhile: 409) keeps the one it had; the next tick mirrors it. One
    above the tenant's cap (403) is not taken: the job, and why."""
    priority = spec.get("priority", 0)
    if job["priority"] == priority or PHASES.get(job["status"]) in {*FINISHED, "Cancelling"}:
        return job, None
    try:
        return client.set_priority(job["id"], priority), None
    except LoraforgeError as exc:
        if exc.status == 409:
            return job, None
        if exc.status == 403:
            return job, exc.message
        raise


def _priority_condition(status: dict[str, Any], refused: str | None) -> dict[str, Any]:
    """A `PriorityRefused` condition while `spec.priority` is refused (above the tenant's cap),
    `False` once it no longer is."""
    conditions = status.get("conditions") or []
    if refused is None and not any(c["type"] == "PriorityRefused" for c in conditions):
        return status
    if refused is None:
        conditions = set_condition(conditions, "PriorityRefused", False, "Followed")
    else:
        conditions = set_condition(conditions, "PriorityRefused", True, "AboveTenantCap", refused)
    return status | {"conditions": conditions}


def reconcile(
    client: Client,
    kube: KubeApi,
    body: dict[str, Any],
    *,
    delete: Callable[[], None] | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """The object's new status (a transient API or download failure raises `TemporaryFailure`)."""
    spec, meta = body["spec"], body["metadata"]
    status = {k: v for k, v in (body.get("status") or {}).items() if k != "kopf"}
    generation = meta.get("generation")
    if "jobId" not in status:
        if status.get("phase") == "Failed" and status.get("observedGeneration") == generation:
            return status  # refused as it stands: a changed spec is tried again
        if spec.get("suspend"):
            conditions = set_condition(
                status.get("conditions") or [], "Submitted", False, "Suspended"
            )
            return status | {"phase": "Suspended", "conditions": conditions}
        status["observedGeneration"] = generation
        try:
            status = _submit(client, kube, body, status)
        except LoraforgeError as exc:
            if exc.status >= 500 or exc.status == 429:
                raise TemporaryFailure(str(exc)) from None
            return _failed(status, exc)
        except httpx.HTTPError as exc:
            raise TemporaryFailure(f"loraforge API: {exc}") from None
    try:
        # Priority first: a job resumed goes into the queue at its new place.
        job, refused = _follow_priority(client, spec, client.retrieve_job(status["jobId"]))
        job = _follow_suspend(client, spec, job)
        status = _priority_condition(_mirror(client, job, status), refused)
    except (LoraforgeError, httpx.HTTPError) as exc:
        raise TemporaryFailure(f"loraforge API: {exc}") from None
    ttl = spec.get("ttlSecondsAfterFinished")
    if ttl is not None and delete is not None and status.get("finishedAt"):
        finished = datetime.fromisoformat(status["finishedAt"]).timestamp()
        if (now or datetime.now(UTC).timestamp()) >= finished + ttl:
            delete()
    return status


def cancel(client: Client, status: dict[str, Any]) -> str | None:
    """On deletion: cancel the job unless it finished. Returns what was done, for an event."""
    job_id = status.get("jobId")
    if not job_id or status.get("phase") in FINISHED:
        return None
    try:
        client.cancel_job(job_id)
    except LoraforgeError as exc:
        if exc.status in (404, 409):  # gone, or finished meanwhile
            return None
        raise
    return f"cancelled job {job_id}"
