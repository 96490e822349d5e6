"""A job's files, checked: at create (`check_job_file`: they exist, are for fine-tuning, and hold
what the job's method trains on), and again before the job is queued (`run_validation`: every
line, the job then `queued` or `failed` with the line and reason). `run_validation` is run by a
celery task (`loraforge.tasks`); nothing here knows about celery.

Supervised training takes chat, prompt/completion and text files; DPO takes preference files
only, and nothing else takes those.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from sqlalchemy import Connection

from control_plane import datasets
from control_plane import files as file_repo
from control_plane.hyperparameters import Hyperparameters
from control_plane.job_status import JobStatus
from control_plane.jobs import get_job_unscoped
from control_plane.queue import JobStateError
from control_plane.records import FileRecord
from control_plane.services import Services
from control_plane.storage import ObjectStoreError
from control_plane.sweeps import SWEEP_KEY

_PREFERENCE_LINE = (
    '{"input": {"messages": [...]}, "preferred_output": [...], "non_preferred_output": [...]}'
)


class JobFileError(Exception):
    """Why a job cannot use a file: `code` for machines, `message` (what to change), `param`."""

    def __init__(self, code: str, message: str, param: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


def check_job_file(conn: Connection, tenant_id: str, file_id: str, param: str, method: str) -> None:
    """Refuse a file that a new job of this method (`Hyperparameters.method`) names as `param`
    and could not train on; a file whose format is not recorded is checked by validation."""
    record = file_repo.get_file(conn, tenant_id, file_id)
    if record is None:
        raise JobFileError("file_not_found", f"{param}: no file with id {file_id!r}", param)
    if record.purpose != "fine-tune":
        raise JobFileError(
            "invalid_file_purpose",
            f"{param}: file {file_id} was not uploaded with purpose 'fine-tune'",
            param,
        )
    if (wrong := wrong_format(param, record, method, record.format)) is not None:
        raise JobFileError("invalid_file_format", wrong, param)


def check_eval_set(hp: Hyperparameters, validation_file: str | None) -> None:
    """Refuse early stopping (by patience or by the sweep's median) with nothing to evaluate:
    it watches the eval loss."""
    for name in ("early_stopping_patience", "sweep_median_stopping"):
        if getattr(hp, name) and validation_file is None and not hp.eval_fraction:
            raise JobFileError(
                "invalid_hyperparameters",
                f"hyperparameters: {name} needs an eval set to watch: give a validation_file, "
                "or set eval_fraction to hold some training examples out",
                f"hyperparameters.{name}",
            )


def check_in_a_sweep(hp: Hyperparameters, metadata: dict[str, str] | None) -> None:
    """Refuse the sweep's median stopping for a job of no sweep: it has nothing to compare."""
    if hp.sweep_median_stopping and SWEEP_KEY not in (metadata or {}):
        raise JobFileError(
            "invalid_hyperparameters",
            "hyperparameters: sweep_median_stopping compares the job with the other jobs of its "
            "sweep: create it with POST /v1/fine_tuning/sweeps, or give it metadata "
            f"{SWEEP_KEY}=<name> as its sweep's jobs have",
            "hyperparameters.sweep_median_stopping",
        )


def wrong_format(
    param: str, record: FileRecord, method: str, dataset_format: str | None
) -> str | None:
    """Why a job of this method cannot train on a file of this format; None if it can (or the
    format is not known)."""
    if dataset_format is None or (dataset_format == "preference") == (method == "dpo"):
        return None
    if method == "dpo":
        why = (
            f"is in the {dataset_format!r} format; a DPO job (method type 'dpo') trains on "
            f"preference pairs: upload a file of {_PREFERENCE_LINE} lines"
        )
    else:
        why = (
            "holds preference pairs, which only DPO trains on: pass "
            'method={"type": "dpo"} to train on them, or upload a chat, prompt/completion or '
            "text file for supervised training"
        )
    return f"{param}: file {record.id} ({record.filename}) {why}"


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
    method = job.hyperparameters.get("method", "supervised")
    max_example_tokens = services.settings.max_example_tokens
    failure: tuple[str, str, str] | None = None
    for param, record in records:
        if record is None:
            failure = ("file_not_found", f"{param} no longer exists", param)
            break
        try:
            stats = _validate_file(services, record, max_example_tokens)
        except datasets.DatasetError as exc:
            failure = (exc.code, f"{param} {record.id} ({record.filename}): {exc.message}", param)
            break
        if (wrong := wrong_format(param, record, method, stats.format)) is not None:
            failure = ("invalid_file_format", wrong, param)
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
