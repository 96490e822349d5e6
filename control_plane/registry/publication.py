"""Publication of a job's adapter: reserve a number, upload and verify the files, write the
manifest last, commit the version row with the job's success."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, cast

from sqlalchemy import Connection, Engine, Table, insert, text

from control_plane.base_catalog import get_base_model
from control_plane.db.tables import AdapterVersion
from control_plane.ids import new_id
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
            f"adapter {name!r} exists for another base model; name the job's adapter differently",
            param="adapter_name",
        )
    return row.id, row.number, row.created_at


def _discard(store: ObjectStore, prefix: str) -> None:
    """Best effort: remove what a publish that will not commit uploaded (manifest first)."""
    try:
        remove_version_objects(store, prefix)
    except Exception:
        log.warning("could not remove the unpublished objects under %s", prefix, exc_info=True)


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
    local = _local_files(adapter_dir)
    for _ in range(_RESERVE_ATTEMPTS):
        adapter_id, number, adapter_created = _reserve(
            parts.engine, job.tenant_id, plan.adapter_name, plan.base.id
        )
        prefix = adapter_version_prefix(job.tenant_id, plan.adapter_name, number)
        version_id, created_at = new_id("version"), datetime.now(UTC)
        manifest: dict[str, Any] = {
            "format": MANIFEST_FORMAT,
            "tenant": {"id": job.tenant_id, "name": plan.tenant_name},
            "adapter": {
                "id": adapter_id,
                "name": plan.adapter_name,
                "created_at": adapter_created.isoformat(),
            },
            "version": {
                "id": version_id,
                "number": number,
                "model_id": model_id(plan.adapter_name, number),
                "job_id": job.id,
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
            _upload(parts.store, prefix, local, manifest)
        except ObjectExistsError:
            log.warning("objects left under %s; publishing under the next number", prefix)
            continue
        except STORE_ERRORS as exc:
            _discard(parts.store, prefix)
            raise StoreUnavailableError(
                f"publishing {plan.adapter_name} version {number} failed in the object store: {exc}"
            ) from exc
        break
    else:
        raise StoreUnavailableError(f"no free version number for adapter {plan.adapter_name!r}")

    def insert_version(conn: Connection) -> None:
        conn.execute(
            insert(versions_table).values(
                id=version_id,
                adapter_id=adapter_id,
                number=number,
                job_id=job.id,
                parent_version_id=manifest["version"]["parent_version_id"],
                files=manifest["files"],
                lineage=lineage,
                metrics=metrics,
                object_prefix=prefix,
                created_at=created_at,
            )
        )

    try:
        done = parts.queue.complete(
            job.id,
            worker_id,
            fine_tuned_model=model_id(plan.adapter_name, number),
            trained_tokens=metrics.get("trained_tokens"),
            in_transaction=insert_version,
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
