"""Lineage of an adapter version: everything needed to trace it back to its inputs."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from control_plane.hyperparameters import Hyperparameters
from control_plane.records import BaseModelRecord, FileRecord, JobRecord
from control_plane.registry import AdapterVersionRecord
from workers.training.recipe import TrainResult

LIBRARIES = ("torch", "transformers", "peft", "loraforge")


def library_versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "unknown"
    return found


def _file(record: FileRecord, role: str) -> dict[str, Any]:
    return {
        "role": role,
        "id": record.id,
        "filename": record.filename,
        "sha256": record.sha256,
        "bytes": record.bytes,
        "examples": record.examples,
        "tokens": record.tokens,
        "format": record.format,
    }


def build_lineage(
    job: JobRecord,
    base: BaseModelRecord,
    hp: Hyperparameters,
    train_file: FileRecord,
    eval_file: FileRecord | None,
    result: TrainResult,
    parent: AdapterVersionRecord | None = None,
) -> dict[str, Any]:
    files = [_file(train_file, "training")]
    if eval_file is not None:
        files.append(_file(eval_file, "validation"))
    return {
        "job_id": job.id,
        "tenant_id": job.tenant_id,
        "attempt": job.attempt,
        "base_model": {
            "id": base.id,
            "name": base.name,
            "revision": base.revision,
            "sha256": base.sha256 or result.base_sha256,
            "architecture": base.architecture,
        },
        "datasets": files,
        "hyperparameters": hp.model_dump(mode="json"),
        "libraries": library_versions(),
        "parent_version": None
        if parent is None
        else {
            "id": parent.id,
            "model_id": parent.model_id,
            "job_id": parent.job_id,
            "files": parent.files,
        },
        "metrics": {
            "final_train_loss": result.final_train_loss,
            "final_eval_loss": result.final_eval_loss,
            "trained_tokens": result.trained_tokens,
            "steps": result.global_step,
            "precision": result.precision,
            **(
                {
                    "weights_from_step": result.weights_step or result.global_step,
                    "early_stopped": result.early_stopped,
                    "stopped_by": result.stopped_by,
                }
                if hp.early_stopping_patience or hp.sweep_median_stopping
                else {}
            ),
        },
    }
