"""The tenants' bodies (`/v1/tenants`, the platform operators' own API), built from
`control_plane.tenants`' overviews."""

from __future__ import annotations

from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from control_plane.api.numbers import WholeNumber
from control_plane.api.schemas import NAME_PATTERN, ApiKeyPublic
from control_plane.tenants import MAX_CHECKPOINT_BYTES, TenantOverview

TenantName = Annotated[
    str,
    Field(
        pattern=NAME_PATTERN.pattern,
        description="letters, digits, `.`, `_` and `-`, starting with a letter or digit; at "
        "most 128 characters",
    ),
]
RunningLimit = Annotated[
    WholeNumber,
    Field(ge=0, le=10_000, description="jobs the tenant may run at once; 0 holds its queue"),
]
PriorityCap = Annotated[
    WholeNumber,
    Field(ge=-100, le=100, description="the highest priority the tenant's jobs may ask for"),
]
InteractiveModelsCap = Annotated[
    WholeNumber,
    Field(
        ge=1,
        le=10_000,
        description="interactive training models (the Tinker-compatible API) the tenant may "
        "hold loaded at once",
    ),
]
CheckpointBytesCap = Annotated[
    WholeNumber,
    Field(
        ge=1,
        le=MAX_CHECKPOINT_BYTES,
        description="bytes the tenant's interactive checkpoints may hold before its next save "
        "is refused",
    ),
]


class TenantCreate(BaseModel):
    """A new tenant, its limits (null: the platform's defaults) and its first admin key."""

    model_config = ConfigDict(extra="forbid")

    name: TenantName
    max_running_jobs: RunningLimit | None = None
    max_priority: PriorityCap | None = None
    max_interactive_models: InteractiveModelsCap | None = None
    max_checkpoint_bytes: CheckpointBytesCap | None = None
    admin_key_name: str = Field(default="admin", min_length=1, max_length=128)


class TenantLimits(BaseModel):
    """The limits to change (a merge patch): a field left out stays as it is; null returns it
    to the platform's default (`LORAFORGE_MAX_RUNNING_JOBS_PER_TENANT`,
    `LORAFORGE_MAX_PRIORITY_PER_TENANT`, `LORAFORGE_MAX_INTERACTIVE_MODELS_PER_TENANT`,
    `LORAFORGE_MAX_CHECKPOINT_BYTES_PER_TENANT`)."""

    model_config = ConfigDict(extra="forbid")

    max_running_jobs: RunningLimit | None = None
    max_priority: PriorityCap | None = None
    max_interactive_models: InteractiveModelsCap | None = None
    max_checkpoint_bytes: CheckpointBytesCap | None = None

    @model_validator(mode="after")
    def _some(self) -> Self:
        if not self.model_fields_set:
            raise ValueError(
                "nothing to change: give max_running_jobs, max_priority, max_interactive_models "
                "and/or max_checkpoint_bytes (a number, or null for the platform's default)"
            )
        return self


class TenantJobs(BaseModel):
    """The tenant's jobs by status, from `queued` on (jobs still validating are not counted)."""

    queued: int
    running: int = Field(description="holding a lease: running or cancelling")
    cancelling: int
    succeeded: int
    failed: int
    cancelled: int


class TenantPublic(BaseModel):
    id: str
    object: Literal["tenant"] = "tenant"
    name: str
    created_at: int
    max_running_jobs: int | None = Field(description="its own limit; null: the platform's default")
    max_priority: int | None = Field(description="its own cap; null: the platform's default")
    max_interactive_models: int | None = Field(
        description="its own cap on loaded training models; null: the platform's default"
    )
    max_checkpoint_bytes: int | None = Field(
        description="its own cap on its checkpoints' bytes; null: the platform's default"
    )
    effective_max_running_jobs: int = Field(description="the limit its claims are held to")
    effective_max_priority: int | None = Field(
        description="the cap its jobs are held to; null: none"
    )
    effective_max_interactive_models: int = Field(
        description="the loaded training models it may hold"
    )
    effective_max_checkpoint_bytes: int | None = Field(
        description="the bytes its checkpoints may hold; null: no cap"
    )
    jobs: TenantJobs
    last_served_at: int | None = Field(description="when the queue last started one of its jobs")
    live_api_keys: int

    @classmethod
    def of(
        cls,
        o: TenantOverview,
        default_running: int,
        default_priority: int | None,
        default_interactive: int,
        default_checkpoint_bytes: int | None,
    ) -> Self:
        t = o.tenant
        return cls(
            id=t.id,
            name=t.name,
            created_at=int(t.created_at.timestamp()),
            max_running_jobs=t.max_running_jobs,
            max_priority=t.max_priority,
            max_interactive_models=t.max_interactive_models,
            max_checkpoint_bytes=t.max_checkpoint_bytes,
            effective_max_running_jobs=(
                default_running if t.max_running_jobs is None else t.max_running_jobs
            ),
            effective_max_priority=default_priority if t.max_priority is None else t.max_priority,
            effective_max_interactive_models=(
                default_interactive
                if t.max_interactive_models is None
                else t.max_interactive_models
            ),
            effective_max_checkpoint_bytes=(
                default_checkpoint_bytes
                if t.max_checkpoint_bytes is None
                else t.max_checkpoint_bytes
            ),
            jobs=TenantJobs(
                queued=o.queued,
                running=o.running,
                cancelling=o.cancelling,
                succeeded=o.succeeded,
                failed=o.failed,
                cancelled=o.cancelled,
            ),
            last_served_at=int(o.last_served_at.timestamp()) if o.last_served_at else None,
            live_api_keys=o.live_keys,
        )


class TenantCreatedPublic(TenantPublic):
    admin_key: ApiKeyPublic = Field(description="its first key, the plaintext shown only here")
