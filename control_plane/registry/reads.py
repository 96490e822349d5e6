"""Registry rows as records and the queries that read them: adapters, versions, parents
of continued jobs, and the serving index."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, text

from control_plane.records import _FromRow
from control_plane.registry.names import (
    LATEST,
    MAX_VERSION,
    AdapterNotFoundError,
    AdapterShapeMismatchError,
    AliasNotFoundError,
    BaseModelMismatchError,
    BaseModelNotFoundError,
    VersionNotFoundError,
    is_number,
    model_id,
    parse_ref,
    validate_adapter_name,
    validate_alias_name,
)

# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class AdapterRecord(_FromRow):
    id: str
    tenant_id: str
    name: str
    base_model_id: str
    base_model_name: str
    latest_version: int
    version_count: int
    created_at: datetime


@dataclass(frozen=True)
class AdapterVersionRecord(_FromRow):
    id: str
    adapter_id: str
    tenant_id: str
    adapter_name: str
    base_model_id: str
    base_model_name: str
    number: int
    job_id: str | None
    parent_version_id: str | None
    parent_ref: str | None
    files: list[dict[str, Any]]
    lineage: dict[str, Any]
    metrics: dict[str, Any]
    object_prefix: str
    aliases: list[str]
    created_at: datetime

    @property
    def model_id(self) -> str:
        return model_id(self.adapter_name, self.number)

    def file(self, name: str) -> dict[str, Any] | None:
        return next((f for f in self.files if f["name"] == name), None)


@dataclass(frozen=True)
class AliasRecord(_FromRow):
    id: str
    adapter_name: str
    name: str
    version: int
    version_id: str
    updated_by: str | None
    updated_at: datetime


@dataclass(frozen=True)
class AliasEventRecord(_FromRow):
    id: int
    adapter_name: str
    alias: str
    from_version: int | None
    to_version: int | None
    actor_key_id: str | None
    created_at: datetime


@dataclass(frozen=True)
class PublishedVersion:
    """What a publish returns; `created` is False when the job had already published it."""

    version: AdapterVersionRecord
    created: bool


@dataclass(frozen=True)
class ServingIndex:
    base_model: str
    alias: str
    versions: list[AdapterVersionRecord]
    etag: str


# --------------------------------------------------------------------------- reads

_ADAPTERS = """
    SELECT a.id, a.tenant_id, a.name, a.base_model_id, b.name AS base_model_name, a.created_at,
           max(v.number) AS latest_version, count(v.id) AS version_count
    FROM adapters a
    JOIN base_models b ON b.id = a.base_model_id
    JOIN adapter_versions v ON v.adapter_id = a.id
    WHERE a.tenant_id = :tenant {where}
    GROUP BY a.id, b.name
    ORDER BY a.name
"""

_VERSIONS = """
    SELECT v.id, v.adapter_id, a.tenant_id, a.name AS adapter_name, a.base_model_id,
           b.name AS base_model_name, v.number, v.job_id, v.parent_version_id,
           pa.name || '@' || pv.number AS parent_ref, v.files, v.lineage, v.metrics,
           v.object_prefix, v.created_at,
           ARRAY(SELECT al.name FROM adapter_aliases al WHERE al.version_id = v.id
                 ORDER BY al.name) AS aliases
    FROM adapter_versions v
    JOIN adapters a ON a.id = v.adapter_id
    JOIN base_models b ON b.id = a.base_model_id
    LEFT JOIN adapter_versions pv ON pv.id = v.parent_version_id
    LEFT JOIN adapters pa ON pa.id = pv.adapter_id
"""


def query_versions(conn: Connection, where: str, **params: Any) -> list[AdapterVersionRecord]:
    rows = conn.execute(text(f"{_VERSIONS} WHERE {where}"), params).all()
    return [AdapterVersionRecord.from_row(r) for r in rows]


def list_adapters(
    conn: Connection, tenant_id: str, *, after: str | None = None, limit: int = 100
) -> tuple[list[AdapterRecord], bool]:
    """The tenant's adapters that have at least one version, by name; `after` is a name."""
    where = "AND a.name > :after" if after is not None else ""
    rows = conn.execute(
        text(_ADAPTERS.format(where=where) + " LIMIT :limit"),
        {"tenant": tenant_id, "after": after, "limit": limit + 1},
    ).all()
    return [AdapterRecord.from_row(r) for r in rows[:limit]], len(rows) > limit


def get_adapter(conn: Connection, tenant_id: str, name: str) -> AdapterRecord:
    validate_adapter_name(name)
    row = conn.execute(
        text(_ADAPTERS.format(where="AND a.name = :name")), {"tenant": tenant_id, "name": name}
    ).one_or_none()
    if row is None:
        raise AdapterNotFoundError(f"no adapter named {name!r}")
    return AdapterRecord.from_row(row)


def list_versions(
    conn: Connection, tenant_id: str, name: str, *, before: int | None = None, limit: int = 100
) -> tuple[list[AdapterVersionRecord], bool]:
    """Newest first; `before` is the number of the last version of the previous page."""
    get_adapter(conn, tenant_id, name)
    found = query_versions(
        conn,
        "a.tenant_id = :tenant AND a.name = :name AND v.number < :before "
        "ORDER BY v.number DESC LIMIT :limit",
        tenant=tenant_id,
        name=name,
        before=before if before is not None else MAX_VERSION,
        limit=limit + 1,
    )
    return found[:limit], len(found) > limit


def resolve_version(
    conn: Connection, tenant_id: str, name: str, ref: str | int
) -> AdapterVersionRecord:
    """A version of the tenant's adapter by number, alias, or `latest`."""
    validate_adapter_name(name)
    ref = str(ref)
    scope = "a.tenant_id = :tenant AND a.name = :name"
    if is_number(ref):
        if int(ref) > MAX_VERSION:
            raise VersionNotFoundError(f"adapter {name!r} has no version {ref}")
        found = query_versions(
            conn, f"{scope} AND v.number = :n", tenant=tenant_id, name=name, n=int(ref)
        )
    elif ref == LATEST:
        found = query_versions(
            conn, f"{scope} ORDER BY v.number DESC LIMIT 1", tenant=tenant_id, name=name
        )
    else:
        validate_alias_name(ref)
        found = query_versions(
            conn,
            f"{scope} AND v.id = (SELECT al.version_id FROM adapter_aliases al "
            "WHERE al.adapter_id = a.id AND al.name = :alias)",
            tenant=tenant_id,
            name=name,
            alias=ref,
        )
    if found:
        return found[0]
    get_adapter(conn, tenant_id, name)  # raises AdapterNotFoundError when that is the reason
    if is_number(ref) or ref == LATEST:
        raise VersionNotFoundError(f"adapter {name!r} has no version {ref}")
    raise AliasNotFoundError(f"adapter {name!r} has no alias {ref!r}")


def get_version_by_id(conn: Connection, version_id: str) -> AdapterVersionRecord | None:
    """Unscoped, for trainers and celery tasks acting for whichever tenant owns it."""
    found = query_versions(conn, "v.id = :id", id=version_id)
    return found[0] if found else None


def resolve_parent(
    conn: Connection, tenant_id: str, ref: str, *, base_model_id: str | None = None
) -> AdapterVersionRecord:
    """The version a new job continues from (`name@version|alias`, or `name` for the latest).

    With `base_model_id`, refuses a version trained on another base (its weights would not
    fit).
    """
    name, version = parse_ref(ref)
    parent = resolve_version(conn, tenant_id, name, version)
    if base_model_id is not None and parent.base_model_id != base_model_id:
        raise BaseModelMismatchError(
            f"{parent.model_id} was trained on base model {parent.base_model_name}, "
            "not on this job's base model",
            param="continue_from",
        )
    return parent


# LoRA settings that fix the adapter's shape: a job continuing from a version inherits them.
ADAPTER_SHAPE = ("lora_rank", "lora_alpha", "target_modules", "use_dora", "use_rslora")


def continued_hyperparameters(
    parent: AdapterVersionRecord, requested: dict[str, Any]
) -> dict[str, Any]:
    """`requested` plus the parent's adapter-shape settings it leaves out; a requested value
    that differs from the parent's is refused (the parent's weights would not fit)."""
    inherited = parent.lineage.get("hyperparameters") or {}
    merged = dict(requested)
    for key in ADAPTER_SHAPE:
        if key not in inherited:
            continue
        if key in requested and requested[key] != inherited[key]:
            raise AdapterShapeMismatchError(
                f"{parent.model_id} was trained with {key}={inherited[key]!r}; a job continuing "
                f"from it must keep that value (leave {key} out to inherit it)",
                param=f"hyperparameters.{key}",
            )
        merged[key] = inherited[key]
    return merged


def job_parent_version(conn: Connection, job_id: str) -> AdapterVersionRecord | None:
    """The version a job continues from, if it names one (for the trainer)."""
    parent_id = conn.execute(
        text("SELECT parent_version_id FROM jobs WHERE id = :id"), {"id": job_id}
    ).scalar()
    return get_version_by_id(conn, parent_id) if parent_id else None


def serving_index(conn: Connection, tenant_id: str, base_model: str, alias: str) -> ServingIndex:
    """Every version a serving cluster of `base_model` should hold for `alias` (or the latest
    of each adapter), with an ETag that changes exactly when that content changes."""
    if alias != LATEST:
        validate_alias_name(alias)
    base_id = conn.execute(
        text("SELECT id FROM base_models WHERE name = :name"), {"name": base_model}
    ).scalar()
    if base_id is None:
        raise BaseModelNotFoundError(f"no base model named {base_model!r}", param="base_model")
    scope = "a.tenant_id = :tenant AND a.base_model_id = :base"
    if alias == LATEST:
        chosen = (
            "v.number = (SELECT max(v2.number) FROM adapter_versions v2 WHERE v2.adapter_id = a.id)"
        )
    else:
        chosen = (
            "v.id IN (SELECT al.version_id FROM adapter_aliases al "
            "WHERE al.adapter_id = a.id AND al.name = :alias)"
        )
    found = query_versions(
        conn, f"{scope} AND {chosen} ORDER BY a.name", tenant=tenant_id, base=base_id, alias=alias
    )
    content = [[v.adapter_name, v.number, v.id, v.files] for v in found]
    digest = hashlib.sha256(
        json.dumps([base_model, alias, content], sort_keys=True).encode()
    ).hexdigest()
    return ServingIndex(base_model=base_model, alias=alias, versions=found, etag=digest)
