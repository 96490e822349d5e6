"""Registry rows as records and the queries that read them: adapters, versions, parents
of continued jobs, and the serving index."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from pydantic import ValidationError
from sqlalchemy import (
    ColumnElement,
    Connection,
    Select,
    String,
    Table,
    and_,
    func,
    select,
    true,
)
from sqlalchemy import cast as sa_cast
from sqlalchemy.sql.selectable import NamedFromClause

from control_plane.db.tables import (
    Adapter,
    AdapterAlias,
    AdapterVersion,
    BaseModelRow,
    ServingGeneration,
)
from control_plane.hyperparameters import Hyperparameters
from control_plane.jobs import job_parent_version_id
from control_plane.pagination import trim
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

_adapters = cast(Table, Adapter.__table__).alias("a")
_versions = cast(Table, AdapterVersion.__table__).alias("v")
_aliases = cast(Table, AdapterAlias.__table__).alias("al")
_bases = cast(Table, BaseModelRow.__table__).alias("b")
_generations = cast(Table, ServingGeneration.__table__)
_parents = cast(Table, AdapterVersion.__table__).alias("pv")
_parent_adapters = cast(Table, Adapter.__table__).alias("pa")

# The adapters that have at least one version, with their latest number and version count,
# by name. Each adapter's figures are its own versions' (a lateral read of its
# `(adapter_id, number)` index), so a page of adapters, in the order of `(tenant_id, name)`,
# reads its own adapters' versions, not every version of the tenant's registry.
_counts = (
    select(
        func.max(_versions.c.number).label("latest_version"),
        func.count().label("version_count"),
    )
    .where(_versions.c.adapter_id == _adapters.c.id)
    .lateral("counts")
)
_ADAPTERS = (
    select(
        _adapters.c.id,
        _adapters.c.tenant_id,
        _adapters.c.name,
        _adapters.c.base_model_id,
        _bases.c.name.label("base_model_name"),
        _adapters.c.created_at,
        _counts.c.latest_version,
        _counts.c.version_count,
    )
    .select_from(
        _adapters.join(_bases, _bases.c.id == _adapters.c.base_model_id).join(_counts, true())
    )
    .where(_counts.c.version_count > 0)
    .order_by(_adapters.c.name)
)

# Every field of `AdapterVersionRecord`: the version, its adapter and base, its parent's
# `name@number`, and the names of the aliases pointing at it.
_VERSIONS = select(
    _versions.c.id,
    _versions.c.adapter_id,
    _adapters.c.tenant_id,
    _adapters.c.name.label("adapter_name"),
    _adapters.c.base_model_id,
    _bases.c.name.label("base_model_name"),
    _versions.c.number,
    _versions.c.job_id,
    _versions.c.parent_version_id,
    (_parent_adapters.c.name + "@" + sa_cast(_parents.c.number, String)).label("parent_ref"),
    _versions.c.files,
    _versions.c.lineage,
    _versions.c.metrics,
    _versions.c.object_prefix,
    _versions.c.created_at,
    func.array(
        select(_aliases.c.name)
        .where(_aliases.c.version_id == _versions.c.id)
        .order_by(_aliases.c.name)
        .scalar_subquery()
    ).label("aliases"),
).select_from(
    _versions.join(_adapters, _adapters.c.id == _versions.c.adapter_id)
    .join(_bases, _bases.c.id == _adapters.c.base_model_id)
    .outerjoin(_parents, _parents.c.id == _versions.c.parent_version_id)
    .outerjoin(_parent_adapters, _parent_adapters.c.id == _parents.c.adapter_id)
)


def _query_versions(
    conn: Connection,
    *where: ColumnElement[bool],
    order_by: Sequence[ColumnElement[Any]] = (),
    limit: int | None = None,
) -> list[AdapterVersionRecord]:
    """Versions matching `where` (clauses on the aliased tables above), as records."""
    rows = conn.execute(_VERSIONS.where(*where).order_by(*order_by).limit(limit)).all()
    return [AdapterVersionRecord.from_row(r) for r in rows]


def _of_adapter(tenant_id: str, name: str) -> ColumnElement[bool]:
    return and_(_adapters.c.tenant_id == tenant_id, _adapters.c.name == name)


def list_adapters(
    conn: Connection, tenant_id: str, *, after: str | None = None, limit: int = 100
) -> tuple[list[AdapterRecord], bool]:
    """The tenant's adapters that have at least one version, by name; `after` is a name."""
    query = _ADAPTERS.where(_adapters.c.tenant_id == tenant_id)
    if after is not None:
        query = query.where(_adapters.c.name > after)
    rows, more = trim(conn.execute(query.limit(limit + 1)).all(), limit)
    return [AdapterRecord.from_row(r) for r in rows], more


def get_adapter(conn: Connection, tenant_id: str, name: str) -> AdapterRecord:
    validate_adapter_name(name)
    row = conn.execute(_ADAPTERS.where(_of_adapter(tenant_id, name))).one_or_none()
    if row is None:
        raise AdapterNotFoundError(f"no adapter named {name!r}")
    return AdapterRecord.from_row(row)


def list_versions(
    conn: Connection, tenant_id: str, name: str, *, before: int | None = None, limit: int = 100
) -> tuple[list[AdapterVersionRecord], bool]:
    """Newest first; `before` is the number of the last version of the previous page."""
    get_adapter(conn, tenant_id, name)
    found = _query_versions(
        conn,
        _of_adapter(tenant_id, name),
        _versions.c.number < (before if before is not None else MAX_VERSION),
        order_by=[_versions.c.number.desc()],
        limit=limit + 1,
    )
    return trim(found, limit)


def _alias_version(alias: str, adapters: NamedFromClause) -> Select[Any]:
    """The id of the version that the alias `alias` of `adapters`' row points at."""
    return select(_aliases.c.version_id).where(
        _aliases.c.adapter_id == adapters.c.id, _aliases.c.name == alias
    )


def _alias_target(alias: str) -> ColumnElement[bool]:
    """The version that the adapter's alias `alias` points at."""
    return _versions.c.id.in_(_alias_version(alias, _adapters))


def resolve_version(
    conn: Connection, tenant_id: str, name: str, ref: str | int
) -> AdapterVersionRecord:
    """A version of the tenant's adapter by number, alias, or `latest`."""
    validate_adapter_name(name)
    ref = str(ref)
    scope = _of_adapter(tenant_id, name)
    if is_number(ref):
        if int(ref) > MAX_VERSION:
            raise VersionNotFoundError(f"adapter {name!r} has no version {ref}")
        found = _query_versions(conn, scope, _versions.c.number == int(ref))
    elif ref == LATEST:
        found = _query_versions(conn, scope, order_by=[_versions.c.number.desc()], limit=1)
    else:
        validate_alias_name(ref)
        found = _query_versions(conn, scope, _alias_target(ref))
    if found:
        return found[0]
    get_adapter(conn, tenant_id, name)  # raises AdapterNotFoundError when that is the reason
    if is_number(ref) or ref == LATEST:
        raise VersionNotFoundError(f"adapter {name!r} has no version {ref}")
    raise AliasNotFoundError(f"adapter {name!r} has no alias {ref!r}")


def get_version_by_id(conn: Connection, version_id: str) -> AdapterVersionRecord | None:
    """Unscoped, for trainers and celery tasks acting for whichever tenant owns it."""
    found = _query_versions(conn, _versions.c.id == version_id)
    return found[0] if found else None


def version_for_job(conn: Connection, job_id: str) -> AdapterVersionRecord | None:
    """The version a job published, if it did (a job publishes at most one)."""
    found = _query_versions(conn, _versions.c.job_id == job_id)
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
        if key in requested and _as_stored(key, requested[key]) != inherited[key]:
            raise AdapterShapeMismatchError(
                f"{parent.model_id} was trained with {key}={inherited[key]!r}; a job continuing "
                f"from it must keep that value (leave {key} out to inherit it)",
                param=f"hyperparameters.{key}",
            )
        merged[key] = inherited[key]
    return merged


def _as_stored(key: str, value: Any) -> Any:
    """A requested value as the job would store it (`"8"` from a form is the parent's `8`);
    one that does not validate is left as sent, for the validation after to refuse."""
    try:
        return Hyperparameters.model_validate({key: value}).model_dump(mode="json")[key]
    except ValidationError:
        return value


def job_parent_version(conn: Connection, job_id: str) -> AdapterVersionRecord | None:
    """The version a job continues from, if it names one (for the trainer)."""
    parent_id = job_parent_version_id(conn, job_id)
    return get_version_by_id(conn, parent_id) if parent_id else None


def _serving_base(conn: Connection, base_model: str, alias: str) -> str:
    """The id of the base a serving index is asked for (a 404 when there is none; a 400 for an
    alias name that cannot be one)."""
    if alias != LATEST:
        validate_alias_name(alias)
    base_id = conn.execute(select(_bases.c.id).where(_bases.c.name == base_model)).scalar()
    if base_id is None:
        raise BaseModelNotFoundError(f"no base model named {base_model!r}", param="base_model")
    return str(base_id)


def _serving_scope(tenant_id: str, base_id: str, alias: str) -> list[ColumnElement[bool]]:
    """Which versions a serving cluster of the base holds for `alias` (or the latest of each
    adapter): clauses on the tables of `_VERSIONS`."""
    # The chosen versions' ids, one index probe per adapter of the base (its newest number,
    # or its alias): the index holds the versions with those ids.
    mine = cast(Table, Adapter.__table__).alias("a2")
    if alias == LATEST:
        newest = cast(Table, AdapterVersion.__table__).alias("v2")
        chosen = (
            select(newest.c.id)
            .where(newest.c.adapter_id == mine.c.id)
            .order_by(newest.c.number.desc())
            .limit(1)
        )
    else:
        chosen = _alias_version(alias, mine)
    ids = select(chosen.scalar_subquery()).where(
        mine.c.tenant_id == tenant_id, mine.c.base_model_id == base_id
    )
    return [_adapters.c.tenant_id == tenant_id, _versions.c.id.in_(ids)]


def _serving_etag(conn: Connection, tenant_id: str, base_id: str, alias: str) -> str:
    """The index's ETag: a digest of the (tenant, base) serving generation (revision 0014's
    triggers count every change to what any of its indexes can hold) and the alias. One row
    read; it may change where this alias's index did not, never the other way round."""
    generation = conn.execute(
        select(_generations.c.generation).where(
            _generations.c.tenant_id == tenant_id, _generations.c.base_model_id == base_id
        )
    ).scalar()
    content = [tenant_id, base_id, alias, int(generation or 0)]
    return hashlib.sha256(json.dumps(content).encode()).hexdigest()


def serving_etag(conn: Connection, tenant_id: str, base_model: str, alias: str) -> str:
    """The ETag `serving_index` would give: what a poll that finds nothing changed reads (the
    base's id and one generation row, whatever the number of adapters)."""
    return _serving_etag(conn, tenant_id, _serving_base(conn, base_model, alias), alias)


def serving_index(conn: Connection, tenant_id: str, base_model: str, alias: str) -> ServingIndex:
    """Every version a serving cluster of `base_model` should hold for `alias` (or the latest
    of each adapter), with an ETag that changes whenever that content changes.

    The ETag is read before the versions: a change committed in between gives the new content
    under the old ETag (the next poll fetches it again), never old content under a new one."""
    base_id = _serving_base(conn, base_model, alias)
    digest = _serving_etag(conn, tenant_id, base_id, alias)
    found = _query_versions(
        conn, *_serving_scope(tenant_id, base_id, alias), order_by=[_adapters.c.name]
    )
    return ServingIndex(base_model=base_model, alias=alias, versions=found, etag=digest)
