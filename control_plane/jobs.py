"""Job records: creation (with idempotency), reads, pagination, checkpoints.

The one home of SQL that reads `jobs` (and of the two writes that are not state changes: the
insert, and rebuild restoring a continue-from link). State transitions after creation belong
to `control_plane.queue`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Connection, Table, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from control_plane.db.tables import AdapterVersion, Job, JobCheckpoint
from control_plane.events import add_event
from control_plane.hyperparameters import Hyperparameters
from control_plane.ids import new_id
from control_plane.job_status import UNFINISHED, JobStatus, as_values
from control_plane.pagination import newest_first, trim
from control_plane.records import CheckpointRecord, JobRecord

jobs = cast(Table, Job.__table__)
checkpoints = cast(Table, JobCheckpoint.__table__)
versions = cast(Table, AdapterVersion.__table__)


class IdempotencyConflictError(Exception):
    """The idempotency key was used before with a different request body."""


@dataclass(frozen=True)
class NewJob:
    tenant_id: str
    base_model_id: str
    training_file_id: str
    validation_file_id: str | None
    hyperparameters: dict[str, Any]
    suffix: str | None = None
    adapter_name: str | None = None
    parent_version_id: str | None = None
    priority: int = 0
    max_attempts: int = 3
    idempotency_key: str | None = None
    user_metadata: dict[str, str] | None = None
    # What else the request that made it said (a sweep's whole body, hashed): a replay under
    # the key must say the same. Not hashed when None, so a single job hashes as before.
    request_extra: str | None = None

    def request_hash(self) -> str:
        # Without metadata, the hash a job got before revision 0019, and without a supervised
        # job's method and the default beta, the hash before DPO (a retried request matches).
        body = {
            k: v
            for k, v in self.__dict__.items()
            if k not in ("idempotency_key", "tenant_id")
            and not (k in ("user_metadata", "request_extra") and v is None)
        }
        body["hyperparameters"] = {
            k: v
            for k, v in self.hyperparameters.items()
            if not (k in _DEFAULTS_ADDED_SINCE_HASHING and v == _DEFAULTS_ADDED_SINCE_HASHING[k])
        }
        return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


_DEFAULTS_ADDED_SINCE_HASHING: dict[str, Any] = {
    name: Hyperparameters.model_fields[name].default
    for name in (
        "method",
        "dpo_beta",
        "early_stopping_patience",
        "early_stopping_threshold",
        "sweep_median_stopping",
    )
}


def create_job(conn: Connection, new: NewJob) -> tuple[JobRecord, bool]:
    """Insert a job in `validating_files`; returns (job, created).

    With an idempotency key, a repeat of the same request returns the first job; the same key
    with a different body raises `IdempotencyConflictError`.
    """
    request_hash = new.request_hash()
    if new.idempotency_key is not None:
        existing = _by_idempotency_key(conn, new.tenant_id, new.idempotency_key)
        if existing is not None:
            return _replay(existing, request_hash), False
    values = {
        "id": new_id("job"),
        "tenant_id": new.tenant_id,
        "status": JobStatus.VALIDATING_FILES,
        "base_model_id": new.base_model_id,
        "training_file_id": new.training_file_id,
        "validation_file_id": new.validation_file_id,
        "hyperparameters": new.hyperparameters,
        "suffix": new.suffix,
        "adapter_name": new.adapter_name,
        "parent_version_id": new.parent_version_id,
        "priority": new.priority,
        "max_attempts": new.max_attempts,
        "idempotency_key": new.idempotency_key,
        "request_hash": request_hash,
        "user_metadata": new.user_metadata,
    }
    try:
        with conn.begin_nested():
            row = conn.execute(insert(jobs).values(**values).returning(*jobs.c)).one()
    except IntegrityError:
        # A concurrent request with the same idempotency key won the race.
        assert new.idempotency_key is not None
        existing = _by_idempotency_key(conn, new.tenant_id, new.idempotency_key)
        if existing is None:
            raise
        return _replay(existing, request_hash), False
    # The version it continues from, kept where it outlives the version (a deleted version's
    # jobs keep no `parent_version_id`): what a job "like this one" can say it lacks.
    data: dict[str, Any] = {"status": JobStatus.VALIDATING_FILES}
    if new.parent_version_id:
        data["parent_version_id"] = new.parent_version_id
    add_event(conn, row.id, "Validating training file", data=data)
    return JobRecord.from_row(row), True


def _by_idempotency_key(conn: Connection, tenant_id: str, key: str) -> Any:
    return conn.execute(
        select(jobs).where(jobs.c.tenant_id == tenant_id, jobs.c.idempotency_key == key)
    ).one_or_none()


def _replay(row: Any, request_hash: str) -> JobRecord:
    if row.request_hash != request_hash:
        raise IdempotencyConflictError(
            "this Idempotency-Key was already used for a different request; "
            "use a new key for a new job"
        )
    return JobRecord.from_row(row)


def get_job(conn: Connection, tenant_id: str, job_id: str) -> JobRecord | None:
    row = conn.execute(
        select(jobs).where(jobs.c.id == job_id, jobs.c.tenant_id == tenant_id)
    ).one_or_none()
    return JobRecord.from_row(row) if row else None


def get_job_unscoped(conn: Connection, job_id: str) -> JobRecord | None:
    """For trainers and celery tasks, which act for whichever tenant owns the job."""
    row = conn.execute(select(jobs).where(jobs.c.id == job_id)).one_or_none()
    return JobRecord.from_row(row) if row else None


def job_parent_version_id(conn: Connection, job_id: str) -> str | None:
    """The id of the version a job continues from, as its row says now."""
    return conn.execute(select(jobs.c.parent_version_id).where(jobs.c.id == job_id)).scalar()


def list_jobs(
    conn: Connection,
    tenant_id: str,
    *,
    after: str | None,
    limit: int,
    metadata: dict[str, str] | None = None,
) -> tuple[list[JobRecord], bool]:
    """Newest first; `after` is the id of the last job of the previous page. With `metadata`,
    only the jobs whose metadata holds every one of its pairs; with `{}`, the jobs without."""
    filters = []
    if metadata is not None:
        filters.append(
            jobs.c.user_metadata.contains(metadata) if metadata else jobs.c.user_metadata.is_(None)
        )
    rows, more = newest_first(
        conn, jobs, scope=jobs.c.tenant_id == tenant_id, filters=filters, after=after, limit=limit
    )
    return [JobRecord.from_row(r) for r in rows], more


def add_checkpoint(
    conn: Connection, job_id: str, step: int, object_prefix: str, metrics: dict[str, Any] | None
) -> CheckpointRecord:
    """Record a checkpoint once its files are in the object store (idempotent per step)."""
    existing = conn.execute(
        select(checkpoints).where(checkpoints.c.job_id == job_id, checkpoints.c.step == step)
    ).one_or_none()
    if existing is not None:
        return CheckpointRecord.from_row(existing)
    row = conn.execute(
        insert(checkpoints)
        .values(
            id=new_id("checkpoint"),
            job_id=job_id,
            step=step,
            object_prefix=object_prefix,
            metrics=metrics,
        )
        .returning(*checkpoints.c)
    ).one()
    return CheckpointRecord.from_row(row)


def list_checkpoints(
    conn: Connection, job_id: str, *, after: str | None = None, limit: int = 100
) -> tuple[list[CheckpointRecord], bool]:
    """Newest step first; `after` is a checkpoint id from the previous page."""
    query = select(checkpoints).where(checkpoints.c.job_id == job_id)
    if after is not None:
        step = conn.execute(
            select(checkpoints.c.step).where(
                checkpoints.c.id == after, checkpoints.c.job_id == job_id
            )
        ).scalar()
        if step is None:
            raise LookupError(after)
        query = query.where(checkpoints.c.step < step)
    rows, more = trim(
        conn.execute(query.order_by(checkpoints.c.step.desc()).limit(limit + 1)).all(), limit
    )
    return [CheckpointRecord.from_row(r) for r in rows], more


def latest_checkpoint(conn: Connection, job_id: str) -> CheckpointRecord | None:
    found, _ = list_checkpoints(conn, job_id, limit=1)
    return found[0] if found else None


def list_succeeded_models(conn: Connection, tenant_id: str) -> list[JobRecord]:
    """Succeeded jobs of a tenant that produced a model, newest first."""
    rows = conn.execute(
        select(jobs)
        .where(
            jobs.c.tenant_id == tenant_id,
            jobs.c.status == JobStatus.SUCCEEDED,
            jobs.c.fine_tuned_model.is_not(None),
        )
        .order_by(jobs.c.finished_at.desc())
    ).all()
    return [JobRecord.from_row(r) for r in rows]


def stuck_in_validation(conn: Connection, *, older_than_seconds: float) -> list[str]:
    """Ids of jobs still in `validating_files` after this long (their task was lost)."""
    cutoff = func.now() - func.make_interval(0, 0, 0, 0, 0, 0, older_than_seconds)
    query = select(jobs.c.id).where(
        jobs.c.status == JobStatus.VALIDATING_FILES, jobs.c.created_at < cutoff
    )
    return list(conn.execute(query).scalars())


def unfinished_job_using_file(conn: Connection, file_id: str) -> str | None:
    """The id of an unfinished job that still needs this file (to train or evaluate on)."""
    return conn.execute(
        select(jobs.c.id)
        .where(
            (jobs.c.training_file_id == file_id) | (jobs.c.validation_file_id == file_id),
            jobs.c.status.in_(as_values(UNFINISHED)),
        )
        .limit(1)
    ).scalar()


def unfinished_job_continuing_from(conn: Connection, version_id: str) -> str | None:
    """The oldest unfinished job that starts from this adapter version, if any."""
    return conn.execute(
        select(jobs.c.id)
        .where(jobs.c.parent_version_id == version_id, jobs.c.status.in_(as_values(UNFINISHED)))
        .order_by(jobs.c.created_at)
        .limit(1)
    ).scalar()


def committed_models(conn: Connection, job_ids: list[str]) -> dict[str, str | None]:
    """For each of these jobs that exists: the model it committed (`name@version`), or None
    when it has not succeeded. Rebuild uses it to tell a committed version's manifest from
    one a crash left behind."""
    rows = conn.execute(
        select(jobs.c.id, jobs.c.status, jobs.c.fine_tuned_model).where(jobs.c.id.in_(job_ids))
    )
    return {r.id: r.fine_tuned_model if r.status == JobStatus.SUCCEEDED else None for r in rows}


def restore_parent_version(conn: Connection, job_id: str, version_id: str) -> None:
    """Relink a job to the version it continued from (rebuild), unless it already names one
    or that version was not restored."""
    conn.execute(
        update(jobs)
        .where(
            jobs.c.id == job_id,
            jobs.c.parent_version_id.is_(None),
            select(versions.c.id).where(versions.c.id == version_id).exists(),
        )
        .values(parent_version_id=version_id)
    )
