"""/api/v1, what the `tinker` SDK's `RestClient` looks up and changes: a tenant's training runs,
their checkpoints, sessions, what saved weights were trained on, a checkpoint's deletion and its
time to live (`control_plane.interactive_runs`); and what its checkpoints hold in storage, as the
SDK's `AdminClient` asks for it (`control_plane.interactive_storage`).

Any live key of the tenant reads (a reader's too: these change nothing); deleting a checkpoint,
setting when it expires or publishing it takes a writer's. A published checkpoint is read by
every tenant by its path (loaded, sampled from, described by `weights_info`, its export
downloaded), where the platform lets checkpoints be published
(`LORAFORGE_TINKER_PUBLIC_CHECKPOINTS`); the lists stay each tenant's own. A checkpoint is named as the SDK names it, by its
run and `weights/<name>`, `sampler_weights/<name>` or `external_weights/<name>`. Projects and
other accounts' checkpoints are not offered: asking for them is a 400 that says so, never an
answer that ignores them.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Response
from sqlalchemy import Connection

from control_plane import audit, interactive_runs, interactive_storage, session_weights
from control_plane.api.deps import Caller, ConnDep, ServicesDep, Writer
from control_plane.api.errors import ApiError
from control_plane.api.routes.tinker import domain_errors
from control_plane.api.tinker_schemas import (
    Checkpoint,
    CheckpointsList,
    CheckpointStorageItem,
    CheckpointStorageUsage,
    CheckpointTtl,
    Cursor,
    SessionInfo,
    SessionList,
    TrainingRun,
    TrainingRuns,
    WeightsInfo,
    WeightsPath,
)
from control_plane.base_catalog import get_base_model
from control_plane.interactive_runs import CheckpointRecord, RunRecord
from control_plane.interactive_saves import SDK_TYPES, SEGMENTS
from control_plane.storage import ObjectStoreUnavailableError
from control_plane.tenants import Principal

router = APIRouter(prefix="/api/v1", tags=["tinker"], include_in_schema=False)

Limit = Annotated[int, Query(ge=1, le=1000)]
Offset = Annotated[int, Query(ge=0)]
Scope = Annotated[Literal["owned", "accessible"], Query()]


def _checkpoint(saved: CheckpointRecord) -> Checkpoint:
    return Checkpoint(
        checkpoint_id=f"{SEGMENTS[saved.kind]}/{saved.name}",
        checkpoint_type=SDK_TYPES[saved.kind],
        time=saved.created_at,
        tinker_path=saved.path,
        size_bytes=saved.size_bytes,
        expires_at=saved.expires_at,
        user_metadata=saved.user_metadata or None,
        training_run_id=saved.model_id,
        published_version_id=saved.published_version_id,
        public=saved.public,
    )


def _run(run: RunRecord) -> TrainingRun:
    model = run.model
    rank = model.lora_config.get("rank")
    return TrainingRun(
        training_run_id=model.id,
        base_model=run.base_name,
        model_owner=model.tenant_id,
        lora_rank=int(rank) if rank is not None else None,
        last_request_time=run.last_request_at,
        last_checkpoint=_checkpoint(run.last_state) if run.last_state else None,
        last_sampler_checkpoint=_checkpoint(run.last_sampler) if run.last_sampler else None,
        user_metadata=model.user_metadata or None,
        session_id=model.session_id,
        loaded=model.unloaded_at is None,
    )


def _no_projects(project_id: str | None, together: str = "runs are listed") -> None:
    if project_id is not None:
        raise ApiError(
            400,
            "invalid_request",
            f"loraforge has no projects: a tenant's {together} together (leave project_id out)",
            "project_id",
        )


def checkpoint_path(run_id: str, segment: str, name: str) -> str:
    """The tinker:// path of a checkpoint the SDK names by its run and `<segment>/<name>`."""
    if segment not in SEGMENTS.values():
        raise ApiError(
            404,
            "checkpoint_not_found",
            f"no checkpoint {segment}/{name} of {run_id}: a checkpoint id is weights/<name>, "
            "sampler_weights/<name> or external_weights/<name>",
            "checkpoint_id",
        )
    return f"tinker://{run_id}/{segment}/{name}"


@router.get("/training_runs")
def list_training_runs(
    conn: ConnDep,
    caller: Caller,
    limit: Limit = 20,
    offset: Offset = 0,
    access_scope: Scope = "owned",
    project_id: str | None = None,
) -> TrainingRuns:
    """The tenant's training runs, newest first (`accessible` is `owned`: nothing is shared)."""
    _no_projects(project_id)
    runs, total = interactive_runs.list_runs(conn, caller.tenant_id, limit=limit, offset=offset)
    return TrainingRuns(
        training_runs=[_run(r) for r in runs],
        cursor=Cursor(offset=offset, limit=limit, total_count=total),
    )


@router.get("/training_runs/{run_id}")
def get_training_run(run_id: str, conn: ConnDep, caller: Caller) -> TrainingRun:
    with domain_errors():
        return _run(interactive_runs.get_run(conn, caller.tenant_id, run_id))


@router.get("/training_runs/{run_id}/checkpoints")
def list_run_checkpoints(run_id: str, conn: ConnDep, caller: Caller) -> CheckpointsList:
    with domain_errors():
        saved = interactive_runs.run_checkpoints(conn, caller.tenant_id, run_id)
    return CheckpointsList(checkpoints=[_checkpoint(c) for c in saved])


@router.delete("/training_runs/{run_id}/checkpoints/{segment}/{name}", status_code=204)
def delete_checkpoint(
    run_id: str, segment: str, name: str, conn: ConnDep, caller: Writer, services: ServicesDep
) -> Response:
    """The checkpoint's files and its row; a version published from it keeps its own copy."""
    path = checkpoint_path(run_id, segment, name)
    with domain_errors():
        try:
            interactive_runs.delete_checkpoint(conn, services.store, caller.tenant_id, path)
            audit.record(
                conn,
                caller.tenant_id,
                "checkpoint_deleted",
                caller,
                tinker_path=path,
                model_id=run_id,
            )
        except ObjectStoreUnavailableError as exc:
            raise ApiError(
                503,
                "object_store_unavailable",
                f"{path} was not deleted: the object store failed ({exc}); delete it again",
            ) from None
    conn.commit()
    return Response(status_code=204)


@router.put("/training_runs/{run_id}/checkpoints/{segment}/{name}/ttl", status_code=204)
def set_checkpoint_ttl(
    run_id: str, segment: str, name: str, body: CheckpointTtl, conn: ConnDep, caller: Writer
) -> Response:
    """The checkpoint expires `ttl_seconds` from now (the platform deletes it then), or never."""
    path = checkpoint_path(run_id, segment, name)
    with domain_errors():
        interactive_runs.set_ttl(conn, caller.tenant_id, path, body.ttl_seconds)
    ttl = body.ttl_seconds
    audit.record(
        conn, caller.tenant_id, "checkpoint_ttl_set", caller, tinker_path=path, ttl_seconds=ttl
    )
    conn.commit()
    return Response(status_code=204)


@router.post("/training_runs/{run_id}/checkpoints/{segment}/{name}/publish", status_code=204)
def publish_checkpoint(
    run_id: str, segment: str, name: str, conn: ConnDep, caller: Writer, services: ServicesDep
) -> Response:
    """Every tenant of the platform may now load the checkpoint, sample from it, read what it
    was trained on and download its export, by its path; only its owner changes it."""
    if not services.settings.tinker_public_checkpoints:
        raise ApiError(
            403,
            "publishing_disabled",
            "this platform does not let checkpoints be published "
            "(LORAFORGE_TINKER_PUBLIC_CHECKPOINTS is off): ask its operator",
        )
    return _set_public(conn, caller, checkpoint_path(run_id, segment, name), True)


@router.delete("/training_runs/{run_id}/checkpoints/{segment}/{name}/publish", status_code=204)
def unpublish_checkpoint(
    run_id: str, segment: str, name: str, conn: ConnDep, caller: Writer
) -> Response:
    """The checkpoint is its tenant's alone again: other tenants' samplers and runs made from it
    keep what they loaded, and cannot load it again."""
    return _set_public(conn, caller, checkpoint_path(run_id, segment, name), False)


def _set_public(conn: Connection, caller: Principal, path: str, public: bool) -> Response:
    with domain_errors():
        changed = interactive_runs.set_public(conn, caller.tenant_id, path, public)
    if changed:
        event = "checkpoint_published" if public else "checkpoint_unpublished"
        audit.record(conn, caller.tenant_id, event, caller, tinker_path=path)
    conn.commit()
    return Response(status_code=204)


@router.get("/checkpoints")
def list_checkpoints(
    conn: ConnDep, caller: Caller, limit: Limit = 100, offset: Offset = 0
) -> CheckpointsList:
    """Everything the tenant's runs saved, newest first."""
    saved, total = interactive_runs.tenant_checkpoints(
        conn, caller.tenant_id, limit=limit, offset=offset
    )
    return CheckpointsList(
        checkpoints=[_checkpoint(c) for c in saved],
        cursor=Cursor(offset=offset, limit=limit, total_count=total),
    )


@router.post("/weights_info")
def weights_info(
    body: WeightsPath, conn: ConnDep, caller: Caller, services: ServicesDep
) -> WeightsInfo:
    """What the weights at a path were trained on (the SDK reads it to resume from them)."""
    shared = services.settings.tinker_public_checkpoints
    with domain_errors():
        saved = session_weights.find(conn, caller.tenant_id, body.tinker_path, shared=shared)
    audit.checkpoint_read(conn, caller, saved, "weights_info")
    conn.commit()
    config = saved.lora_config
    base = get_base_model(conn, saved.base_model_id)
    assert base is not None, "a model's base is never deleted (foreign key)"
    rank = config.get("rank")
    return WeightsInfo(
        base_model=base.name,
        lora_rank=int(rank) if rank is not None else None,
        train_unembed=config.get("train_unembed"),
        train_mlp=config.get("train_mlp"),
        train_attn=config.get("train_attn"),
    )


@router.get("/sessions")
def list_sessions(
    conn: ConnDep,
    caller: Caller,
    limit: Limit = 20,
    offset: Offset = 0,
    access_scope: Scope = "owned",
) -> SessionList:
    ids, total = interactive_runs.list_sessions(conn, caller.tenant_id, limit=limit, offset=offset)
    return SessionList(sessions=ids, cursor=Cursor(offset=offset, limit=limit, total_count=total))


@router.get("/sessions/{session_id}")
def get_session(session_id: str, conn: ConnDep, caller: Caller) -> SessionInfo:
    with domain_errors():
        found = interactive_runs.session_contents(conn, caller.tenant_id, session_id)
    return SessionInfo(
        training_run_ids=found.training_run_ids,
        sampler_ids=found.sampler_ids,
        user_metadata=found.user_metadata or None,
        display_name=found.display_name,
    )


@router.get("/billing/usage/checkpoints/current")
def checkpoint_storage(
    conn: ConnDep, caller: Caller, project_id: str | None = None
) -> CheckpointStorageUsage:
    """What the tenant's checkpoints hold now (the SDK's `AdminClient`
    `get_current_checkpoint_storage_usage`): one item, the tenant's, current to the last save or
    deletion. loraforge prices nothing, so the rate and the cost are null."""
    _no_projects(project_id, "checkpoints are counted")
    used = interactive_storage.storage(conn, caller.tenant_id)
    return CheckpointStorageUsage(
        data=[
            CheckpointStorageItem(
                user_name=used.tenant_name,
                checkpoint_count=used.checkpoints,
                size_bytes=used.size_bytes,
                # The SDK documents this only as the bytes "converted to the storage billing
                # unit", the GB of its per-GB-month rate, and names no factor: storage is billed
                # in decimal gigabytes, 10^9 bytes, as `control_plane.sizes` counts them.
                size_gigabytes=used.size_bytes / 10**9,
            )
        ]
    )
