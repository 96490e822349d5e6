"""Chat completions (OpenAI's `POST /v1/chat/completions`) on a base or one of the tenant's
adapters, answered by the interactive executors that hold the base.

A tenant that fine-tuned with the `openai` SDK asks its `fine_tuned_model` (`bot@3`), or
`bot@prod`, `bot`, or a base by name, as it would ask OpenAI. Serving at scale stays the
serving clusters' (vLLM, pulling the registry); this is the platform's own way to try a model
where it was trained, on the executors already holding its base. A chat is a sample call of a
sampler in the tenant's chat session (one per tenant, `session_id`, tagged `chat_completions`,
kept alive by each chat), so it runs in the tenants' turns beside their Tinker samples, is
batched with them, and is metered and shown as they are (the Sessions page, the usage report).
A sampler is kept per model in that session and reused while a live executor holds it (or none
has taken it yet); its calls then go to that executor, as a Tinker sampler's do; an
adapter's is pinned to the version the reference named (`session_weights`). The executor
renders the messages with the base's chat template and answers text (`workers.interactive.chat`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import Connection, bindparam, text
from sqlalchemy.dialects.postgresql import JSONB

from control_plane import session_weights
from control_plane.base_catalog import get_base_model
from control_plane.base_status import BaseStatus
from control_plane.interactive import (
    CallKind,
    ModelKind,
    NotFound,
    Refused,
    _new_model,
    enqueue,
    require_served,
)
from control_plane.interactive_runs import CheckpointRecord
from control_plane.trainers import alive_sql

TAG = "chat_completions"


class ModelUnknown(Exception):
    """No ready base and no adapter version of the tenant by that name."""


class NoExecutor(Exception):
    """No live executor holds the model's base: the text says how to start one."""


@dataclass(frozen=True)
class Asked:
    """A chat asked: its call (the future), the sampler it was asked of, and the adapter
    version it reads (None: a base)."""

    call_id: str
    sampler_id: str
    weights: CheckpointRecord | None


def session_id(tenant_id: str) -> str:
    """The tenant's chat session."""
    return f"sess-chat-{tenant_id}"


_SESSION = text(
    "INSERT INTO interactive_sessions (id, tenant_id, tags, display_name) "
    "VALUES (:id, :tenant, :tags, 'chat completions') "
    "ON CONFLICT (id) DO UPDATE SET last_heartbeat_at = now()"
).bindparams(bindparam("tags", type_=JSONB))

# The chat session's sampler of the model, loaded and held by a live executor or by none yet;
# locked, so nothing unloads it before the chat is asked of it (an unload meanwhile is waited
# for and the sampler passed over).
_SAMPLER = text(
    "SELECT m.id FROM interactive_models m WHERE m.session_id = :session "
    "AND m.kind = 'sampler' AND m.base_model_id = :base "
    "AND m.model_path IS NOT DISTINCT FROM :path AND m.unloaded_at IS NULL "
    "AND (m.held_by IS NULL OR EXISTS (SELECT 1 FROM trainers t WHERE t.id = m.held_by "
    f"AND {alive_sql('t')})) ORDER BY m.created_at DESC LIMIT 1 FOR UPDATE OF m"
)


def ask(
    conn: Connection, tenant_id: str, model: str, request: dict[str, Any], lease: float
) -> Asked:
    """A chat of `model` (a ready base's name, or the tenant's adapter by `name[@version|
    alias]`) asked of its base's executors (not committed). ModelUnknown, NoExecutor."""
    base = get_base_model(conn, model)
    weights = None
    if base is not None and base.status != BaseStatus.READY:
        raise ModelUnknown(f"base model {model!r} is {base.status}, not ready: it takes no chat")
    if base is not None:
        base_id = base.id
    else:
        try:
            weights = session_weights.find(
                conn, tenant_id, session_weights.PREFIX + model, shared=False
            )
        except NotFound:
            raise ModelUnknown(
                f"No model {model!r}: name a ready base model or one of your adapters "
                "(`name`, `name@3`, `name@prod`: the job's fine_tuned_model); GET /v1/models "
                "lists them"
            ) from None
        base_id = weights.base_model_id
    try:
        require_served(conn, base_id, lease)
    except Refused as unserved:
        raise NoExecutor(str(unserved)) from None
    session = session_id(tenant_id)
    conn.execute(_SESSION, {"id": session, "tenant": tenant_id, "tags": [TAG]})
    path = weights.path if weights is not None else None
    sampler = conn.execute(
        _SAMPLER,
        {"session": session, "base": base_id, "path": path, "lease": timedelta(seconds=lease)},
    ).scalar_one_or_none()
    if sampler is None:
        sampler = _new_model(
            conn, tenant_id, session, base_id, ModelKind.SAMPLER, model_path=path
        ).id
    call_id = enqueue(conn, tenant_id, str(sampler), CallKind.SAMPLE, request)
    return Asked(call_id, str(sampler), weights)
