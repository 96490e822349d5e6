"""Interactive sessions (Tinker-compatible): what the API asks for, as rows the executors run.

A tenant's session creates LoRA models on a ready base (`training`), or samplers on a saved
adapter or on the base alone (`sampler`). Each thing asked of a model is a call row, the future
the SDK polls: `enqueue` gives it the model's next `seq` under the model row's lock, so a
model's calls are strictly ordered, and announces it on `interactive_calls` so that an idle
executor holding the base wakes (`control_plane.interactive_calls` is the executors' side).
Every function takes the caller's tenant and finds only that tenant's rows (and, where asked,
checkpoints other tenants published); none commits.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, fields
from datetime import datetime
from enum import StrEnum
from typing import Any, cast

from sqlalchemy import Connection, Table, func, insert, select, text, update

from control_plane import trainers
from control_plane.base_catalog import get_base_model, list_base_models
from control_plane.base_status import BaseStatus
from control_plane.db.tables import (
    InteractiveCall,
    InteractiveCheckpoint,
    InteractiveModel,
    InteractiveSession,
)
from control_plane.ids import new_id
from control_plane.interactive_calls import CHANNEL
from control_plane.interactive_health import unserved
from control_plane.interactive_saves import checkpoint_path
from control_plane.records import BaseModelRecord, _FromRow

sessions = cast(Table, InteractiveSession.__table__)
models = cast(Table, InteractiveModel.__table__)
calls = cast(Table, InteractiveCall.__table__)
checkpoints = cast(Table, InteractiveCheckpoint.__table__)


# The most top-k logprobs a sample returns a position (`topk_prompt_logprobs`,
# `topk_sample_logprobs`): 20, vLLM's default `max_logprobs`, the most a vLLM server returns
# unless it is started with more.
MAX_TOPK_LOGPROBS = 20


class CallKind(StrEnum):
    CREATE_MODEL = "create_model"
    FORWARD_BACKWARD = "forward_backward"
    FORWARD = "forward"
    OPTIM_STEP = "optim_step"
    SAVE_WEIGHTS = "save_weights"
    SAVE_WEIGHTS_FOR_SAMPLER = "save_weights_for_sampler"
    SAVE_WEIGHTS_EXTERNAL = "save_weights_external"
    LOAD_WEIGHTS = "load_weights"
    SAMPLE = "sample"
    UNLOAD_MODEL = "unload_model"


class CallStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


class ModelKind(StrEnum):
    TRAINING = "training"
    SAMPLER = "sampler"


class NotFound(Exception):
    """No such row in the caller's tenant: `kind` is what was looked for, `ident` by what."""

    def __init__(self, kind: str, ident: str) -> None:
        super().__init__(f"No {kind.replace('_', ' ')} with id {ident!r}")
        self.kind = kind
        self.ident = ident


class ModelUnloaded(Exception):
    """The model was unloaded (by the SDK, its session's end, or its executor stopping)."""


class Refused(Exception):
    """A call that cannot be taken as asked; the text says what to change, `param` where."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ModelRecord(_FromRow):
    id: str
    session_id: str
    tenant_id: str
    base_model_id: str
    kind: str
    lora_config: dict[str, Any]
    model_path: str | None
    next_seq: int
    created_at: datetime
    unloaded_at: datetime | None
    user_metadata: dict[str, Any]


@dataclass(frozen=True)
class CallRecord(_FromRow):
    id: str
    model_id: str
    tenant_id: str
    seq: int
    kind: str
    request: dict[str, Any]
    status: str
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    payload_dropped_at: datetime | None  # its request and answer let go (kept an hour)
    partial: dict[str, Any] | None  # a streamed chat's text so far, while it runs

    @property
    def finished(self) -> bool:
        return self.status in (CallStatus.COMPLETED, CallStatus.FAILED)


def ready_base(conn: Connection, name_or_id: str) -> BaseModelRecord:
    """A base that takes interactive models (`ready`), by name or id; NotFound otherwise."""
    base = get_base_model(conn, name_or_id)
    if base is None or base.status != BaseStatus.READY:
        raise NotFound("base_model", name_or_id)
    return base


def served_bases(conn: Connection, lease_seconds: float) -> list[BaseModelRecord]:
    """The ready bases a live executor holds resident: where a model's calls will run."""
    served = trainers.served_bases(conn, lease_seconds)
    return [b for b in list_base_models(conn) if b.status == BaseStatus.READY and b.name in served]


def require_served(conn: Connection, base_id: str, lease_seconds: float) -> None:
    """Refuse a model on a base that no live executor holds: its calls would wait for ever.
    (A base whose executor stops later has its training models' calls answered by
    `release_lost`, and its samplers' calls wait for the next executor of the base.)"""
    served = served_bases(conn, lease_seconds)
    if any(b.id == base_id for b in served):
        return
    base = get_base_model(conn, base_id)
    name = base.name if base is not None else base_id
    running = ", ".join(sorted(b.name for b in served)) or "none"
    raise Refused(f"{unserved(name)} (bases served: {running})", "base_model")


def _session(conn: Connection, tenant_id: str, session_id: str) -> None:
    found = conn.execute(
        select(sessions.c.id).where(sessions.c.id == session_id, sessions.c.tenant_id == tenant_id)
    ).scalar_one_or_none()
    if found is None:
        raise NotFound("session", session_id)


def _new_model(
    conn: Connection,
    tenant_id: str,
    session_id: str,
    base_model_id: str,
    kind: ModelKind,
    *,
    lora_config: dict[str, Any] | None = None,
    model_path: str | None = None,
    next_seq: int = 0,
    model_id: str | None = None,
    user_metadata: dict[str, Any] | None = None,
) -> ModelRecord:
    row = conn.execute(
        insert(models)
        .values(
            id=model_id or new_id("interactive_model"),
            user_metadata=user_metadata or {},
            session_id=session_id,
            tenant_id=tenant_id,
            base_model_id=base_model_id,
            kind=kind,
            lora_config=lora_config or {},
            model_path=model_path,
            next_seq=next_seq,
        )
        .returning(*models.c)
    ).one()
    return ModelRecord.from_row(row)


def _insert_call(
    conn: Connection, model: ModelRecord, seq: int, kind: CallKind, request: dict[str, Any]
) -> str:
    call_id = new_id("interactive_call")
    client_seq = request.get("seq_id")
    conn.execute(
        insert(calls).values(
            id=call_id,
            model_id=model.id,
            tenant_id=model.tenant_id,
            base_model_id=model.base_model_id,
            seq=seq,
            kind=kind,
            request=request,
            client_seq=client_seq if isinstance(client_seq, int) else None,
        )
    )
    # Delivered at commit, so an executor never wakes for a call it cannot see yet.
    conn.execute(
        text("SELECT pg_notify(:channel, :base)"), {"channel": CHANNEL, "base": model.base_model_id}
    )
    return call_id


def create_model(
    conn: Connection,
    tenant_id: str,
    session_id: str,
    base: BaseModelRecord,
    lora_config: dict[str, Any],
    request: dict[str, Any],
) -> tuple[ModelRecord, str]:
    """A training model of the session on `base` and its first call (`create_model`, seq 0),
    which gives it fresh LoRA weights on the executor that takes it: (the model, that future)."""
    _session(conn, tenant_id, session_id)
    model = _new_model(
        conn,
        tenant_id,
        session_id,
        base.id,
        ModelKind.TRAINING,
        lora_config=lora_config,
        next_seq=1,
        user_metadata=request.get("user_metadata"),
    )
    return model, _insert_call(conn, model, 0, CallKind.CREATE_MODEL, request)


def get_model(conn: Connection, tenant_id: str, model_id: str) -> ModelRecord:
    row = conn.execute(
        select(models).where(models.c.id == model_id, models.c.tenant_id == tenant_id)
    ).one_or_none()
    if row is None:
        raise NotFound("model", model_id)
    return ModelRecord.from_row(row)


def enqueue(
    conn: Connection,
    tenant_id: str,
    model_id: str,
    kind: CallKind,
    request: dict[str, Any],
    *,
    client_seq: int | None = None,
) -> str:
    """Ask `kind` of the model, after everything asked of it before: the new call's future id.

    The SDK numbers a training model's calls itself (`seq_id`: 1, 2, ... after the create), as
    this does. A `client_seq` already taken is a request sent again after its answer was lost:
    the call it made is answered rather than run twice (gradients would be added twice)."""
    row = conn.execute(
        select(models)
        .where(models.c.id == model_id, models.c.tenant_id == tenant_id)
        .with_for_update()
    ).one_or_none()
    if row is None:
        raise NotFound("model", model_id)
    model = ModelRecord.from_row(row)
    if model.unloaded_at is not None:
        raise ModelUnloaded(f"model {model_id} was unloaded; create a new model")
    if model.kind == ModelKind.SAMPLER and kind not in (CallKind.SAMPLE, CallKind.UNLOAD_MODEL):
        raise Refused(f"model {model_id} is a sampler: it only samples", "model_id")
    if client_seq is not None and model.kind == ModelKind.TRAINING and client_seq < model.next_seq:
        return _replayed(conn, model, client_seq, kind)
    seq = conn.execute(
        update(models)
        .where(models.c.id == model_id)
        .values(next_seq=models.c.next_seq + 1)
        .returning(models.c.next_seq - 1)
    ).scalar_one()
    return _insert_call(conn, model, seq, kind, request)


def _replayed(conn: Connection, model: ModelRecord, seq: int, kind: CallKind) -> str:
    found = conn.execute(
        select(calls.c.id, calls.c.kind).where(calls.c.model_id == model.id, calls.c.seq == seq)
    ).one_or_none()
    if found is None or found.kind != kind:
        raise Refused(
            f"seq_id {seq} was taken by another call: the next is {model.next_seq}", "seq_id"
        )
    return str(found.id)


def save_for_sampler(
    conn: Connection,
    tenant_id: str,
    model_id: str,
    request: dict[str, Any],
    *,
    client_seq: int | None,
) -> tuple[str, str | None]:
    """Save the model's adapter for sampling: (future id, sampler id). Without a name (the SDK's
    `save_weights_and_get_sampling_client`) the weights get one of their own, and a sampler of
    the model's session on them comes with the call: the SDK asks for it only once the save is
    answered, when the weights are there."""
    model = get_model(conn, tenant_id, model_id)
    replayed = client_seq is not None and client_seq < model.next_seq
    if request.get("path") is not None or replayed:
        future = enqueue(
            conn,
            tenant_id,
            model_id,
            CallKind.SAVE_WEIGHTS_FOR_SAMPLER,
            request,
            client_seq=client_seq,
        )
        return future, None
    name = f"ephemeral-{secrets.token_hex(8)}"
    path = checkpoint_path(model_id, CallKind.SAVE_WEIGHTS_FOR_SAMPLER, name)
    sampler = _new_model(
        conn, tenant_id, model.session_id, model.base_model_id, ModelKind.SAMPLER, model_path=path
    )
    request = {**request, "path": name, "sampling_session_id": sampler.id}
    future = enqueue(
        conn, tenant_id, model_id, CallKind.SAVE_WEIGHTS_FOR_SAMPLER, request, client_seq=client_seq
    )
    return future, sampler.id


def unload(conn: Connection, tenant_id: str, model_id: str) -> str:
    """Let the model's weights go: its last call (`unload_model`), after which it takes none."""
    future = enqueue(conn, tenant_id, model_id, CallKind.UNLOAD_MODEL, {})
    conn.execute(update(models).where(models.c.id == model_id).values(unloaded_at=func.now()))
    return future


def retrieve(conn: Connection, tenant_id: str, future_id: str) -> CallRecord:
    row = conn.execute(
        select(calls).where(calls.c.id == future_id, calls.c.tenant_id == tenant_id)
    ).one_or_none()
    if row is None:
        raise NotFound("future", future_id)
    return CallRecord.from_row(row)


# A streamed chat's reply so far with each choice's logprobs entries past `:past[i]` of them only
# (the array slice copied, not its elements read), and how many each choice stores (`stored`).
_PAST = """
    CASE WHEN c.partial ? 'logprobs' THEN (c.partial - 'logprobs') || jsonb_build_object(
        'logprobs', (
            SELECT coalesce(jsonb_agg(jsonb_path_query_array(l.entries, CAST(format(
                '$[%s to last]', coalesce((CAST(:past AS int[]))[l.i], 0)) AS jsonpath))
                ORDER BY l.i), '[]'::jsonb)
            FROM jsonb_array_elements(c.partial -> 'logprobs') WITH ORDINALITY AS l(entries, i)
        ),
        'stored', (
            SELECT coalesce(jsonb_agg(jsonb_array_length(l.entries) ORDER BY l.i), '[]'::jsonb)
            FROM jsonb_array_elements(c.partial -> 'logprobs') WITH ORDINALITY AS l(entries, i)
        )
    ) ELSE c.partial END"""
_PARTIAL_PAST = text(
    f"SELECT {', '.join(f'c.{f.name}' for f in fields(CallRecord) if f.name != 'partial')}, "
    f"{_PAST} AS partial FROM interactive_calls c WHERE c.id = :id AND c.tenant_id = :tenant"
)


def retrieve_past(conn: Connection, tenant_id: str, future_id: str, past: list[int]) -> CallRecord:
    """The call, as `retrieve` reads it, but with a streamed chat's reply so far holding each
    choice's logprobs entries past the first `past[i]` only (those its stream sent) and how many
    it stores (`stored`): a long reply's entries are sent to the API once, not at every look."""
    row = conn.execute(_PARTIAL_PAST, {"id": future_id, "tenant": tenant_id, "past": past}).first()
    if row is None:
        raise NotFound("future", future_id)
    return CallRecord.from_row(row)


# A withdrawn call's error: no executor refused it.
WITHDRAWN = "cancelled by the client"


def cancel(conn: Connection, tenant_id: str, future_id: str) -> bool:
    """Fail a call no executor took yet (`pending → failed`, a user error): True if it was."""
    error = {"error": WITHDRAWN, "category": "user"}
    cancelled = conn.execute(
        update(calls)
        .where(calls.c.id == future_id, calls.c.tenant_id == tenant_id)
        .where(calls.c.status == CallStatus.PENDING)
        .values(status=CallStatus.FAILED, error=error, finished_at=func.now())
    ).rowcount
    if not cancelled:
        retrieve(conn, tenant_id, future_id)  # NotFound for another tenant's
    return bool(cancelled)
