"""Publication of a job's adapter: reserve a number, upload and verify the files, write the
manifest last, commit the version row with the job's success."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, cast

from sqlalchemy import Connection, Engine, Table, insert, text

from control_plane import interactive_runs
from control_plane.base_catalog import get_base_model
from control_plane.db.tables import AdapterVersion
from control_plane.ids import new_id
from control_plane.interactive import NotFound
from control_plane.job_status import JobStatus
from control_plane.jobs import job_parent_version_id
from control_plane.queue import JobQueue
from control_plane.records import BaseModelRecord, JobRecord
from control_plane.registry.aliases import remove_version_objects
from control_plane.registry.names import (
    ADAPTER_FILES,
    BASE_MODEL_LINEAGE_FIELDS,
    MANIFEST,
    MANIFEST_FORMAT,
    NAME_MAX,
    STORE_ERRORS,
    AdapterFilesError,
    BaseModelMismatchError,
    CheckpointNotFoundError,
    StoreUnavailableError,
    model_id,
    validate_adapter_name,
)
from control_plane.registry.reads import (
    AdapterVersionRecord,
    PublishedVersion,
    get_version_by_id,
    version_for_job,
)
from control_plane.storage import (
    ObjectExistsError,
    ObjectStore,
    ObjectStoreError,
    adapter_version_prefix,
)
from control_plane.tenants import get_tenant

log = logging.getLogger(__name__)
versions_table = cast(Table, AdapterVersion.__table__)

_RESERVE_ATTEMPTS = 3

# --------------------------------------------------------------------------- publication


class RegistryParts(Protocol):
    """What publication needs; `control_plane.services.Services` has all of it."""

    engine: Engine
    queue: JobQueue
    store: ObjectStore


@dataclass(frozen=True)
class _Plan:
    tenant_name: str
    base: BaseModelRecord
    adapter_name: str
    parent: AdapterVersionRecord | None


def derive_adapter_name(base_name: str, suffix: str) -> str:
    """`<last part of the base name>-<suffix>`, made a valid adapter name."""
    raw = f"{base_name.rsplit('/', 1)[-1]}-{suffix}"
    cleaned = re.sub(r"\.{2,}", ".", re.sub(r"[^A-Za-z0-9._-]+", "-", raw))
    return cleaned.lstrip("._-")[:NAME_MAX] or "adapter"


def _plan(conn: Connection, job: JobRecord) -> _Plan:
    tenant = get_tenant(conn, job.tenant_id)
    base = get_base_model(conn, job.base_model_id)
    assert tenant is not None and base is not None  # a job's tenant and base outlive it
    # The row's link, not the record's: the record may predate it (rebuild restores links).
    parent_id = job_parent_version_id(conn, job.id)
    parent = get_version_by_id(conn, parent_id) if parent_id else None
    if job.adapter_name:
        name = job.adapter_name
    elif parent is not None and parent.tenant_id == job.tenant_id:
        name = parent.adapter_name
    else:
        name = derive_adapter_name(base.name, job.suffix or job.id)
    return _Plan(tenant.name, base, validate_adapter_name(name), parent)


def _local_files(adapter_dir: Path) -> list[tuple[str, Path, int, str]]:
    found = []
    for name in ADAPTER_FILES:
        path = adapter_dir / name
        if not path.is_file():
            raise AdapterFilesError(f"{adapter_dir} has no {name}: not a PEFT adapter directory")
        digest = hashlib.sha256()
        with path.open("rb") as src:
            while chunk := src.read(1024 * 1024):
                digest.update(chunk)
        found.append((name, path, path.stat().st_size, digest.hexdigest()))
    return found


def _reserve(engine: Engine, tenant_id: str, name: str, base_id: str) -> tuple[str, int, datetime]:
    """Create the adapter on first publish, or take its next version number; commits at once
    so concurrent publishes never wait on each other (a failed publish leaves a gap)."""
    with engine.begin() as conn:
        row = conn.execute(
            text(
                "INSERT INTO adapters (id, tenant_id, name, base_model_id, next_version) "
                "VALUES (:id, :tenant, :name, :base, 2) "
                "ON CONFLICT (tenant_id, name) DO UPDATE SET next_version = adapters.next_version + 1 "
                "WHERE adapters.base_model_id = EXCLUDED.base_model_id "
                "RETURNING id, next_version - 1 AS number, created_at"
            ),
            {"id": new_id("adapter"), "tenant": tenant_id, "name": name, "base": base_id},
        ).one_or_none()
    if row is None:
        raise BaseModelMismatchError(
            f"adapter {name!r} exists for another base model; name the adapter differently",
            param="adapter_name",
        )
    return row.id, row.number, row.created_at


def _discard(store: ObjectStore, prefix: str) -> None:
    """Best effort: remove what a publish that will not commit uploaded (manifest first)."""
    try:
        remove_version_objects(store, prefix)
    except Exception:
        log.warning("could not remove the unpublished objects under %s", prefix, exc_info=True)


@dataclass(frozen=True)
class _Staged:
    """A version whose files and manifest are in the store, its row not yet committed."""

    adapter_id: str
    number: int
    version_id: str
    prefix: str
    created_at: datetime
    manifest: dict[str, Any]

    def insert(self, conn: Connection) -> None:
        """The version's row (not committed): the version becomes visible with its commit."""
        version = self.manifest["version"]
        conn.execute(
            insert(versions_table).values(
                id=self.version_id,
                adapter_id=self.adapter_id,
                number=self.number,
                job_id=version["job_id"],
                parent_version_id=version["parent_version_id"],
                files=self.manifest["files"],
                lineage=self.manifest["lineage"],
                metrics=self.manifest["metrics"],
                object_prefix=self.prefix,
                created_at=self.created_at,
            )
        )


def _stage(
    store: ObjectStore,
    engine: Engine,
    tenant_id: str,
    plan: _Plan,
    adapter_dir: Path,
    job_id: str | None,
    lineage: dict[str, Any],
    metrics: dict[str, Any],
) -> _Staged:
    """Reserve the adapter's next number and upload the files and the manifest under it."""
    local = _local_files(adapter_dir)
    for _ in range(_RESERVE_ATTEMPTS):
        adapter_id, number, adapter_created = _reserve(
            engine, tenant_id, plan.adapter_name, plan.base.id
        )
        prefix = adapter_version_prefix(tenant_id, plan.adapter_name, number)
        version_id, created_at = new_id("version"), datetime.now(UTC)
        manifest: dict[str, Any] = {
            "format": MANIFEST_FORMAT,
            "tenant": {"id": tenant_id, "name": plan.tenant_name},
            "adapter": {
                "id": adapter_id,
                "name": plan.adapter_name,
                "created_at": adapter_created.isoformat(),
            },
            "version": {
                "id": version_id,
                "number": number,
                "model_id": model_id(plan.adapter_name, number),
                "job_id": job_id,
                "parent_version_id": plan.parent.id if plan.parent else None,
                "parent_ref": plan.parent.model_id if plan.parent else None,
                "created_at": created_at.isoformat(),
            },
            "base_model": {k: getattr(plan.base, k) for k in BASE_MODEL_LINEAGE_FIELDS},
            "files": [{"name": n, "size": size, "sha256": sha} for n, _, size, sha in local],
            "lineage": lineage,
            "metrics": metrics,
        }
        try:
            _upload(store, prefix, local, manifest)
        except ObjectExistsError:
            log.warning("objects left under %s; publishing under the next number", prefix)
            continue
        except STORE_ERRORS as exc:
            _discard(store, prefix)
            raise StoreUnavailableError(
                f"publishing {plan.adapter_name} version {number} failed in the object store: {exc}"
            ) from exc
        return _Staged(adapter_id, number, version_id, prefix, created_at, manifest)
    raise StoreUnavailableError(f"no free version number for adapter {plan.adapter_name!r}")


def publish_job_adapter(
    parts: RegistryParts,
    *,
    job: JobRecord,
    worker_id: str,
    adapter_dir: Path,
    lineage: dict[str, Any],
    metrics: dict[str, Any],
) -> PublishedVersion | None:
    """Publish the trained adapter in `adapter_dir` as the job's version and mark the job
    `succeeded`, all or nothing.

    Returns the job's existing version (`created=False`) when it was already published, and
    None when `worker_id` no longer holds the job's lease or the job's cancellation was
    requested before the commit (the job ends `cancelled`); either way nothing becomes
    visible. Raises
    `StoreUnavailableError` (retryable) when the object store fails, leaving no version row
    and the job running, for the caller to fail retryably; other `RegistryError`s are not
    worth a retry.
    """
    with parts.engine.connect() as conn:
        existing = version_for_job(conn, job.id)
        if existing is not None:
            return PublishedVersion(existing, created=False)
        plan = _plan(conn, job)
    staged = _stage(
        parts.store, parts.engine, job.tenant_id, plan, adapter_dir, job.id, lineage, metrics
    )
    prefix, version_id = staged.prefix, staged.version_id
    try:
        done = parts.queue.complete(
            job.id,
            worker_id,
            fine_tuned_model=model_id(plan.adapter_name, staged.number),
            trained_tokens=metrics.get("trained_tokens"),
            in_transaction=staged.insert,
        )
    except BaseException:
        _discard(parts.store, prefix)
        raise
    if done is not None and done.status == JobStatus.CANCELLED:
        _discard(parts.store, prefix)  # cancelled during publication: no version was committed
        return None
    with parts.engine.connect() as conn:
        if done is None:  # lease lost, or a duplicate publish of this job committed first
            _discard(parts.store, prefix)
            existing = version_for_job(conn, job.id)
            return PublishedVersion(existing, created=False) if existing else None
        published = get_version_by_id(conn, version_id)
    assert published is not None
    return PublishedVersion(published, created=True)


def _upload(
    store: ObjectStore,
    prefix: str,
    local: Sequence[tuple[str, Path, int, str]],
    manifest: dict[str, Any],
) -> None:
    """Upload the files write-once, check what the store holds, then write the manifest."""
    for name, path, size, sha in local:
        store.put_file(prefix + name, path, sha256=sha, write_once=True)
        stored = store.head(prefix + name)
        if stored is None or stored.sha256 != sha or stored.size != size:
            raise ObjectStoreError(
                f"{prefix}{name}: the store holds {stored} after the upload, not sha256 {sha}"
            )
    body = json.dumps(manifest, indent=1, sort_keys=True, default=str).encode()
    store.put_bytes(prefix + MANIFEST, body, write_once=True)


# --------------------------------------------------------------------------- interactive weights


def publish_checkpoint(
    parts: RegistryParts, *, tenant_id: str, path: str, adapter_name: str
) -> PublishedVersion:
    """Publish weights an interactive session saved (`tinker://...`, this tenant's) as the next
    version of `adapter_name`, with the session, model and LoRA config as its lineage, and as
    its parent the adapter version the run had loaded when it saved them, if one
    (`control_plane.session_weights`).

    A checkpoint becomes at most one version: publishing it again returns that version
    (`created=False`), whichever name is asked for. The files are uploaded and verified and the
    manifest written before the version's row commits, as a job's are. The checkpoint's row is
    locked from the first read to that commit: a deletion (or expiry) of it waits for the
    publication, and one in flight is waited for and answered as not found, so the files read
    are never a deletion's remains; a second publication waits and answers the first's version.
    """
    name = validate_adapter_name(adapter_name)
    with parts.engine.connect() as conn:  # rolled back, the lock let go, unless committed
        try:
            saved = interactive_runs.find_checkpoint(conn, tenant_id, path, lock=True)
        except NotFound:
            raise CheckpointNotFoundError(
                f"no saved weights at {path!r}: name a path that save_weights_for_sampler or "
                "save_state returned",
                param="from_checkpoint",
            ) from None
        if saved.published_version_id is not None:
            return PublishedVersion(_version(conn, saved.published_version_id), created=False)
        if saved.encrypted:
            raise AdapterFilesError(
                f"the weights at {path!r} are encrypted to their age recipients, so the platform "
                "cannot read them: publish a save_weights_for_sampler or save_state path, or an "
                "export saved without recipients",
                param="from_checkpoint",
            )
        tenant = get_tenant(conn, tenant_id)
        base = get_base_model(conn, saved.base_model_id)
        assert tenant is not None and base is not None  # a checkpoint's tenant and base outlive it
        # A run that loaded an adapter version descends from it (revision 0041), held until the
        # commit (a deletion meanwhile waits; one committed before leaves no parent).
        kept = conn.execute(
            text("SELECT id FROM adapter_versions WHERE id = :id FOR KEY SHARE"),
            {"id": saved.from_version_id},
        ).scalar_one_or_none()
        parent = get_version_by_id(conn, kept) if kept else None
        plan = _Plan(tenant.name, base, name, parent)
        lineage = {
            "source": "interactive_session",
            "session_id": saved.session_id,
            "model_id": saved.model_id,
            "checkpoint": {
                "path": path,
                "kind": saved.kind,
                "saved_at": saved.created_at.isoformat(),
            },
            "lora": saved.lora_config,
        }
        with tempfile.TemporaryDirectory() as scratch:
            parts.store.download_prefix(saved.storage_prefix, Path(scratch))
            staged = _stage(
                parts.store, parts.engine, tenant_id, plan, Path(scratch), None, lineage, {}
            )
        try:
            staged.insert(conn)
            conn.execute(
                text(
                    "UPDATE interactive_checkpoints SET published_version_id = :version "
                    "WHERE id = :id"
                ),
                {"version": staged.version_id, "id": saved.id},
            )
            conn.commit()
        except BaseException:
            _discard(parts.store, staged.prefix)
            raise
        return PublishedVersion(_version(conn, staged.version_id), created=True)


def _version(conn: Connection, version_id: str) -> AdapterVersionRecord:
    version = get_version_by_id(conn, version_id)
    assert version is not None  # the checkpoint's link is set in the version's transaction
    return version
