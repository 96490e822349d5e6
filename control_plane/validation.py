"""Dataset validation before a job is queued: the job becomes `queued`, or `failed` with the
line and reason. Run by a celery task (`loraforge.tasks`); nothing here knows about celery."""

from __future__ import annotations

import tempfile
from pathlib import Path

from control_plane import datasets
from control_plane import files as file_repo
from control_plane.job_status import JobStatus
from control_plane.jobs import get_job_unscoped
from control_plane.queue import JobStateError
from control_plane.records import FileRecord
from control_plane.services import Services
from control_plane.storage import ObjectStoreError


def run_validation(services: Services, job_id: str) -> str:
    """Validate a job's files; the job becomes `queued`, or `failed` with line and reason.

    Returns the job's new status, or "skipped" when the job was not (or no longer) validating.
    """
    with services.engine.connect() as conn:
        job = get_job_unscoped(conn, job_id)
        if job is None or job.status != JobStatus.VALIDATING_FILES:
            return "skipped"
        wanted = [("training_file", job.training_file_id)]
        if job.validation_file_id:
            wanted.append(("validation_file", job.validation_file_id))
        records = [(param, file_repo.get_file_unscoped(conn, fid)) for param, fid in wanted]
    max_example_tokens = services.settings.max_example_tokens
    failure: tuple[str, str, str] | None = None
    for param, record in records:
        if record is None:
            failure = ("file_not_found", f"{param} no longer exists", param)
            break
        try:
            _validate_file(services, record, max_example_tokens)
        except datasets.DatasetError as exc:
            failure = (exc.code, f"{param} {record.id} ({record.filename}): {exc.message}", param)
            break
    if failure is not None:
        code, message, param = failure
        try:
            services.queue.mark_validation_failed(job_id, code=code, message=message, param=param)
        except JobStateError:
            return "skipped"
        return JobStatus.FAILED
    try:
        services.queue.mark_queued(job_id)
    except JobStateError:
        return "skipped"
    return JobStatus.QUEUED


def _validate_file(
    services: Services,
    record: FileRecord,
    max_example_tokens: int,
) -> datasets.DatasetStats:
    with tempfile.TemporaryDirectory(prefix="loraforge-validate-") as tmp:
        local = Path(tmp) / "data.jsonl"
        try:
            services.store.download_to(record.object_key, local, expected_sha256=record.sha256)
        except ObjectStoreError as exc:
            raise datasets.DatasetError("file_unreadable", str(exc)) from exc
        with local.open("rb") as fh:
            return datasets.validate_jsonl(
                fh,
                max_bytes=services.settings.max_upload_bytes,
                max_example_tokens=max_example_tokens,
            )
