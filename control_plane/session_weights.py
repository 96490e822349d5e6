"""The weights an interactive session reads: saved ones, or an adapter version of the registry.

A session loads and samples weights it (or a tenant that published them) saved, by their
tinker:// path (`interactive_runs.find_checkpoint`). A fine-tuning job's adapter
(`fine_tuned_model`, `name@3`) is a PEFT directory in the registry, which an executor loads as
it loads saved weights, so the Tinker SDK may name one wherever it names weights to read:
`create_sampling_client(model_path=...)`, `create_training_client_from_state(...)` and a
training client's `load_state(...)` take `tinker://adapters/` followed by a reference as
`continue_from` takes it (`name`, `name@3`, `name@prod`, `name@latest`). A version is its
tenant's only, and holds no optimizer state. What reads one is pinned to the version its
reference named when it was asked for (`pinned`): a sampler keeps it, and a load's call carries
it to the executor, so an alias moved meanwhile changes nothing asked before. A model records the
version its weights descend from (`interactive_models.weights_version_id`, as a load completes:
the version loaded, or the one the tenant's own save loaded came from), each save the model's
(`from_version_id`), and a version published from that save descends from it.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, text

from control_plane.base_catalog import get_base_model
from control_plane.interactive import (
    CallKind,
    ModelKind,
    ModelRecord,
    NotFound,
    Refused,
    _insert_call,
    _new_model,
    _session,
    get_model,
    ready_base,
    require_served,
)
from control_plane.interactive_runs import CheckpointRecord, find_checkpoint, require_room
from control_plane.registry import (
    AdapterVersionRecord,
    RegistryError,
    model_id,
    parse_ref,
    resolve_version,
)

PREFIX = "tinker://adapters/"
# A version read as saved weights (`CheckpointRecord.kind`).
ADAPTER_VERSION = "adapter_version"


def is_adapter_path(path: str) -> bool:
    """Whether `path` names an adapter version rather than a session's saved weights."""
    return path.startswith(PREFIX)


def pinned(version: AdapterVersionRecord) -> str:
    """The path of this very version (`tinker://adapters/name@3`)."""
    return PREFIX + model_id(version.adapter_name, version.number)


def find(conn: Connection, tenant_id: str, path: str, *, shared: bool) -> CheckpointRecord:
    """The weights at `path`: the tenant's saved ones (with `shared`, published ones too), or
    the tenant's adapter version a `tinker://adapters/` path names, as saved weights at its
    pinned path (read only: nothing changes or deletes a version through it); NotFound."""
    if not is_adapter_path(path):
        return find_checkpoint(conn, tenant_id, path, shared=shared)
    try:
        version = resolve_version(conn, tenant_id, *parse_ref(path.removeprefix(PREFIX)))
    except RegistryError:  # malformed, missing, or another tenant's: the same not-found
        raise NotFound(ADAPTER_VERSION, path) from None
    return CheckpointRecord(
        id=version.id,
        model_id=version.model_id,
        tenant_id=version.tenant_id,
        kind=ADAPTER_VERSION,
        name=str(version.number),
        path=pinned(version),
        storage_prefix=version.object_prefix,
        created_at=version.created_at,
        size_bytes=sum(int(f.get("size") or 0) for f in version.files),
        expires_at=None,
        user_metadata={},
        published_version_id=version.id,
        session_id="",
        base_model_id=version.base_model_id,
        lora_config=_lora_config(version),
        files=None,
        public=False,
        from_version_id=version.id,
    )


def _lora_config(version: AdapterVersionRecord) -> dict[str, Any]:
    """The version's LoRA settings as a run's: the session's own where it was published from
    one, else the job's rank (a job's adapter has no `train_*` switches: it names modules)."""
    lora = version.lineage.get("lora")
    if isinstance(lora, dict):
        return dict(lora)
    rank = (version.lineage.get("hyperparameters") or {}).get("lora_rank")
    return {"rank": rank} if isinstance(rank, int) else {}


def load_request(
    saved: CheckpointRecord, request: dict[str, Any], tenant_id: str
) -> dict[str, Any]:
    """A load call's request for `saved`: its pinned path, and the adapter version its weights
    descend from (the executor records it on the model once loaded): the version itself, or
    the one a save of the tenant's own came from; none from another tenant's published save."""
    version: str | None
    if saved.kind == ADAPTER_VERSION:
        version = saved.id
    else:
        version = saved.from_version_id if saved.tenant_id == tenant_id else None
    return {**request, "path": saved.path, "adapter_version_id": version}


def refuse_optimizer(path: str, optimizer: bool) -> None:
    """A version holds no optimizer state: asking for it is refused before anything is
    written (Adam starts afresh with `create_training_client_from_state` or `load_state`)."""
    if optimizer and is_adapter_path(path):
        raise Refused(
            f"{path} is an adapter version, which holds weights and no optimizer state: load "
            "it without the optimizer (create_training_client_from_state, or load_state)",
            "optimizer",
        )


def check_loadable(
    conn: Connection, tenant_id: str, model_id: str, path: str, *, shared: bool
) -> CheckpointRecord:
    """The model can load the weights at `path`: the tenant's (or, with `shared`, published),
    saved on the model's base; they are returned."""
    model = get_model(conn, tenant_id, model_id)
    saved = find(conn, tenant_id, path, shared=shared)
    if saved.base_model_id != model.base_model_id:
        raise Refused(f"{path} was saved from a model on another base than {model_id}'s", "path")
    return saved


def create_from_state(
    conn: Connection,
    tenant_id: str,
    session_id: str,
    model_seq_id: int,
    *,
    path: str,
    base_name: str | None,
    user_metadata: dict[str, Any] | None,
    request: dict[str, Any],
    lease_seconds: float,
    limit: int,
    shared: bool = False,
) -> tuple[ModelRecord, str, CheckpointRecord | None]:
    """A training run of the session started from the weights saved at `path` (the SDK's
    `create_training_client_from_state`): its id is the one the SDK derives,
    `<session>:train:<model_seq_id>`, its LoRA config the checkpoint's, and its first call
    (seq 0) loads them. Sent again (its answer lost), the same run and future. OverLimit when
    the tenant holds as many loaded training models as its cap (its own, else `limit`, the
    platform's default). With `shared`, another tenant's published state may be the start. The
    checkpoint it starts from is the third part, None when the run was made already."""
    _session(conn, tenant_id, session_id)
    model_id = f"{session_id}:train:{model_seq_id}"
    existing = conn.execute(
        text(
            "SELECT c.id FROM interactive_models m JOIN interactive_calls c "
            "ON c.model_id = m.id AND c.seq = 0 WHERE m.id = :id AND m.tenant_id = :tenant"
        ),
        {"id": model_id, "tenant": tenant_id},
    ).scalar_one_or_none()
    if existing is not None:
        return get_model(conn, tenant_id, model_id), str(existing), None
    require_room(conn, tenant_id, limit)
    saved = find(conn, tenant_id, path, shared=shared)
    if base_name is not None:
        named = get_base_model(conn, base_name)
        if named is None or named.id != saved.base_model_id:
            raise Refused(
                f"{path} was trained on another base than {base_name!r}: leave base_model out "
                "to resume on the checkpoint's own",
                "base_model",
            )
    require_served(conn, saved.base_model_id, lease_seconds)
    model = _new_model(
        conn,
        tenant_id,
        session_id,
        saved.base_model_id,
        ModelKind.TRAINING,
        lora_config=saved.lora_config,
        next_seq=1,
        model_id=model_id,
        user_metadata=user_metadata,
    )
    asked = load_request(saved, request, tenant_id)
    call = _insert_call(conn, model, 0, CallKind.LOAD_WEIGHTS, asked)
    return model, call, saved


def create_sampler(
    conn: Connection,
    tenant_id: str,
    session_id: str,
    *,
    base_name: str | None,
    model_path: str | None,
    lease_seconds: float,
    shared: bool = False,
) -> tuple[ModelRecord, CheckpointRecord | None]:
    """A sampler of the session: on the sampler weights at `model_path` (the tenant's, or with
    `shared` published ones; or an adapter version, pinned; on the base they were trained on),
    or on the base alone. The weights it samples are the second part (None: the base's)."""
    _session(conn, tenant_id, session_id)
    saved = None
    if model_path is None:
        assert base_name is not None, "a sampler needs model_path or base_name"
        base_id = ready_base(conn, base_name).id
    else:
        try:
            saved = find(conn, tenant_id, model_path, shared=shared)
        except NotFound as missing:
            kind = missing.kind.replace("checkpoint", "sampler_checkpoint")
            raise NotFound(kind, model_path) from None
        if saved.kind not in ("sampler", ADAPTER_VERSION):  # a state or an export: not these
            raise NotFound("sampler_checkpoint", model_path)
        base_id = saved.base_model_id
        if base_name is not None and ready_base(conn, base_name).id != base_id:
            raise Refused(
                f"{model_path} was trained on another base than {base_name!r}; leave base_model "
                "out to sample on the checkpoint's own",
                "base_model",
            )
    require_served(conn, base_id, lease_seconds)
    sampler = _new_model(
        conn,
        tenant_id,
        session_id,
        base_id,
        ModelKind.SAMPLER,
        model_path=saved.path if saved is not None else None,
    )
    return sampler, saved
