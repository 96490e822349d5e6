"""The Python SDK: loraforge's REST API over httpx, and `pull` for serving clusters.

`Client` is what the CLI, the operator and users' scripts talk to; it never touches
the database or the object store directly (presigned URLs aside). `pull` writes a PEFT
directory that `PeftModel.from_pretrained` and vLLM's `--lora-modules` / `load_lora_adapter`
load as is: every file verified against its sha256, the directory swapped in atomically, and
nothing done at all when the right version is already there.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import httpx

MARKER = ".loraforge-version.json"
"""Written into every pulled directory: which version it holds, and its files' sha256."""

_CHUNK = 1024 * 1024
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class LoraforgeError(Exception):
    """The API refused a request; `code` is the stable error code of its JSON envelope."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.param = param


class ChecksumError(Exception):
    """A downloaded file does not hash to the sha256 the registry recorded for it."""

    def __init__(self, filename: str, expected: str, actual: str) -> None:
        super().__init__(
            f"{filename}: sha256 mismatch, expected {expected}, got {actual}; "
            "the stored object is corrupt, nothing was written"
        )
        self.filename = filename
        self.expected = expected
        self.actual = actual


class TargetNotEmptyError(Exception):
    """`pull` refuses to replace a directory that it did not write."""


def parse_ref(ref: str) -> tuple[str, str]:
    """`name[@version|alias]` → (name, version or alias, default `latest`); refuses names that
    could not be registry names (path separators, `..`, control characters, too long)."""
    name, _, version = ref.partition("@")
    for part in (name, version or "latest"):
        if not _NAME.fullmatch(part) or ".." in part:
            raise ValueError(f"invalid adapter reference {ref!r}: expected name[@version|alias]")
    return name, version or "latest"


def _corrupt_on_server(response: httpx.Response) -> str | None:
    """What the stored object hashes to, when the API refused to serve it as corrupt
    (`502 checksum_mismatch`); else None."""
    try:
        error = response.json()["error"]
        return str(error["actual_sha256"]) if error["code"] == "checksum_mismatch" else None
    except (ValueError, KeyError, TypeError):
        return None


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class Client:
    """A tenant's view of one loraforge API (`Authorization: Bearer <api_key>`)."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 60.0,
        http: httpx.Client | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._auth = {"Authorization": f"Bearer {api_key}"}
        self._http = http or httpx.Client(timeout=timeout)
        # Presigned URLs go to the object store: a client without the API key, so the key
        # never leaves for another host.
        self._plain = httpx.Client(timeout=timeout)

    def close(self) -> None:
        self._http.close()
        self._plain.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing --------------------------------------------------------------------------

    def _url(self, path: str) -> str:
        return path if path.startswith(("http://", "https://")) else self.base_url + path

    @staticmethod
    def _raise_for(response: httpx.Response) -> None:
        if response.status_code < 400:
            return
        try:
            error = response.json()["error"]
            raise LoraforgeError(
                response.status_code, error["code"], error["message"], error.get("param")
            )
        except (ValueError, KeyError, TypeError):
            raise LoraforgeError(
                response.status_code, "http_error", response.text[:500] or response.reason_phrase
            ) from None

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """One API call; the decoded JSON body, or `LoraforgeError`."""
        headers = {**self._auth, **kwargs.pop("headers", {})}
        response = self._http.request(method, self._url(path), headers=headers, **kwargs)
        self._raise_for(response)
        return response.json() if response.content else None

    # -- files and jobs --------------------------------------------------------------------

    def upload_file(self, path: Path, purpose: str = "fine-tune") -> dict[str, Any]:
        with path.open("rb") as f:
            return dict(
                self.request(
                    "POST", "/v1/files", files={"file": (path.name, f)}, data={"purpose": purpose}
                )
            )

    def create_job(self, *, idempotency_key: str | None = None, **body: Any) -> dict[str, Any]:
        """POST /v1/fine_tuning/jobs with `body` (model, training_file, hyperparameters, ...)."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return dict(self.request("POST", "/v1/fine_tuning/jobs", json=body, headers=headers))

    def create_sweep(
        self,
        name: str,
        grid: dict[str, list[Any]],
        *,
        idempotency_key: str | None = None,
        **job: Any,
    ) -> dict[str, Any]:
        """POST /v1/fine_tuning/sweeps: one job per point of `grid` (hyperparameter: values)
        over `job` (a `create_job` body), all or none; each job's metadata holds
        `sweep=<name>`, which `cancel_jobs` and the other moves select it by."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        body = {"name": name, "job": job, "grid": grid}
        return dict(self.request("POST", "/v1/fine_tuning/sweeps", json=body, headers=headers))

    def retrieve_job(self, job_id: str) -> dict[str, Any]:
        return dict(self.request("GET", f"/v1/fine_tuning/jobs/{job_id}"))

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        return dict(self.request("POST", f"/v1/fine_tuning/jobs/{job_id}/cancel"))

    def cancel_jobs(self, metadata: dict[str, str]) -> dict[str, Any]:
        """Cancel every unfinished job whose metadata holds every pair (a sweep): the counts
        cancelled at once and asked to stop (running)."""
        return dict(
            self.request("POST", "/v1/fine_tuning/jobs/cancel", json={"metadata": metadata})
        )

    def pause_jobs(self, metadata: dict[str, str]) -> dict[str, Any]:
        """Pause every queued or running job whose metadata holds every pair: the counts
        paused at once and asked to pause (running)."""
        return dict(self.request("POST", "/v1/fine_tuning/jobs/pause", json={"metadata": metadata}))

    def resume_jobs(self, metadata: dict[str, str]) -> dict[str, Any]:
        """Resume every paused job whose metadata holds every pair (and withdraw the pause of
        running ones asked to): the counts resumed and withdrawn."""
        return dict(
            self.request("POST", "/v1/fine_tuning/jobs/resume", json={"metadata": metadata})
        )

    def prioritize_jobs(self, metadata: dict[str, str], priority: int) -> dict[str, Any]:
        """Give `priority` to every job not over or cancelling whose metadata holds every
        pair: how many `changed`."""
        body = {"metadata": metadata, "priority": priority}
        return dict(self.request("POST", "/v1/fine_tuning/jobs/priority", json=body))

    def set_priority(self, job_id: str, priority: int) -> dict[str, Any]:
        """A job's new priority (a queued one moves in the queue at once): the job."""
        body = {"priority": priority}
        return dict(self.request("POST", f"/v1/fine_tuning/jobs/{job_id}/priority", json=body))

    def pause_job(self, job_id: str) -> dict[str, Any]:
        return dict(self.request("POST", f"/v1/fine_tuning/jobs/{job_id}/pause"))

    def resume_job(self, job_id: str) -> dict[str, Any]:
        return dict(self.request("POST", f"/v1/fine_tuning/jobs/{job_id}/resume"))

    def queue_standing(self, job_id: str) -> dict[str, Any]:
        """Why a queued job waits and what goes before it (409 once it is not queued)."""
        return dict(self.request("GET", f"/v1/fine_tuning/jobs/{job_id}/queue"))

    def list_events(
        self, job_id: str, *, after: str | None = None, limit: int = 100, order: str = "asc"
    ) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit, "order": order}
        if after is not None:
            params["after"] = after
        return dict(self.request("GET", f"/v1/fine_tuning/jobs/{job_id}/events", params=params))

    # -- registry --------------------------------------------------------------------------

    def list_adapters(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        params: dict[str, Any] = {"limit": 100}
        while True:
            page = self.request("GET", "/v1/adapters", params=params)
            found += page["data"]
            if not page["has_more"]:
                return found
            params["after"] = page["last_id"]

    def list_versions(self, name: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        params: dict[str, Any] = {"limit": 100}
        while True:
            page = self.request("GET", f"/v1/adapters/{name}/versions", params=params)
            found += page["data"]
            if not page["has_more"]:
                return found
            params["after"] = page["last_id"]

    def get_version(self, name: str, ref: str | int = "latest") -> dict[str, Any]:
        """A version by number, alias, or `latest`."""
        return dict(self.request("GET", f"/v1/adapters/{name}/versions/{ref}"))

    def lineage(self, name: str, ref: str | int = "latest") -> dict[str, Any]:
        return dict(self.request("GET", f"/v1/adapters/{name}/versions/{ref}/lineage")["lineage"])

    def version_files(self, name: str, ref: str | int = "latest") -> list[dict[str, Any]]:
        return list(self.request("GET", f"/v1/adapters/{name}/versions/{ref}/files")["data"])

    def set_alias(self, name: str, alias: str, version: int) -> dict[str, Any]:
        return dict(
            self.request("PUT", f"/v1/adapters/{name}/aliases/{alias}", json={"version": version})
        )

    def delete_alias(self, name: str, alias: str) -> None:
        self.request("DELETE", f"/v1/adapters/{name}/aliases/{alias}")

    def alias_history(self, name: str, alias: str) -> list[dict[str, Any]]:
        return list(self.request("GET", f"/v1/adapters/{name}/aliases/{alias}/history")["data"])

    def delete_version(self, name: str, version: int) -> dict[str, Any]:
        return dict(self.request("DELETE", f"/v1/adapters/{name}/versions/{version}"))

    def serving_index(
        self, base_model: str, alias: str = "latest", *, etag: str | None = None
    ) -> tuple[dict[str, Any] | None, str]:
        """(index, etag); the index is None when `etag` still matches (a 304)."""
        headers = {**self._auth, **({"If-None-Match": f'"{etag}"'} if etag else {})}
        response = self._http.get(
            self._url("/v1/adapters/index"),
            params={"base_model": base_model, "alias": alias},
            headers=headers,
        )
        if response.status_code == 304:
            return None, etag or ""
        self._raise_for(response)
        return response.json(), response.headers["ETag"].strip('"')

    # -- pull ------------------------------------------------------------------------------

    def pull(self, ref: str, target_dir: Path | str, *, base_model_name: str | None = None) -> Path:
        """Make `target_dir` hold version `ref` (`name[@version|alias]`, default the latest).

        Every file is verified against the registry's sha256 before the directory is swapped
        in; a corrupt object raises `ChecksumError` (file, expected, actual), or, when the API
        streams a corrupt file of more than a chunk and cuts it short, `httpx.TransportError`;
        either way `target_dir` is left as it was. `base_model_name` rewrites `base_model_name_or_path` in
        `adapter_config.json` (vLLM's resolver wants the served model's name there). When
        `target_dir` already holds that version, intact, nothing is downloaded.
        """
        target = Path(target_dir)
        name, version_ref = parse_ref(ref)
        version = self.get_version(name, version_ref)
        if _already_pulled(target, version, base_model_name):
            return target
        if target.exists() and not _replaceable(target):
            raise TargetNotEmptyError(
                f"{target} exists and was not written by `loraforge pull`; "
                "choose an empty or new directory"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.pull-", dir=target.parent))
        os.chmod(staging, 0o755)  # mkdtemp's 0700 would hide the adapter from a serving user
        try:
            downloads = {f["name"]: f for f in self.version_files(name, version["version"])}
            local = {}  # what each file on disk hashes to (verified against the registry)
            for f in version["files"]:
                self._download(downloads[f["name"]], staging / f["name"], f["sha256"])
                local[f["name"]] = f["sha256"]
            if base_model_name is not None:
                config = staging / "adapter_config.json"
                _rewrite_base(config, base_model_name)
                local[config.name] = _sha256_file(config)
            _write_marker(staging, version, base_model_name, local)
            _swap_in(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return target

    def _download(self, entry: dict[str, Any], path: Path, expected: str) -> None:
        client, headers = (self._http, self._auth) if entry["via"] == "api" else (self._plain, {})
        digest = hashlib.sha256()
        with client.stream("GET", entry["url"], headers=headers) as response:
            if response.status_code >= 400:
                response.read()
                if (refused := _corrupt_on_server(response)) is not None:
                    raise ChecksumError(entry["name"], expected, refused)
                self._raise_for(response)
            with path.open("wb") as out:
                for chunk in response.iter_bytes(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        actual = digest.hexdigest()
        if actual != expected:
            raise ChecksumError(entry["name"], expected, actual)


def _marker(target: Path) -> dict[str, Any] | None:
    try:
        found = json.loads((target / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def _already_pulled(target: Path, version: dict[str, Any], base_model_name: str | None) -> bool:
    """The marker names this version (and rewrite), and every file still hashes as written."""
    marker = _marker(target)
    if marker is None or marker.get("version_id") != version["id"]:
        return False
    if marker.get("base_model_name_or_path") != base_model_name:
        return False
    local = marker.get("local_sha256", {})
    if set(local) != {f["name"] for f in version["files"]}:
        return False
    return all(
        (target / name).is_file() and _sha256_file(target / name) == sha
        for name, sha in local.items()
    )


def _replaceable(target: Path) -> bool:
    if not target.is_dir():
        return False
    return _marker(target) is not None or not any(target.iterdir())


def _rewrite_base(config_path: Path, base_model_name: str) -> None:
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base_model_name
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _write_marker(
    staging: Path, version: dict[str, Any], base_model_name: str | None, local: dict[str, str]
) -> None:
    marker = {
        "adapter": version["adapter"],
        "version": version["version"],
        "version_id": version["id"],
        "model": version["model"],
        "base_model": version["base_model"],
        "base_model_name_or_path": base_model_name,
        "registry_sha256": {f["name"]: f["sha256"] for f in version["files"]},
        # What is on disk: adapter_config.json differs from the registry's after a rewrite.
        "local_sha256": local,
    }
    (staging / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")


def _swap_in(staging: Path, target: Path) -> None:
    """Replace `target` by `staging` with renames on one filesystem: readers see the old
    directory or the new one, each complete (a missing path only for the instant between
    the two renames, and the old one is put back if the second fails)."""
    if not target.exists():
        os.rename(staging, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rmdir(old)
    os.rename(target, old)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
