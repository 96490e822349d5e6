"""Disaster recovery: the registry rows rebuilt from the manifests and alias snapshots in the
bucket."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, text
from sqlalchemy.dialects.postgresql import JSONB

from control_plane.jobs import committed_models, restore_parent_version
from control_plane.registry.names import BASE_MODEL_LINEAGE_FIELDS, MANIFEST, MANIFEST_FORMAT
from control_plane.storage import (
    ObjectStore,
    ObjectStoreError,
)

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
    committed_by_job = committed_models(conn, list(by_job))
    for job_id, group in by_job.items():
        group.sort(key=lambda m: m["version"]["number"])
        chosen: dict[str, Any] | None
        if job_id not in committed_by_job:
            chosen = group[-1]
        else:
            committed = committed_by_job[job_id]
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
    base_cols = BASE_MODEL_LINEAGE_FIELDS
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
        # What is restored happened before: no webhook event for it (revision 0022).
        conn.execute(text("SELECT set_config('loraforge.replaying', 'on', true)"))
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
                restore_parent_version(conn, m["version"]["job_id"], parent)
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
