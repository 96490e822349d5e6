"""The adapter registry's request and response bodies (`/v1/adapters`), built from the
registry's records."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from control_plane.registry import (
    AdapterRecord,
    AdapterVersionRecord,
    AliasEventRecord,
    AliasRecord,
)


def _ts(value: datetime) -> int:
    return int(value.timestamp())


class AdapterFile(BaseModel):
    name: str
    size: int
    sha256: str


class AdapterPublic(BaseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    name: str
    base_model: str
    latest_version: int
    version_count: int
    created_at: int

    @classmethod
    def of(cls, a: AdapterRecord) -> AdapterPublic:
        return cls(
            id=a.id,
            name=a.name,
            base_model=a.base_model_name,
            latest_version=a.latest_version,
            version_count=a.version_count,
            created_at=_ts(a.created_at),
        )


class VersionPublic(BaseModel):
    id: str
    object: Literal["adapter.version"] = "adapter.version"
    adapter: str
    version: int
    model: str = Field(description="stable id `name@version`: the job's fine_tuned_model")
    base_model: str
    job_id: str | None
    parent: str | None = Field(description="`name@version` this version continued from")
    files: list[AdapterFile]
    metrics: dict[str, Any]
    aliases: list[str]
    created_at: int

    @classmethod
    def of(cls, v: AdapterVersionRecord) -> VersionPublic:
        return cls(
            id=v.id,
            adapter=v.adapter_name,
            version=v.number,
            model=v.model_id,
            base_model=v.base_model_name,
            job_id=v.job_id,
            parent=v.parent_ref,
            files=[AdapterFile(**f) for f in v.files],
            metrics=v.metrics,
            aliases=v.aliases,
            created_at=_ts(v.created_at),
        )


class LineagePublic(BaseModel):
    object: Literal["adapter.lineage"] = "adapter.lineage"
    id: str
    adapter: str
    version: int
    lineage: dict[str, Any]


class FileDownload(AdapterFile):
    url: str
    via: Literal["presigned", "api"] = Field(
        description="`api` URLs need the API key; presigned URLs must be fetched without it"
    )
    expires_in: int | None


class FileList(BaseModel):
    object: Literal["list"] = "list"
    adapter: str
    version: int
    data: list[FileDownload]


class VersionFromCheckpoint(BaseModel):
    """A new version made of weights an interactive (Tinker-compatible) session saved."""

    model_config = ConfigDict(extra="forbid")
    from_checkpoint: str = Field(
        min_length=10,
        max_length=1000,
        pattern=r"^tinker://",
        description="a `tinker://` path that save_weights_for_sampler or save_state returned",
    )


class AliasUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = Field(ge=1)


class AliasPublic(BaseModel):
    object: Literal["adapter.alias"] = "adapter.alias"
    adapter: str
    name: str
    version: int
    version_id: str
    updated_by: str | None
    updated_at: int

    @classmethod
    def of(cls, a: AliasRecord) -> AliasPublic:
        return cls(
            adapter=a.adapter_name,
            name=a.name,
            version=a.version,
            version_id=a.version_id,
            updated_by=a.updated_by,
            updated_at=_ts(a.updated_at),
        )


class AliasDeleted(BaseModel):
    object: Literal["adapter.alias"] = "adapter.alias"
    adapter: str
    name: str
    deleted: bool = True


class AliasEventPublic(BaseModel):
    id: int
    object: Literal["adapter.alias_event"] = "adapter.alias_event"
    adapter: str
    alias: str
    from_version: int | None
    to_version: int | None = Field(description="None when the alias was deleted")
    actor_key_id: str | None
    created_at: float

    @classmethod
    def of(cls, e: AliasEventRecord) -> AliasEventPublic:
        return cls(
            id=e.id,
            adapter=e.adapter_name,
            alias=e.alias,
            from_version=e.from_version,
            to_version=e.to_version,
            actor_key_id=e.actor_key_id,
            created_at=e.created_at.timestamp(),
        )


class VersionDeleted(BaseModel):
    id: str
    object: Literal["adapter.version"] = "adapter.version"
    adapter: str
    version: int
    deleted: bool = True
    objects_removed: bool


class ServingIndexPublic(BaseModel):
    object: Literal["adapter.index"] = "adapter.index"
    base_model: str
    alias: str
    etag: str
    data: list[VersionPublic]
