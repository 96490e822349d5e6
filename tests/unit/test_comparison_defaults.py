"""The comparison of jobs reads a hyperparameter a job was stored without as its default: a job
submitted before the field existed trained with it, so the two do not differ."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from control_plane.dashboard.comparison import differences
from control_plane.hyperparameters import Hyperparameters
from control_plane.records import JobRecord


def job(job_id: str, hyperparameters: dict[str, Any]) -> JobRecord:
    now = datetime.now(UTC)
    return JobRecord(
        id=job_id,
        tenant_id="t",
        status="succeeded",  # type: ignore[arg-type]  (the record takes the column's text)
        base_model_id="b",
        training_file_id="f",
        validation_file_id=None,
        hyperparameters=hyperparameters,
        suffix=None,
        adapter_name=None,
        fine_tuned_model=None,
        priority=0,
        attempt=1,
        max_attempts=3,
        interruptions=0,
        run_after=now,
        lease_owner=None,
        lease_expires_at=None,
        cancel_requested=False,
        pause_requested=False,
        idempotency_key=None,
        error_code=None,
        error_message=None,
        error_param=None,
        trained_tokens=None,
        progress=None,
        eta_seconds=None,
        created_at=now,
        started_at=None,
        finished_at=None,
        parent_version_id=None,
        user_metadata=None,
    )


def test_a_job_stored_before_a_field_existed_does_not_differ_from_one_with_its_default():
    today = Hyperparameters().model_dump(mode="json")
    added = ("early_stopping_patience", "early_stopping_threshold", "method", "dpo_beta")
    older = {k: v for k, v in today.items() if k not in added}
    same = differences([job("old", older), job("new", today)])
    assert same.columns == []
    assert ("early_stopping_patience", "0") in same.common
    stopping = {**today, "eval_every_steps": 5, "early_stopping_patience": 2}
    apart = differences([job("old", older), job("new", stopping)])
    assert apart.columns == ["eval_every_steps", "early_stopping_patience"]
