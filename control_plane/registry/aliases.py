"""Aliases (every move recorded with actor and time, and snapshotted to the bucket) and
deleting versions."""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, text

from control_plane.jobs import unfinished_job_continuing_from
from control_plane.registry.names import (
    ALIASES_FILE,
    MANIFEST,
    STORE_ERRORS,
    AdapterNotFoundError,
    AliasNotFoundError,
    StoreUnavailableError,
    VersionInUseError,
    validate_adapter_name,
    validate_alias_name,
)
from control_plane.registry.reads import (
    AdapterVersionRecord,
    AliasEventRecord,
    AliasRecord,
    get_adapter,
    resolve_version,
)
from control_plane.storage import (
    ObjectStore,
    validate_key,
)

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


_SELECT_ALIASES = """
    SELECT al.id, a.name AS adapter_name, al.name, v.number AS version, al.version_id,
           al.updated_by, al.updated_at
    FROM adapter_aliases al
    JOIN adapters a ON a.id = al.adapter_id
    JOIN adapter_versions v ON v.id = al.version_id
    WHERE al.adapter_id = :id
"""
# Every statement below is written once, here; the callers bind values, never SQL.
_ALIASES_OF_ADAPTER = text(_SELECT_ALIASES + " ORDER BY al.name")
_ALIAS = text(_SELECT_ALIASES + " AND al.name = :alias")
_EVENTS_OF_ADAPTER = text(
    """
    SELECT e.id, a.name AS adapter_name, e.alias, e.from_version, e.to_version,
           e.actor_key_id, e.created_at
    FROM alias_events e JOIN adapters a ON a.id = e.adapter_id
    WHERE e.adapter_id = :id AND (CAST(:alias AS text) IS NULL OR e.alias = :alias)
    ORDER BY e.id
"""
)


def list_aliases(conn: Connection, tenant_id: str, name: str) -> list[AliasRecord]:
    adapter = get_adapter(conn, tenant_id, name)
    rows = conn.execute(_ALIASES_OF_ADAPTER, {"id": adapter.id}).all()
    return [AliasRecord.from_row(r) for r in rows]


def alias_history(
    conn: Connection, tenant_id: str, name: str, alias: str | None = None
) -> list[AliasEventRecord]:
    """Every set, move and delete of the adapter's aliases (or of one alias), oldest first."""
    adapter = get_adapter(conn, tenant_id, name)
    if alias is not None:
        validate_alias_name(alias)
    rows = conn.execute(_EVENTS_OF_ADAPTER, {"id": adapter.id, "alias": alias}).all()
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
    current = conn.execute(_ALIAS, {"id": adapter.id, "alias": alias}).one_or_none()
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
    row = conn.execute(_ALIAS, {"id": adapter.id, "alias": alias}).one()
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
    current = conn.execute(_ALIAS, {"id": adapter.id, "alias": alias}).one_or_none()
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
    aliases = conn.execute(_ALIASES_OF_ADAPTER, {"id": adapter.id}).all()
    events = conn.execute(_EVENTS_OF_ADAPTER, {"id": adapter.id, "alias": None}).all()
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
    except STORE_ERRORS as exc:
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
    waiting = unfinished_job_continuing_from(conn, version.id)
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
