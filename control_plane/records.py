"""Frozen records: what rows become before they leave the storage layer."""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, Self

from control_plane.job_status import JobStatus


class _FromRow:
    @classmethod
    def from_row(cls, row: Any) -> Self:
        """Build from an ORM object or a result row carrying at least this record's fields."""
        mapping = row._mapping if hasattr(row, "_mapping") else None
        values = {}
        for field in fields(cls):  # type: ignore[arg-type]
            values[field.name] = (
                mapping[field.name] if mapping is not None else getattr(row, field.name)
            )
        return cls(**values)


@dataclass(frozen=True)
class TenantRecord(_FromRow):
    id: str
    name: str
    max_running_jobs: int | None
    created_at: datetime
    max_priority: int | None
    max_interactive_models: int | None
    max_checkpoint_bytes: int | None


@dataclass(frozen=True)
class ApiKeyRecord(_FromRow):
    id: str
    tenant_id: str
    name: str
    prefix: str
    role: str
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True)
class WebhookEndpointRecord(_FromRow):
    id: str
    tenant_id: str
    url: str
    secret: str
    event_types: list[str] | None
    description: str
    created_at: datetime
    disabled_at: datetime | None
    previous_secret_until: datetime | None


@dataclass(frozen=True)
class WebhookDeliveryRecord(_FromRow):
    id: str
    endpoint_id: str
    event_id: str
    event_type: str
    payload: dict[str, Any]
    status: str
    attempts: int
    next_attempt_at: datetime
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None


@dataclass(frozen=True)
class FileRecord(_FromRow):
    id: str
    tenant_id: str
    filename: str
    purpose: str
    bytes: int
    sha256: str
    object_key: str
    status: str
    format: str | None
    examples: int | None
    tokens: int | None
    status_details: str | None
    created_at: datetime


@dataclass(frozen=True)
class BaseModelRecord(_FromRow):
    id: str
    name: str
    source: str
    source_kind: str
    revision: str | None
    sha256: str | None
    architecture: str | None
    parameter_count: int | None
    has_chat_template: bool
    status: str
    created_at: datetime
    error_message: str | None = None
    import_requested_at: datetime | None = None


@dataclass(frozen=True)
class JobRecord(_FromRow):
    id: str
    tenant_id: str
    status: JobStatus
    base_model_id: str
    training_file_id: str
    validation_file_id: str | None
    hyperparameters: dict[str, Any]
    suffix: str | None
    adapter_name: str | None
    fine_tuned_model: str | None
    priority: int
    attempt: int
    max_attempts: int
    interruptions: int
    run_after: datetime
    lease_owner: str | None
    lease_expires_at: datetime | None
    cancel_requested: bool
    pause_requested: bool
    idempotency_key: str | None
    error_code: str | None
    error_message: str | None
    error_param: str | None
    trained_tokens: int | None
    progress: float | None
    eta_seconds: float | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    parent_version_id: str | None
    user_metadata: dict[str, str] | None

    def __post_init__(self) -> None:
        # The column holds the plain string; the record holds the enum member.
        object.__setattr__(self, "status", JobStatus(self.status))


@dataclass(frozen=True)
class JobEventRecord(_FromRow):
    id: int
    job_id: str
    created_at: datetime
    level: str
    type: str
    message: str
    data: dict[str, Any] | None


@dataclass(frozen=True)
class CheckpointRecord(_FromRow):
    id: str
    job_id: str
    step: int
    object_prefix: str
    metrics: dict[str, Any] | None
    created_at: datetime
