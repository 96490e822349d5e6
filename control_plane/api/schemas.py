"""Request and response schemas, OpenAI-shaped where OpenAI has the same thing."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from control_plane.api.method_schemas import Method, method_public, refuse_set_by_method
from control_plane.api.numbers import WholeNumber
from control_plane.job_status import JobStatus
from control_plane.records import (
    ApiKeyRecord,
    BaseModelRecord,
    CheckpointRecord,
    FileRecord,
    JobEventRecord,
    JobRecord,
)
from control_plane.serving import VLLM_MAX_LORA_RANKS

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _ts(value: datetime | None) -> int | None:
    return int(value.timestamp()) if value is not None else None


T = TypeVar("T", bound=BaseModel)


class Page(BaseModel, Generic[T]):
    """A list response (OpenAI's shape): `Page[JobPublic]` documents its items' schema."""

    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None


def page_of(
    data: Sequence[T], *, has_more: bool = False, cursor: Callable[[T], str] | None = None
) -> Page[T]:
    """The one way routes build a `Page`. For a paginated list, `cursor` gives an item's
    cursor (what `after` takes), reported for the first and last item; a whole list (no
    `cursor`) reports none."""
    items = list(data)
    first = cursor(items[0]) if cursor is not None and items else None
    last = cursor(items[-1]) if cursor is not None and items else None
    return Page[T](data=items, has_more=has_more, first_id=first, last_id=last)


class FilePublic(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str
    status_details: str | None = None
    sha256: str
    format: str | None
    examples: int | None
    tokens: int | None

    @classmethod
    def of(cls, f: FileRecord) -> FilePublic:
        return cls(
            id=f.id,
            bytes=f.bytes,
            created_at=_ts(f.created_at) or 0,
            filename=f.filename,
            purpose=f.purpose,
            status=f.status,
            status_details=f.status_details,
            sha256=f.sha256,
            format=f.format,
            examples=f.examples,
            tokens=f.tokens,
        )


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class ServingTargetBody(BaseModel):
    """Where the adapter is meant to be served; a job whose adapter it would refuse is refused
    at create (400 `unservable_adapter`) rather than after it trained."""

    model_config = ConfigDict(extra="forbid")
    engine: Literal["vllm"] = "vllm"
    max_lora_rank: int | None = Field(
        default=None, description="the pods' --max-lora-rank: one of " + str(VLLM_MAX_LORA_RANKS)
    )
    served_model: str | None = Field(
        default=None, min_length=1, max_length=200, description="the base the pods serve"
    )

    @field_validator("max_lora_rank")
    @classmethod
    def _vllm_rank(cls, value: int | None) -> int | None:
        if value is not None and value not in VLLM_MAX_LORA_RANKS:
            raise ValueError(f"vLLM's --max-lora-rank is one of {list(VLLM_MAX_LORA_RANKS)}")
        return value


MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=64)]
MetadataValue = Annotated[str, StringConstraints(max_length=512)]


# A job's place before the fair share: higher goes first, whatever the tenant.
Priority = Annotated[WholeNumber, Field(ge=-100, le=100)]


class JobPriority(BaseModel):
    """A job's new priority (`POST /v1/fine_tuning/jobs/{id}/priority`)."""

    model_config = ConfigDict(extra="forbid")

    priority: Priority


class JobCreate(BaseModel):
    """OpenAI's job-create body plus loraforge's own fields; unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200)
    training_file: str = Field(min_length=1, max_length=64)
    validation_file: str | None = Field(default=None, max_length=64)
    hyperparameters: dict[str, Any] | None = None
    method: Method | None = None
    suffix: str | None = Field(default=None, max_length=64)
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    # OpenAI's limits: 16 pairs, keys of 1-64 characters, values of at most 512.
    metadata: dict[MetadataKey, MetadataValue] | None = Field(default=None, max_length=16)
    integrations: list[Any] | None = None
    # loraforge's own.
    priority: Priority = 0
    # checked at create with the registry's own rule (`registry.validate_adapter_name`)
    adapter_name: str | None = Field(default=None, max_length=200)
    # `name`, `name@<version>` or `name@<alias>` of one of the caller's adapters on the same
    # base: its weights are the starting point and it becomes the new version's parent.
    continue_from: str | None = Field(default=None, min_length=1, max_length=300)
    max_attempts: int | None = Field(default=None, ge=1, le=20)
    serving_target: ServingTargetBody | None = None

    @field_validator("suffix")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and not NAME_PATTERN.match(value):
            raise ValueError(
                "use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        return value

    @field_validator("hyperparameters")
    @classmethod
    def _not_set_by_method(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return refuse_set_by_method(value)

    @field_validator("integrations")
    @classmethod
    def _no_integrations(cls, value: list[Any] | None) -> list[Any] | None:
        if value:
            raise ValueError("integrations are not supported by loraforge")
        return value

    def merged_hyperparameters(self) -> dict[str, Any]:
        """Top-level `hyperparameters`, then the method's own (`method.supervised` or
        `method.dpo`, whose `beta` is `dpo_beta`), without 'auto'; `method` is its type."""
        method = self.method or Method()
        raw = {**(self.hyperparameters or {}), **method.own_hyperparameters()}
        merged = {k: v for k, v in raw.items() if v != "auto"}
        merged["method"] = method.type
        if self.seed is not None:
            merged["seed"] = self.seed
        return merged


# A job in these states shows its last error: why it failed, why its last attempt ended (queued
# again), or what its worker reported before it was cancelled.
_SHOWS_ERROR = frozenset({JobStatus.FAILED, JobStatus.QUEUED, JobStatus.CANCELLED})


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class JobPublic(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    finished_at: int | None
    error: JobError | None
    fine_tuned_model: str | None
    hyperparameters: dict[str, Any]
    model: str
    organization_id: str
    result_files: list[str] = []
    seed: int
    status: str
    trained_tokens: int | None
    training_file: str
    validation_file: str | None
    estimated_finish: int | None = None
    integrations: list[Any] | None = None
    metadata: dict[str, str] | None = None
    method: dict[str, Any]
    # loraforge's own.
    priority: int
    attempt: int
    max_attempts: int
    progress: float | None
    eta_seconds: float | None
    adapter_name: str | None
    suffix: str | None
    continue_from: str | None = None

    @classmethod
    def of(cls, job: JobRecord, base_name: str, parent_ref: str | None = None) -> JobPublic:
        hp = job.hyperparameters
        error = None
        if job.error_code and job.status in _SHOWS_ERROR:
            error = JobError(
                code=job.error_code, message=job.error_message or "", param=job.error_param
            )
        estimated = None
        if job.status == JobStatus.RUNNING and job.eta_seconds is not None:
            estimated = int(datetime.now().timestamp() + job.eta_seconds)
        return cls(
            id=job.id,
            created_at=_ts(job.created_at) or 0,
            finished_at=_ts(job.finished_at),
            error=error,
            fine_tuned_model=job.fine_tuned_model,
            hyperparameters=hp,
            model=base_name,
            organization_id=job.tenant_id,
            seed=int(hp.get("seed", 0)),
            status=job.status,
            trained_tokens=job.trained_tokens,
            training_file=job.training_file_id,
            validation_file=job.validation_file_id,
            estimated_finish=estimated,
            method=method_public(hp),
            priority=job.priority,
            attempt=job.attempt,
            max_attempts=job.max_attempts,
            progress=job.progress,
            eta_seconds=job.eta_seconds,
            adapter_name=job.adapter_name,
            suffix=job.suffix,
            continue_from=parent_ref,
            metadata=job.user_metadata,
        )


class EventPublic(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: str
    message: str
    type: str
    data: dict[str, Any] | None

    @classmethod
    def of(cls, e: JobEventRecord) -> EventPublic:
        return cls(
            id=f"ftevent-{e.id}",
            created_at=_ts(e.created_at) or 0,
            level=e.level,
            message=e.message,
            type=e.type,
            data=e.data,
        )


class CheckpointPublic(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: dict[str, Any]
    step_number: int

    @classmethod
    def of(cls, c: CheckpointRecord) -> CheckpointPublic:
        return cls(
            id=c.id,
            created_at=_ts(c.created_at) or 0,
            fine_tuned_model_checkpoint=f"{c.job_id}:ckpt-step-{c.step}",
            fine_tuning_job_id=c.job_id,
            metrics=c.metrics or {},
            step_number=c.step,
        )


class ModelPublic(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    # loraforge's own: what kind of model, and for adapters the base they apply to.
    kind: Literal["base", "adapter"]
    base_model: str | None = None


class BaseModelCreate(BaseModel):
    """A base to import: `name` and `source` (a model directory or `.gguf` file where the workers
    run, an `s3://bucket/prefix` URI, or a hub id), maybe `revision`. The server fetches it,
    refuses what is not a supported causal LM, dequantizes a GGUF file, and stores the
    checkpoint; the base is `registering` until then, `ready` or `failed` (with the reason)
    after. With `sha256` (and `source_kind`), the record of a checkpoint already stored under
    `base-models/<sha256>/` instead, `ready` at once."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")
    source: str = Field(min_length=1, max_length=2000)
    source_kind: Literal["gguf", "dir", "hub", "object"] | None = None
    revision: str | None = Field(default=None, max_length=200)
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    architecture: str | None = Field(default=None, max_length=100)
    parameter_count: int | None = Field(default=None, ge=1, le=2**63 - 1)  # a bigint column
    has_chat_template: bool | None = None

    @model_validator(mode="after")
    def _imported_or_declared(self) -> BaseModelCreate:
        if self.sha256 is None:
            given = [
                field
                for field in ("architecture", "parameter_count", "has_chat_template")
                if getattr(self, field) is not None
            ]
            if given:
                raise ValueError(
                    f"{', '.join(given)}: read from the checkpoint when the server imports it; "
                    "leave them out, or give sha256 to record a checkpoint already stored"
                )
        elif self.source_kind is None:
            raise ValueError("source_kind: required with sha256 (one of gguf, dir, hub, object)")
        return self


IMPORT_FAILED_FOR_TENANTS = (
    "the import failed; a platform operator can see why and register the base again"
)


class BaseModelPublic(BaseModel):
    id: str
    object: Literal["base_model"] = "base_model"
    name: str
    source: str | None = Field(
        description="where the checkpoint was read from on the server: shown to the keys of "
        "the platform operators' tenants only (`platform_operator_tenants`), else null"
    )
    source_kind: str
    revision: str | None
    sha256: str | None
    architecture: str | None
    parameter_count: int | None
    has_chat_template: bool
    status: str
    # why the import failed (status `failed`), in words a person can act on; the server-side
    # details only to platform operators
    error: str | None = None
    created_at: int

    @classmethod
    def of(cls, b: BaseModelRecord, *, platform_operator: bool) -> BaseModelPublic:
        """The base as a key of a platform operator's tenant sees it (`platform_operator`), or
        as other tenants do: without its server-side source or the import's error (which names
        paths on the server)."""
        error = b.error_message
        if error is not None and not platform_operator:
            error = IMPORT_FAILED_FOR_TENANTS
        return cls(
            id=b.id,
            name=b.name,
            source=b.source if platform_operator else None,
            source_kind=b.source_kind,
            revision=b.revision,
            sha256=b.sha256,
            architecture=b.architecture,
            parameter_count=b.parameter_count,
            has_chat_template=b.has_chat_template,
            status=b.status,
            error=error,
            created_at=_ts(b.created_at) or 0,
        )


class ApiKeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(default="default", min_length=1, max_length=128)
    role: Literal["admin", "member", "reader"] = "member"


class ApiKeyPublic(BaseModel):
    id: str
    object: Literal["api_key"] = "api_key"
    name: str
    prefix: str
    role: str
    created_at: int
    revoked: bool
    key: str | None = None  # the plaintext, only in the response that created it

    @classmethod
    def of(cls, record: ApiKeyRecord, plaintext: str | None = None) -> ApiKeyPublic:
        return cls(
            id=record.id,
            name=record.name,
            prefix=record.prefix,
            role=record.role,
            created_at=int(record.created_at.timestamp()),
            revoked=record.revoked_at is not None,
            key=plaintext,
        )
