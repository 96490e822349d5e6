"""Interactive runs as a tenant looks them up: the SDK's `RestClient` and resuming from a state.

A training model of a session is a *training run* to the SDK, and what it saved are its
*checkpoints*, named by tinker:// paths. This lists them (a tenant's runs and checkpoints,
newest checkpoints first, with offsets as the SDK pages), says what a checkpoint was trained on
(`weights_info`), starts a run from a saved state (`create_from_state`: the SDK's
`create_training_client_from_state`), deletes a checkpoint, sets when one expires, and deletes
the expired ones (`expire_checkpoints`, a periodic task). Every function takes the caller's
tenant and finds only its rows; only `expire_checkpoints` commits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, Row, text

from control_plane import audit
from control_plane.interactive import (
    CallKind,
    ModelKind,
    ModelRecord,
    NotFound,
    Refused,
    _session,
)
from control_plane.interactive_saves import checkpoint_path, encrypted
from control_plane.records import _FromRow
from control_plane.storage import ObjectStore

log = logging.getLogger(__name__)

# The SDK's bounds on a checkpoint's time to live: an hour to ten years.
MIN_TTL_SECONDS = 3600
MAX_TTL_SECONDS = 10 * 365 * 24 * 3600
# What the expiry pass deletes per transaction (each checkpoint's objects, then its row).
EXPIRE_BATCH = 50

_CHECKPOINT_COLUMNS = (
    "c.id, c.model_id, c.tenant_id, c.kind, c.name, c.path, c.storage_prefix, c.created_at, "
    "c.size_bytes, c.expires_at, c.user_metadata, c.published_version_id, m.session_id, "
    "m.base_model_id, m.lora_config, c.files, c.public, c.from_version_id"
)


@dataclass(frozen=True)
class CheckpointRecord(_FromRow):
    """Saved weights of a training run (`kind`: `state`, `sampler` or `external`), with its run's
    session, base and LoRA config, and the files it wrote (None: saved before revision 0030);
    `from_version_id`, the adapter version its run had loaded at the save (revision 0041). An
    adapter version read as weights (`session_weights.find`) is one too, of no session."""

    id: str
    model_id: str
    tenant_id: str
    kind: str
    name: str
    path: str
    storage_prefix: str
    created_at: datetime
    size_bytes: int | None
    expires_at: datetime | None
    user_metadata: dict[str, Any]
    published_version_id: str | None
    session_id: str
    base_model_id: str
    lora_config: dict[str, Any]
    files: dict[str, Any] | None
    public: bool
    from_version_id: str | None

    @property
    def encrypted(self) -> bool:
        """Its files are encrypted to age recipients: the platform cannot read them."""
        return encrypted(self.files)


@dataclass(frozen=True)
class RunRecord:
    """A training run: its model, its base's name, when it was last asked anything, and its
    newest saved state and sampler weights."""

    model: ModelRecord
    base_name: str
    last_request_at: datetime
    last_state: CheckpointRecord | None
    last_sampler: CheckpointRecord | None


class OverLimit(Exception):
    """The tenant holds as many loaded training models as its cap allows."""


def require_room(conn: Connection, tenant_id: str, default_limit: int) -> None:
    """Refuse a new training model to a tenant holding as many loaded ones (their weights live
    in executors' memory) as its cap: its own `max_interactive_models`, else `default_limit`
    (the platform's `LORAFORGE_MAX_INTERACTIVE_MODELS_PER_TENANT`). The tenant's creations take
    a lock of their own first (an advisory lock for the transaction), so two made at once count
    each other; the cap is read with the count, after the lock."""
    conn.execute(
        text("SELECT pg_advisory_xact_lock(hashtext('interactive_models:' || :tenant))"),
        {"tenant": tenant_id},
    )
    loaded, own = conn.execute(
        text(
            "SELECT count(*), (SELECT max_interactive_models FROM tenants WHERE id = :tenant) "
            "FROM interactive_models "
            "WHERE tenant_id = :tenant AND kind = 'training' AND unloaded_at IS NULL"
        ),
        {"tenant": tenant_id},
    ).one()
    limit = default_limit if own is None else own
    if loaded >= limit:
        cap = (
            f"the platform's limit (LORAFORGE_MAX_INTERACTIVE_MODELS_PER_TENANT = {limit})"
            if own is None
            else f"the limit the platform's operator set for it (max_interactive_models = {limit})"
        )
        raise OverLimit(
            f"your tenant holds {loaded} loaded training model{'' if loaded == 1 else 's'}, "
            f"{cap}: unload one (unload_model, or end its session) before creating another"
        )


def find_checkpoint(
    conn: Connection, tenant_id: str, path: str, *, lock: bool = False, shared: bool = False
) -> CheckpointRecord:
    """The tenant's saved weights at `path` (locked `FOR UPDATE` with `lock`), or, with
    `shared` (a read, on a platform that lets checkpoints be published), another tenant's that
    its owner published; NotFound."""
    owner = "(c.tenant_id = :tenant OR c.public)" if shared else "c.tenant_id = :tenant"
    row = conn.execute(
        text(
            f"SELECT {_CHECKPOINT_COLUMNS} FROM interactive_checkpoints c "
            "JOIN interactive_models m ON m.id = c.model_id "
            f"WHERE c.path = :path AND {owner}" + (" FOR UPDATE OF c" if lock else "")
        ),
        {"path": path, "tenant": tenant_id},
    ).one_or_none()
    if row is None:
        raise NotFound("checkpoint", path)
    return CheckpointRecord.from_row(row)


def check_name_free(conn: Connection, tenant_id: str, model_id: str, name: str) -> None:
    """Refused when the model already saved its state under `name` (a save that overwrites
    says so)."""
    path = checkpoint_path(model_id, CallKind.SAVE_WEIGHTS, name)
    taken = conn.execute(
        text("SELECT 1 FROM interactive_checkpoints WHERE path = :path AND tenant_id = :tenant"),
        {"path": path, "tenant": tenant_id},
    )
    if taken.first() is not None:
        raise Refused(f"{path} is taken: save under another name, or with overwrite", "path")


def _checkpoints(conn: Connection, where: str, params: dict[str, Any]) -> list[CheckpointRecord]:
    rows = conn.execute(
        text(
            f"SELECT {_CHECKPOINT_COLUMNS} FROM interactive_checkpoints c "
            f"JOIN interactive_models m ON m.id = c.model_id WHERE {where}"
        ),
        params,
    )
    return [CheckpointRecord.from_row(r) for r in rows]


_RUNS = """
    SELECT m.*, b.name AS base_name,
           coalesce((SELECT c.created_at FROM interactive_calls c WHERE c.model_id = m.id
                     ORDER BY c.seq DESC LIMIT 1), m.created_at) AS last_request_at
    FROM interactive_models m JOIN base_models b ON b.id = m.base_model_id
    WHERE m.tenant_id = :tenant AND m.kind = 'training'
"""


def _runs(conn: Connection, rows: list[Row[Any]]) -> list[RunRecord]:
    """Runs of `rows`, each with its newest state and sampler weights (one statement)."""
    ids = [r.id for r in rows]
    newest: dict[tuple[str, str], CheckpointRecord] = {}
    if ids:
        for saved in _checkpoints(
            conn,
            "c.model_id = ANY(:ids) ORDER BY c.created_at, c.id",
            {"ids": ids},
        ):
            newest[(saved.model_id, saved.kind)] = saved
    runs = []
    for row in rows:
        runs.append(
            RunRecord(
                model=ModelRecord.from_row(row),
                base_name=row.base_name,
                last_request_at=row.last_request_at,
                last_state=newest.get((row.id, "state")),
                last_sampler=newest.get((row.id, "sampler")),
            )
        )
    return runs


def get_run(conn: Connection, tenant_id: str, model_id: str) -> RunRecord:
    rows = list(
        conn.execute(text(_RUNS + " AND m.id = :id"), {"tenant": tenant_id, "id": model_id})
    )
    if not rows:
        raise NotFound("training_run", model_id)
    return _runs(conn, rows)[0]


def list_runs(
    conn: Connection, tenant_id: str, *, limit: int, offset: int
) -> tuple[list[RunRecord], int]:
    """A page of the tenant's training runs, newest first, and how many there are."""
    params = {"tenant": tenant_id, "limit": limit, "offset": offset}
    rows = list(
        conn.execute(
            text(_RUNS + " ORDER BY m.created_at DESC, m.id DESC LIMIT :limit OFFSET :offset"),
            params,
        )
    )
    total = conn.execute(
        text(
            "SELECT count(*) FROM interactive_models "
            "WHERE tenant_id = :tenant AND kind = 'training'"
        ),
        params,
    ).scalar_one()
    return _runs(conn, rows), int(total)


def run_checkpoints(conn: Connection, tenant_id: str, model_id: str) -> list[CheckpointRecord]:
    """Everything a training run saved, newest first; NotFound for a run not the tenant's."""
    get_run(conn, tenant_id, model_id)
    return _checkpoints(
        conn,
        "c.model_id = :model AND c.tenant_id = :tenant ORDER BY c.created_at DESC, c.id DESC",
        {"model": model_id, "tenant": tenant_id},
    )


def tenant_checkpoints(
    conn: Connection, tenant_id: str, *, limit: int, offset: int
) -> tuple[list[CheckpointRecord], int]:
    """A page of everything the tenant's runs saved, newest first, and how many there are."""
    params = {"tenant": tenant_id, "limit": limit, "offset": offset}
    page = _checkpoints(
        conn,
        "c.tenant_id = :tenant ORDER BY c.created_at DESC, c.id DESC LIMIT :limit OFFSET :offset",
        params,
    )
    total = conn.execute(
        text("SELECT count(*) FROM interactive_checkpoints WHERE tenant_id = :tenant"), params
    ).scalar_one()
    return page, int(total)


def set_ttl(conn: Connection, tenant_id: str, path: str, ttl_seconds: int | None) -> None:
    """The checkpoint expires `ttl_seconds` from now (None: never). The bounds
    (MIN_TTL_SECONDS to MAX_TTL_SECONDS) are the request schema's to check."""
    saved = find_checkpoint(conn, tenant_id, path, lock=True)
    conn.execute(
        text(
            "UPDATE interactive_checkpoints SET expires_at = "
            "now() + make_interval(secs => CAST(:ttl AS double precision)) WHERE id = :id"
        ),
        {"ttl": ttl_seconds, "id": saved.id},
    )


def set_public(conn: Connection, tenant_id: str, path: str, public: bool) -> bool:
    """Publish the tenant's checkpoint at `path` (every tenant of the platform may then load it,
    sample from it, read what it was trained on and download an export of it; only its owner
    changes or deletes it), or make it its own again. Asked again, it is as it was asked (the
    SDK retries a 409 until it gives up, so an answer lost and asked again must not be one).
    Refused for weights encrypted to their age recipients, which nobody else could read.
    Whether it changed."""
    saved = find_checkpoint(conn, tenant_id, path, lock=True)
    if public and saved.encrypted:
        raise Refused(
            f"{path} is encrypted to its age recipients, so nobody else could read it: publish "
            "a save_state or save_weights_for_sampler checkpoint",
            "checkpoint_id",
        )
    if saved.public == public:
        return False
    conn.execute(
        text("UPDATE interactive_checkpoints SET public = :public WHERE id = :id"),
        {"public": public, "id": saved.id},
    )
    return True


def delete_checkpoint(conn: Connection, store: ObjectStore, tenant_id: str, path: str) -> None:
    """Delete the tenant's checkpoint at `path`: its objects, then its row (not committed: a
    store that fails leaves the row, and deleting again finishes the job). A version published
    from it keeps its own copy."""
    saved = find_checkpoint(conn, tenant_id, path, lock=True)
    store.delete_prefix(saved.storage_prefix)
    conn.execute(text("DELETE FROM interactive_checkpoints WHERE id = :id"), {"id": saved.id})


def expire_checkpoints(engine: Engine, store: ObjectStore) -> int:
    """Delete every checkpoint past its `expires_at`, objects then row, a batch a transaction
    (SKIP LOCKED: two passes at once share the work); how many were deleted."""
    deleted = 0
    while True:
        with engine.begin() as conn:
            due = conn.execute(
                text(
                    "SELECT id, path, storage_prefix, tenant_id, model_id "
                    "FROM interactive_checkpoints "
                    "WHERE expires_at <= now() ORDER BY expires_at LIMIT :batch "
                    "FOR UPDATE SKIP LOCKED"
                ),
                {"batch": EXPIRE_BATCH},
            ).all()
            for row in due:
                store.delete_prefix(row.storage_prefix)
                conn.execute(
                    text("DELETE FROM interactive_checkpoints WHERE id = :id"), {"id": row.id}
                )
                about = {"tinker_path": row.path, "model_id": row.model_id}
                audit.record(conn, row.tenant_id, "checkpoint_expired", None, **about)
                log.info("deleted the expired checkpoint %s", row.path)
        deleted += len(due)
        if len(due) < EXPIRE_BATCH:
            return deleted


def list_sessions(
    conn: Connection, tenant_id: str, *, limit: int, offset: int
) -> tuple[list[str], int]:
    """A page of the tenant's session ids, newest first, and how many there are."""
    params = {"tenant": tenant_id, "limit": limit, "offset": offset}
    ids = conn.execute(
        text(
            "SELECT id FROM interactive_sessions WHERE tenant_id = :tenant "
            "ORDER BY created_at DESC, id DESC LIMIT :limit OFFSET :offset"
        ),
        params,
    ).scalars()
    total = conn.execute(
        text("SELECT count(*) FROM interactive_sessions WHERE tenant_id = :tenant"), params
    ).scalar_one()
    return list(ids), int(total)


@dataclass(frozen=True)
class SessionContents:
    training_run_ids: list[str]
    sampler_ids: list[str]
    user_metadata: dict[str, Any]
    display_name: str | None


def session_contents(conn: Connection, tenant_id: str, session_id: str) -> SessionContents:
    """The session's training runs and samplers, in the order they were made."""
    _session(conn, tenant_id, session_id)
    metadata, name = conn.execute(
        text("SELECT user_metadata, display_name FROM interactive_sessions WHERE id = :id"),
        {"id": session_id},
    ).one()
    rows = conn.execute(
        text(
            "SELECT id, kind FROM interactive_models WHERE session_id = :id ORDER BY created_at, id"
        ),
        {"id": session_id},
    ).all()
    return SessionContents(
        training_run_ids=[r.id for r in rows if r.kind == ModelKind.TRAINING],
        sampler_ids=[r.id for r in rows if r.kind == ModelKind.SAMPLER],
        user_metadata=dict(metadata or {}),
        display_name=name,
    )
