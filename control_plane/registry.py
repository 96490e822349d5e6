"""The adapter registry: adapters, their immutable versions, aliases, and publication into it.

An adapter is a named line of versions per tenant, bound to one base model. A version is a
PEFT directory (`adapter_config.json`, `adapter_model.safetensors`) stored write-once under
`adapter_version_prefix(tenant, name, number)`, next to a `manifest.json` that records its
files, their sha256 and its lineage. Publication uploads and verifies the files, writes the
manifest last, and only then commits the version row in the transaction that marks the job
`succeeded` (`JobQueue.complete`), so a version is never visible half-made and a job publishes
at most one version (the version row is unique per job).

Aliases (`prod`, `staging`, ...) point at versions; every move is recorded with the acting
key and the time, and the current aliases plus their history are also written to
`tenants/<t>/adapters/<name>/aliases.json`, so the bucket alone is enough to rebuild the whole
registry (`rebuild_from_manifests`). All registry SQL lives in this module.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, cast

from botocore.exceptions import BotoCoreError, ClientError
from sqlalchemy import Connection, Engine, Table, bindparam, insert, text
from sqlalchemy.dialects.postgresql import JSONB

from control_plane.ids import new_id
from control_plane.models import AdapterVersion
from control_plane.queue import JobQueue
from control_plane.records import JobRecord, _FromRow
from control_plane.storage import (
    ObjectExistsError,
    ObjectStore,
    ObjectStoreError,
    adapter_version_prefix,
    validate_key,
)

log = logging.getLogger(__name__)

versions_table = cast(Table, AdapterVersion.__table__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
MANIFEST = "manifest.json"
ALIASES_FILE = "aliases.json"
MANIFEST_FORMAT = "loraforge.adapter-manifest/1"
NAME_MAX = 128
ALIAS_MAX = 64
LATEST = "latest"
MAX_VERSION = 2**31 - 1
RESERVED_ADAPTER_NAMES = frozenset({"index"})  # `/v1/adapters/index` is the serving index
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_STORE_ERRORS = (ObjectStoreError, OSError, BotoCoreError, ClientError)
_RESERVE_ATTEMPTS = 3

# --------------------------------------------------------------------------- errors


class RegistryError(Exception):
    """A refusal of the registry, with a stable `code`; `retryable` tells a trainer whether
    failing the job for another attempt can help."""

    code = "registry_error"
    retryable = False

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidNameError(RegistryError):
    code = "invalid_name"


class AdapterNotFoundError(RegistryError):
    code = "adapter_not_found"


class VersionNotFoundError(RegistryError):
    code = "version_not_found"


class AliasNotFoundError(RegistryError):
    code = "alias_not_found"


class BaseModelNotFoundError(RegistryError):
    code = "base_model_not_found"


class VersionInUseError(RegistryError):
    code = "version_in_use"


class BaseModelMismatchError(RegistryError):
    code = "base_model_mismatch"


class AdapterShapeMismatchError(RegistryError):
    code = "adapter_shape_mismatch"


class AdapterFilesError(RegistryError):
    code = "adapter_files_missing"


class StoreUnavailableError(RegistryError):
    """The object store failed (outage, missing bucket): nothing was made visible."""

    code = "object_store_unavailable"
    retryable = True


# --------------------------------------------------------------------------- names


def _is_number(ref: str) -> bool:
    return ref.isascii() and ref.isdigit()


def validate_name(value: str, what: str = "adapter name", *, max_length: int = NAME_MAX) -> str:
    """Return `value` if it is a safe registry name, else raise `InvalidNameError`.

    Names become object-store path segments and URL path segments: no path separators, no
    `..`, no control characters, at most `max_length` characters, and only letters, digits,
    `.`, `_` and `-`, starting with a letter or digit.
    """
    if not value:
        raise InvalidNameError(f"{what} must not be empty", param=what)
    if len(value) > max_length:
        raise InvalidNameError(f"{what} is longer than {max_length} characters", param=what)
    if _CONTROL.search(value):
        raise InvalidNameError(f"{what} {value!r} contains control characters", param=what)
    if "/" in value or "\\" in value:
        raise InvalidNameError(f"{what} {value!r} contains a path separator", param=what)
    if ".." in value:
        raise InvalidNameError(f"{what} {value!r} contains '..'", param=what)
    if not _NAME.fullmatch(value):
        raise InvalidNameError(
            f"{what} {value!r}: use letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
            param=what,
        )
    return value


def validate_adapter_name(name: str) -> str:
    validate_name(name)
    if name in RESERVED_ADAPTER_NAMES:
        raise InvalidNameError(f"adapter name {name!r} is reserved", param="adapter name")
    return name


def validate_alias_name(alias: str) -> str:
    """Aliases may not look like version numbers or be `latest`, so a reference is never
    ambiguous."""
    validate_name(alias, "alias", max_length=ALIAS_MAX)
    if _is_number(alias) or alias == LATEST:
        raise InvalidNameError(
            f"alias {alias!r} is reserved or looks like a version", param="alias"
        )
    return alias


def parse_ref(ref: str) -> tuple[str, str]:
    """`name[@version|alias|latest]` → (name, reference); the reference defaults to `latest`."""
    name, _, version = ref.partition("@")
    validate_adapter_name(name)
    version = version or LATEST
    if not _is_number(version) and version != LATEST:
        validate_alias_name(version)
    return name, version


def model_id(adapter_name: str, number: int) -> str:
    """The stable id of a version (`name@3`): the job's `fine_tuned_model`, and a pull ref."""
    return f"{adapter_name}@{number}"


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


def _versions(conn: Connection, where: str, **params: Any) -> list[AdapterVersionRecord]:
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
    found = _versions(
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
    if _is_number(ref):
        if int(ref) > MAX_VERSION:
            raise VersionNotFoundError(f"adapter {name!r} has no version {ref}")
        found = _versions(
            conn, f"{scope} AND v.number = :n", tenant=tenant_id, name=name, n=int(ref)
        )
    elif ref == LATEST:
        found = _versions(
            conn, f"{scope} ORDER BY v.number DESC LIMIT 1", tenant=tenant_id, name=name
        )
    else:
        validate_alias_name(ref)
        found = _versions(
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
    if _is_number(ref) or ref == LATEST:
        raise VersionNotFoundError(f"adapter {name!r} has no version {ref}")
    raise AliasNotFoundError(f"adapter {name!r} has no alias {ref!r}")


def get_version_by_id(conn: Connection, version_id: str) -> AdapterVersionRecord | None:
    """Unscoped, for trainers and celery tasks acting for whichever tenant owns it."""
    found = _versions(conn, "v.id = :id", id=version_id)
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
    found = _versions(
        conn, f"{scope} AND {chosen} ORDER BY a.name", tenant=tenant_id, base=base_id, alias=alias
    )
    content = [[v.adapter_name, v.number, v.id, v.files] for v in found]
    digest = hashlib.sha256(
        json.dumps([base_model, alias, content], sort_keys=True).encode()
    ).hexdigest()
    return ServingIndex(base_model=base_model, alias=alias, versions=found, etag=digest)


# --------------------------------------------------------------------------- aliases


def _lock_adapter(conn: Connection, tenant_id: str, name: str) -> Any:
    """Lock the adapter row: alias changes (and their bucket snapshot) happen one at a time."""
    validate_adapter_name(name)
    row = conn.execute(
        text("SELECT * FROM adapters WHERE tenant_id = :tenant AND name = :name FOR UPDATE"),
        {"tenant": tenant_id, "name": name},
    ).one_or_none()
    if row is None:
        raise AdapterNotFoundError(f"no adapter named {name!r}")
    return row


_ALIASES = """
    SELECT al.id, a.name AS adapter_name, al.name, v.number AS version, al.version_id,
           al.updated_by, al.updated_at
    FROM adapter_aliases al
    JOIN adapters a ON a.id = al.adapter_id
    JOIN adapter_versions v ON v.id = al.version_id
"""
_EVENTS = """
    SELECT e.id, a.name AS adapter_name, e.alias, e.from_version, e.to_version,
           e.actor_key_id, e.created_at
    FROM alias_events e JOIN adapters a ON a.id = e.adapter_id
"""


def list_aliases(conn: Connection, tenant_id: str, name: str) -> list[AliasRecord]:
    adapter = get_adapter(conn, tenant_id, name)
    rows = conn.execute(
        text(f"{_ALIASES} WHERE al.adapter_id = :id ORDER BY al.name"), {"id": adapter.id}
    ).all()
    return [AliasRecord.from_row(r) for r in rows]


def alias_history(
    conn: Connection, tenant_id: str, name: str, alias: str | None = None
) -> list[AliasEventRecord]:
    """Every set, move and delete of the adapter's aliases (or of one alias), oldest first."""
    adapter = get_adapter(conn, tenant_id, name)
    where = "e.adapter_id = :id"
    if alias is not None:
        validate_alias_name(alias)
        where += " AND e.alias = :alias"
    rows = conn.execute(
        text(f"{_EVENTS} WHERE {where} ORDER BY e.id"), {"id": adapter.id, "alias": alias}
    ).all()
    return [AliasEventRecord.from_row(r) for r in rows]


def set_alias(
    conn: Connection,
    store: ObjectStore,
    *,
    tenant_id: str,
    adapter_name: str,
    alias: str,
    version: int,
    actor_key_id: str | None,
) -> AliasRecord:
    """Point `alias` at `version` (creating or moving it) and record who did it; the caller
    commits. Setting an alias to the version it already points at records nothing."""
    validate_alias_name(alias)
    adapter = _lock_adapter(conn, tenant_id, adapter_name)
    target = resolve_version(conn, tenant_id, adapter_name, version)
    current = conn.execute(
        text(f"{_ALIASES} WHERE al.adapter_id = :id AND al.name = :alias"),
        {"id": adapter.id, "alias": alias},
    ).one_or_none()
    if current is not None and current.version_id == target.id:
        return AliasRecord.from_row(current)
    conn.execute(
        text(
            "INSERT INTO adapter_aliases (id, adapter_id, name, version_id, updated_by) "
            "VALUES (:new_id, :adapter, :alias, :version, :actor) "
            "ON CONFLICT (adapter_id, name) DO UPDATE SET version_id = EXCLUDED.version_id, "
            "updated_by = EXCLUDED.updated_by, updated_at = now()"
        ),
        {
            "new_id": f"alias-{secrets.token_hex(12)}",
            "adapter": adapter.id,
            "alias": alias,
            "version": target.id,
            "actor": actor_key_id,
        },
    )
    _record_alias_event(
        conn, adapter.id, alias, current.version if current else None, target.number, actor_key_id
    )
    _write_alias_snapshot(conn, store, adapter)
    row = conn.execute(
        text(f"{_ALIASES} WHERE al.adapter_id = :id AND al.name = :alias"),
        {"id": adapter.id, "alias": alias},
    ).one()
    return AliasRecord.from_row(row)


def delete_alias(
    conn: Connection,
    store: ObjectStore,
    *,
    tenant_id: str,
    adapter_name: str,
    alias: str,
    actor_key_id: str | None,
) -> None:
    """Remove the alias and record it in its history; the caller commits."""
    validate_alias_name(alias)
    adapter = _lock_adapter(conn, tenant_id, adapter_name)
    current = conn.execute(
        text(f"{_ALIASES} WHERE al.adapter_id = :id AND al.name = :alias"),
        {"id": adapter.id, "alias": alias},
    ).one_or_none()
    if current is None:
        raise AliasNotFoundError(f"adapter {adapter_name!r} has no alias {alias!r}")
    conn.execute(text("DELETE FROM adapter_aliases WHERE id = :id"), {"id": current.id})
    _record_alias_event(conn, adapter.id, alias, current.version, None, actor_key_id)
    _write_alias_snapshot(conn, store, adapter)


def _record_alias_event(
    conn: Connection,
    adapter_id: str,
    alias: str,
    from_version: int | None,
    to_version: int | None,
    actor: str | None,
) -> None:
    conn.execute(
        text(
            "INSERT INTO alias_events (adapter_id, alias, from_version, to_version, actor_key_id) "
            "VALUES (:adapter, :alias, :from_v, :to_v, :actor)"
        ),
        {
            "adapter": adapter_id,
            "alias": alias,
            "from_v": from_version,
            "to_v": to_version,
            "actor": actor,
        },
    )


def aliases_key(tenant_id: str, adapter_name: str) -> str:
    """Key of an adapter's alias snapshot, next to its version prefixes."""
    return validate_key(f"tenants/{tenant_id}/adapters/{adapter_name}/{ALIASES_FILE}")


def _write_alias_snapshot(conn: Connection, store: ObjectStore, adapter: Any) -> None:
    """Write the adapter's aliases and their whole history to the bucket (overwritten each
    time; the adapter row lock orders concurrent writers) so that a rebuild restores them."""
    aliases = conn.execute(
        text(f"{_ALIASES} WHERE al.adapter_id = :id ORDER BY al.name"), {"id": adapter.id}
    ).all()
    events = conn.execute(
        text(f"{_EVENTS} WHERE e.adapter_id = :id ORDER BY e.id"), {"id": adapter.id}
    ).all()
    snapshot = {
        "format": "loraforge.adapter-aliases/1",
        "adapter": {"id": adapter.id, "name": adapter.name},
        "aliases": [
            {
                "id": a.id,
                "name": a.name,
                "version": a.version,
                "updated_by": a.updated_by,
                "updated_at": a.updated_at.isoformat(),
            }
            for a in aliases
        ],
        "history": [
            {
                "alias": e.alias,
                "from_version": e.from_version,
                "to_version": e.to_version,
                "actor_key_id": e.actor_key_id,
                "at": e.created_at.isoformat(),
            }
            for e in events
        ],
    }
    try:
        store.put_bytes(
            aliases_key(adapter.tenant_id, adapter.name),
            json.dumps(snapshot, indent=1, sort_keys=True).encode(),
        )
    except _STORE_ERRORS as exc:
        raise StoreUnavailableError(
            f"could not record the aliases in the object store: {exc}"
        ) from exc


# --------------------------------------------------------------------------- deleting versions


def delete_version(
    conn: Connection, tenant_id: str, adapter_name: str, number: int
) -> AdapterVersionRecord:
    """Delete the version's row unless an alias points at it; the caller commits, then calls
    `remove_version_objects`. (Objects go after the commit: a failure leaves orphan objects,
    never a visible version without its files.)"""
    _lock_adapter(conn, tenant_id, adapter_name)
    version = resolve_version(conn, tenant_id, adapter_name, number)
    if version.aliases:
        raise VersionInUseError(
            f"{version.model_id} is the target of alias(es) {', '.join(version.aliases)}; "
            "move or delete them first"
        )
    waiting = conn.execute(
        text(
            "SELECT id FROM jobs WHERE parent_version_id = :id "
            "AND status NOT IN ('succeeded', 'failed', 'cancelled') ORDER BY created_at LIMIT 1"
        ),
        {"id": version.id},
    ).scalar()
    if waiting is not None:
        raise VersionInUseError(
            f"{version.model_id} is the starting point of unfinished job {waiting}; "
            "cancel it or wait for it to finish first"
        )
    conn.execute(text("DELETE FROM adapter_versions WHERE id = :id"), {"id": version.id})
    return version


def remove_version_objects(store: ObjectStore, object_prefix: str) -> None:
    """Delete a version's objects, its manifest first so that no rebuild can resurrect it."""
    store.delete(object_prefix + MANIFEST)
    store.delete_prefix(object_prefix)


def fetch_version_files(
    store: ObjectStore, version: AdapterVersionRecord, target_dir: Path
) -> Path:
    """Download a version's PEFT files into `target_dir`, each verified against its sha256
    (the trainer's starting point when a job continues from a version)."""
    target_dir.mkdir(parents=True, exist_ok=True)
    for f in version.files:
        store.download_to(
            version.object_prefix + f["name"], target_dir / f["name"], expected_sha256=f["sha256"]
        )
    return target_dir


# --------------------------------------------------------------------------- publication


class RegistryParts(Protocol):
    """What publication needs; `control_plane.services.Services` has all of it."""

    engine: Engine
    queue: JobQueue
    store: ObjectStore


@dataclass(frozen=True)
class _Plan:
    tenant_name: str
    base: Any
    adapter_name: str
    parent: AdapterVersionRecord | None


def _version_for_job(conn: Connection, job_id: str) -> AdapterVersionRecord | None:
    found = _versions(conn, "v.job_id = :job", job=job_id)
    return found[0] if found else None


def derive_adapter_name(base_name: str, suffix: str) -> str:
    """`<last part of the base name>-<suffix>`, made a valid adapter name."""
    raw = f"{base_name.rsplit('/', 1)[-1]}-{suffix}"
    cleaned = re.sub(r"\.{2,}", ".", re.sub(r"[^A-Za-z0-9._-]+", "-", raw))
    return cleaned.lstrip("._-")[:NAME_MAX] or "adapter"


def _plan(conn: Connection, job: JobRecord) -> _Plan:
    row = conn.execute(
        text(
            "SELECT t.name AS tenant_name, j.parent_version_id FROM jobs j "
            "JOIN tenants t ON t.id = j.tenant_id WHERE j.id = :job"
        ),
        {"job": job.id},
    ).one()
    base = conn.execute(
        text("SELECT * FROM base_models WHERE id = :id"), {"id": job.base_model_id}
    ).one()
    parent = get_version_by_id(conn, row.parent_version_id) if row.parent_version_id else None
    if job.adapter_name:
        name = job.adapter_name
    elif parent is not None and parent.tenant_id == job.tenant_id:
        name = parent.adapter_name
    else:
        name = derive_adapter_name(base.name, job.suffix or job.id)
    return _Plan(row.tenant_name, base, validate_adapter_name(name), parent)


def _local_files(adapter_dir: Path) -> list[tuple[str, Path, int, str]]:
    found = []
    for name in ADAPTER_FILES:
        path = adapter_dir / name
        if not path.is_file():
            raise AdapterFilesError(f"{adapter_dir} has no {name}: not a PEFT adapter directory")
        digest = hashlib.sha256()
        with path.open("rb") as src:
            while chunk := src.read(1024 * 1024):
                digest.update(chunk)
        found.append((name, path, path.stat().st_size, digest.hexdigest()))
    return found


def _reserve(engine: Engine, tenant_id: str, name: str, base_id: str) -> tuple[str, int, datetime]:
    """Create the adapter on first publish, or take its next version number; commits at once
    so concurrent publishes never wait on each other (a failed publish leaves a gap)."""
    with engine.begin() as conn:
        row = conn.execute(
            text(
                "INSERT INTO adapters (id, tenant_id, name, base_model_id, next_version) "
                "VALUES (:id, :tenant, :name, :base, 2) "
                "ON CONFLICT (tenant_id, name) DO UPDATE SET next_version = adapters.next_version + 1 "
                "WHERE adapters.base_model_id = EXCLUDED.base_model_id "
                "RETURNING id, next_version - 1 AS number, created_at"
            ),
            {"id": new_id("adapter"), "tenant": tenant_id, "name": name, "base": base_id},
        ).one_or_none()
    if row is None:
        raise BaseModelMismatchError(
            f"adapter {name!r} exists for another base model; name the job's adapter differently",
            param="adapter_name",
        )
    return row.id, row.number, row.created_at


def _discard(store: ObjectStore, prefix: str) -> None:
    """Best effort: remove what a publish that will not commit uploaded (manifest first)."""
    try:
        remove_version_objects(store, prefix)
    except Exception:
        log.warning("could not remove the unpublished objects under %s", prefix, exc_info=True)


def publish_job_adapter(
    parts: RegistryParts,
    *,
    job: JobRecord,
    worker_id: str,
    adapter_dir: Path,
    lineage: dict[str, Any],
    metrics: dict[str, Any],
) -> PublishedVersion | None:
    """Publish the trained adapter in `adapter_dir` as the job's version and mark the job
    `succeeded`, all or nothing.

    Returns the job's existing version (`created=False`) when it was already published, and
    None when `worker_id` no longer holds the job's lease (nothing becomes visible). Raises
    `StoreUnavailableError` (retryable) when the object store fails, leaving no version row
    and the job running, for the caller to fail retryably; other `RegistryError`s are not
    worth a retry.
    """
    with parts.engine.connect() as conn:
        existing = _version_for_job(conn, job.id)
        if existing is not None:
            return PublishedVersion(existing, created=False)
        plan = _plan(conn, job)
    local = _local_files(adapter_dir)
    for _ in range(_RESERVE_ATTEMPTS):
        adapter_id, number, adapter_created = _reserve(
            parts.engine, job.tenant_id, plan.adapter_name, plan.base.id
        )
        prefix = adapter_version_prefix(job.tenant_id, plan.adapter_name, number)
        version_id, created_at = new_id("version"), datetime.now(UTC)
        manifest: dict[str, Any] = {
            "format": MANIFEST_FORMAT,
            "tenant": {"id": job.tenant_id, "name": plan.tenant_name},
            "adapter": {
                "id": adapter_id,
                "name": plan.adapter_name,
                "created_at": adapter_created.isoformat(),
            },
            "version": {
                "id": version_id,
                "number": number,
                "model_id": model_id(plan.adapter_name, number),
                "job_id": job.id,
                "parent_version_id": plan.parent.id if plan.parent else None,
                "parent_ref": plan.parent.model_id if plan.parent else None,
                "created_at": created_at.isoformat(),
            },
            "base_model": {
                k: getattr(plan.base, k)
                for k in (
                    "id",
                    "name",
                    "source",
                    "source_kind",
                    "revision",
                    "sha256",
                    "architecture",
                    "parameter_count",
                    "has_chat_template",
                )
            },
            "files": [{"name": n, "size": size, "sha256": sha} for n, _, size, sha in local],
            "lineage": lineage,
            "metrics": metrics,
        }
        try:
            _upload(parts.store, prefix, local, manifest)
        except ObjectExistsError:
            log.warning("objects left under %s; publishing under the next number", prefix)
            continue
        except _STORE_ERRORS as exc:
            _discard(parts.store, prefix)
            raise StoreUnavailableError(
                f"publishing {plan.adapter_name} version {number} failed in the object store: {exc}"
            ) from exc
        break
    else:
        raise StoreUnavailableError(f"no free version number for adapter {plan.adapter_name!r}")

    def insert_version(conn: Connection) -> None:
        conn.execute(
            insert(versions_table).values(
                id=version_id,
                adapter_id=adapter_id,
                number=number,
                job_id=job.id,
                parent_version_id=manifest["version"]["parent_version_id"],
                files=manifest["files"],
                lineage=lineage,
                metrics=metrics,
                object_prefix=prefix,
                created_at=created_at,
            )
        )

    try:
        done = parts.queue.complete(
            job.id,
            worker_id,
            fine_tuned_model=model_id(plan.adapter_name, number),
            in_transaction=insert_version,
        )
    except BaseException:
        _discard(parts.store, prefix)
        raise
    with parts.engine.connect() as conn:
        if done is None:  # lease lost, or a duplicate publish of this job committed first
            _discard(parts.store, prefix)
            existing = _version_for_job(conn, job.id)
            return PublishedVersion(existing, created=False) if existing else None
        published = get_version_by_id(conn, version_id)
    assert published is not None
    return PublishedVersion(published, created=True)


def _upload(
    store: ObjectStore,
    prefix: str,
    local: Sequence[tuple[str, Path, int, str]],
    manifest: dict[str, Any],
) -> None:
    """Upload the files write-once, check what the store holds, then write the manifest."""
    for name, path, size, sha in local:
        store.put_file(prefix + name, path, sha256=sha, write_once=True)
        stored = store.head(prefix + name)
        if stored is None or stored.sha256 != sha or stored.size != size:
            raise ObjectStoreError(
                f"{prefix}{name}: the store holds {stored} after the upload, not sha256 {sha}"
            )
    body = json.dumps(manifest, indent=1, sort_keys=True, default=str).encode()
    store.put_bytes(prefix + MANIFEST, body, write_once=True)


# --------------------------------------------------------------------------- rebuild

_MANIFEST_KEY = re.compile(r"tenants/([^/]+)/adapters/([^/]+)/(\d+)/manifest\.json")
_ALIASES_KEY = re.compile(r"tenants/([^/]+)/adapters/([^/]+)/aliases\.json")


@dataclass(frozen=True)
class RebuildReport:
    versions: int
    aliases: int
    skipped: list[str]


def _load_manifest(store: ObjectStore, key: str) -> dict[str, Any] | str:
    """The manifest at `key` if it and every file it lists are intact, else why not."""
    try:
        manifest = json.loads(store.get_bytes(key))
        prefix = key.removesuffix(MANIFEST)
        for f in manifest["files"]:
            stored = store.head(prefix + f["name"])
            if stored is None or stored.sha256 != f["sha256"] or stored.size != f["size"]:
                return f"{key}: {f['name']} is missing or differs from the manifest"
    except (ObjectStoreError, ValueError, KeyError, TypeError) as exc:
        return f"{key}: unreadable manifest ({exc})"
    if manifest.get("format") != MANIFEST_FORMAT:
        return f"{key}: unknown manifest format {manifest.get('format')!r}"
    manifest["_prefix"] = prefix
    return manifest


def _one_per_job(
    conn: Connection, manifests: list[dict[str, Any]], skipped: list[str]
) -> list[dict[str, Any]]:
    """Keep the manifest whose version the job committed. A manifest can outlive a publish that
    never committed (a crash between the manifest and the commit): when the job's row says
    which version it produced, keep that one; without a job row, keep the newest per job."""
    by_job: dict[str, list[dict[str, Any]]] = {}
    kept = []
    for m in manifests:
        job_id = m["version"].get("job_id")
        if job_id is None:
            kept.append(m)
        else:
            by_job.setdefault(job_id, []).append(m)
    jobs = {
        r.id: r
        for r in conn.execute(
            text("SELECT id, status, fine_tuned_model FROM jobs WHERE id = ANY(:ids)"),
            {"ids": list(by_job)},
        )
    }
    for job_id, group in by_job.items():
        group.sort(key=lambda m: m["version"]["number"])
        job = jobs.get(job_id)
        chosen: dict[str, Any] | None
        if job is None:
            chosen = group[-1]
        else:
            committed = job.fine_tuned_model if job.status == "succeeded" else None
            matches = [m for m in group if m["version"]["model_id"] == committed]
            chosen = matches[0] if matches else None
        for m in group:
            if m is chosen:
                kept.append(m)
            else:
                skipped.append(f"{m['_prefix']}: not the version job {job_id} committed")
    return kept


def _restore_version(conn: Connection, m: dict[str, Any]) -> bool:
    tenant, adapter, version, base = m["tenant"], m["adapter"], m["version"], m["base_model"]
    conn.execute(
        text("INSERT INTO tenants (id, name) VALUES (:id, :name) ON CONFLICT DO NOTHING"),
        {"id": tenant["id"], "name": tenant["name"]},
    )
    base_cols = (
        "id",
        "name",
        "source",
        "source_kind",
        "revision",
        "sha256",
        "architecture",
        "parameter_count",
        "has_chat_template",
    )
    conn.execute(
        text(
            f"INSERT INTO base_models ({', '.join(base_cols)}) "
            f"VALUES ({', '.join(':' + c for c in base_cols)}) ON CONFLICT DO NOTHING"
        ),
        {c: base.get(c) for c in base_cols},
    )
    conn.execute(
        text(
            "INSERT INTO adapters (id, tenant_id, name, base_model_id, created_at) "
            "SELECT :id, :tenant, :name, b.id, :created FROM base_models b WHERE b.name = :base "
            "ON CONFLICT DO NOTHING"
        ),
        {
            "id": adapter["id"],
            "tenant": tenant["id"],
            "name": adapter["name"],
            "created": datetime.fromisoformat(adapter["created_at"]),
            "base": base["name"],
        },
    )
    inserted = conn.execute(
        text(
            "INSERT INTO adapter_versions (id, adapter_id, number, job_id, files, lineage, "
            "metrics, object_prefix, created_at) "
            "SELECT :id, a.id, :number, :job, :files, :lineage, :metrics, :prefix, :created "
            "FROM adapters a JOIN base_models b ON b.id = a.base_model_id "
            "WHERE a.tenant_id = :tenant AND a.name = :name AND b.name = :base "
            "ON CONFLICT DO NOTHING RETURNING id"
        ).bindparams(*(bindparam(n, type_=JSONB) for n in ("files", "lineage", "metrics"))),
        {
            "id": version["id"],
            "number": version["number"],
            "job": version["job_id"],
            "files": m["files"],
            "lineage": m["lineage"],
            "metrics": m["metrics"],
            "prefix": m["_prefix"],
            "created": datetime.fromisoformat(version["created_at"]),
            "tenant": tenant["id"],
            "name": adapter["name"],
            "base": base["name"],
        },
    ).one_or_none()
    return inserted is not None


def _restore_aliases(conn: Connection, store: ObjectStore, key: str, skipped: list[str]) -> int:
    try:
        snapshot = json.loads(store.get_bytes(key))
    except (ObjectStoreError, ValueError) as exc:
        skipped.append(f"{key}: unreadable alias snapshot ({exc})")
        return 0
    match = _ALIASES_KEY.fullmatch(key)
    assert match is not None
    adapter_id = conn.execute(
        text("SELECT id FROM adapters WHERE tenant_id = :t AND name = :n"),
        {"t": match.group(1), "n": match.group(2)},
    ).scalar()
    if adapter_id is None:
        skipped.append(f"{key}: the adapter has no intact version")
        return 0
    restored = 0
    for a in snapshot["aliases"]:
        row = conn.execute(
            text(
                "INSERT INTO adapter_aliases (id, adapter_id, name, version_id, updated_by, "
                "updated_at) SELECT :id, v.adapter_id, :name, v.id, :by, :at FROM adapter_versions v "
                "WHERE v.adapter_id = :adapter AND v.number = :number "
                "ON CONFLICT DO NOTHING RETURNING id"
            ),
            {
                "id": a["id"],
                "adapter": adapter_id,
                "name": a["name"],
                "number": a["version"],
                "by": a["updated_by"],
                "at": datetime.fromisoformat(a["updated_at"]),
            },
        ).one_or_none()
        restored += row is not None
    has_history = conn.execute(
        text("SELECT EXISTS (SELECT 1 FROM alias_events WHERE adapter_id = :a)"), {"a": adapter_id}
    ).scalar()
    if not has_history:
        for e in snapshot["history"]:
            conn.execute(
                text(
                    "INSERT INTO alias_events (adapter_id, alias, from_version, to_version, "
                    "actor_key_id, created_at) VALUES (:a, :alias, :f, :t, :actor, :at)"
                ),
                {
                    "a": adapter_id,
                    "alias": e["alias"],
                    "f": e["from_version"],
                    "t": e["to_version"],
                    "actor": e["actor_key_id"],
                    "at": datetime.fromisoformat(e["at"]),
                },
            )
    return restored


def rebuild_from_manifests(engine: Engine, store: ObjectStore) -> RebuildReport:
    """Recreate the registry rows from the manifests (and alias snapshots) in the bucket.

    The disaster-recovery path: idempotent (rows already present are kept), it also restores
    missing tenants and base models from the manifests, the versions' parents, the jobs'
    continue-from links, and each adapter's next version number. Manifests whose files are
    missing or corrupt, or that a job never committed, are reported in `skipped`.
    """
    skipped: list[str] = []
    manifests: list[dict[str, Any]] = []
    keys = store.list_keys("tenants/")
    for key in keys:
        if _MANIFEST_KEY.fullmatch(key):
            loaded = _load_manifest(store, key)
            if isinstance(loaded, str):
                skipped.append(loaded)
            else:
                manifests.append(loaded)
    restored = aliases = 0
    with engine.begin() as conn:
        chosen = _one_per_job(conn, manifests, skipped)
        for m in sorted(chosen, key=lambda m: (m["version"]["created_at"], m["version"]["number"])):
            restored += _restore_version(conn, m)
        for m in chosen:
            parent, version = m["version"]["parent_version_id"], m["version"]["id"]
            if parent is not None:
                conn.execute(
                    text(
                        "UPDATE adapter_versions SET parent_version_id = :p WHERE id = :v "
                        "AND EXISTS (SELECT 1 FROM adapter_versions WHERE id = :p)"
                    ),
                    {"p": parent, "v": version},
                )
                conn.execute(
                    text(
                        "UPDATE jobs SET parent_version_id = :p WHERE id = :job "
                        "AND parent_version_id IS NULL "
                        "AND EXISTS (SELECT 1 FROM adapter_versions WHERE id = :p)"
                    ),
                    {"p": parent, "job": m["version"]["job_id"]},
                )
        conn.execute(
            text(
                "UPDATE adapters a SET next_version = greatest(a.next_version, v.top + 1) "
                "FROM (SELECT adapter_id, max(number) AS top FROM adapter_versions "
                "GROUP BY adapter_id) v WHERE v.adapter_id = a.id"
            )
        )
        for key in keys:
            if _ALIASES_KEY.fullmatch(key):
                aliases += _restore_aliases(conn, store, key, skipped)
    return RebuildReport(versions=restored, aliases=aliases, skipped=skipped)
