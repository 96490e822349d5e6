"""Chat completions (OpenAI's `POST /v1/chat/completions`) on a base or one of the tenant's
adapters, answered by the interactive executors that hold the base.

A tenant that fine-tuned with the `openai` SDK asks its `fine_tuned_model` (`bot@3`), or
`bot@prod`, `bot`, or a base by name, as it would ask OpenAI. Serving at scale stays the
serving clusters' (vLLM, pulling the registry); this is the platform's own way to try a model
where it was trained, on the executors already holding its base. A chat is a sample call of a
sampler in the tenant's chat session (one per tenant, `session_id`, tagged `chat_completions`,
kept alive by each chat), so it runs in the tenants' turns beside their Tinker samples, is
batched with them, and is metered and shown as they are (the Sessions page, the usage report).
A model's chats go to samplers kept in that session (`_sampler`), each held by the executor
that first took one of its calls, as a Tinker sampler's calls go to the executor holding it;
an adapter's is pinned to the version the reference named (`session_weights`). A model's calls
run a batch at a time, so a chat goes to a sampler free now, else to one no executor took yet;
else, when a live executor of the base that holds none of the model's samplers runs nothing,
to a new sampler, which that idle executor takes at once (the first executor free may); else
to the sampler with the fewest unfinished calls, then whose executor runs the fewest. So one
model's chats spread over the executors of its base rather than queue behind one batch while
the others idle. The executor renders the messages with the base's chat template and answers
text (`workers.interactive.chat`).
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
from control_plane.records import BaseModelRecord
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

# The calls each executor of the base runs now (how busy it is), read once a chat is asked.
_LOAD = """
    load AS (
        SELECT claimed_by AS executor, count(*) AS running FROM interactive_calls
        WHERE base_model_id = :base AND status = 'running' GROUP BY claimed_by
    )"""

# The chat session's samplers of the model, each loaded and held by a live executor or by none
# yet, with how many of its calls are unfinished and how many calls its executor runs; locked
# in the order of their ids (as every other writer of several models' rows may take them), so
# nothing unloads one before the chat is asked of it (an unload meanwhile is waited for and the
# sampler passed over).
_SAMPLERS = text(
    f"""
    WITH locked AS (
        SELECT m.id, m.held_by, m.created_at FROM interactive_models m
        WHERE m.session_id = :session AND m.kind = 'sampler' AND m.base_model_id = :base
          AND m.model_path IS NOT DISTINCT FROM :path AND m.unloaded_at IS NULL
          AND (m.held_by IS NULL OR EXISTS (SELECT 1 FROM trainers t WHERE t.id = m.held_by
               AND {alive_sql("t")}))
        ORDER BY m.id
        FOR UPDATE OF m
    ),
    {_LOAD}
    SELECT l.id, l.held_by,
           (SELECT count(*) FROM interactive_calls c
            WHERE c.base_model_id = :base AND c.model_id = l.id
              AND c.status IN ('pending', 'running')) AS unfinished,
           coalesce((SELECT running FROM load WHERE executor = l.held_by), 0) AS running
    FROM locked l
    ORDER BY unfinished, running, l.created_at DESC
    """
)

# A live executor of the base that holds none of `held` (the model's samplers' holders) and
# runs nothing: the one to take a new sampler (an idle executor claims at once, when asked).
_IDLE = text(
    f"""
    WITH {_LOAD.strip()}
    SELECT t.id FROM trainers t
    WHERE t.kind = 'interactive' AND t.resident_base = :base_name AND {alive_sql("t")}
      AND t.id <> ALL(CAST(:held AS text[]))
      AND NOT EXISTS (SELECT 1 FROM load WHERE executor = t.id)
    LIMIT 1
    """
)


def _sampler(
    conn: Connection,
    tenant_id: str,
    session: str,
    base: BaseModelRecord,
    path: str | None,
    lease: float,
) -> str:
    """The sampler of the model in the tenant's chat session that takes the next chat: one free
    now (nothing unfinished, its executor running nothing), else one no executor took yet (the
    first executor free takes it), else a new one when a live executor of the base that holds
    none of them runs nothing (it takes the new sampler's call at once), else the one with the
    fewest unfinished calls, then whose executor runs the fewest."""
    params = {"session": session, "base": base.id, "path": path, "lease": timedelta(seconds=lease)}
    samplers = conn.execute(_SAMPLERS, params).all()
    if samplers:
        first = samplers[0]
        if (first.unfinished, first.running) == (0, 0):  # free now
            return str(first.id)
        for sampler in samplers:  # not taken yet: the first executor free takes it, batched
            if sampler.held_by is None:
                return str(sampler.id)
        held = sorted({str(s.held_by) for s in samplers})
        idle = conn.execute(_IDLE, {**params, "base_name": base.name, "held": held}).first()
        if idle is None:
            return str(first.id)
    model = _new_model(conn, tenant_id, session, base.id, ModelKind.SAMPLER, model_path=path)
    return model.id


def ask(
    conn: Connection, tenant_id: str, model: str, request: dict[str, Any], lease: float
) -> Asked:
    """A chat of `model` (a ready base's name, or the tenant's adapter by `name[@version|
    alias]`) asked of its base's executors (not committed). ModelUnknown, NoExecutor."""
    base, weights = _resolve(conn, tenant_id, model)
    try:
        require_served(conn, base.id, lease)
    except Refused as unserved:
        raise NoExecutor(str(unserved)) from None
    session = session_id(tenant_id)
    conn.execute(_SESSION, {"id": session, "tenant": tenant_id, "tags": [TAG]})
    path = weights.path if weights is not None else None
    sampler = _sampler(conn, tenant_id, session, base, path, lease)
    call_id = enqueue(conn, tenant_id, sampler, CallKind.SAMPLE, request)
    return Asked(call_id, sampler, weights)


def keep_alive(conn: Connection, tenant_id: str) -> None:
    """The tenant's chat session heartbeated, as a chat asked heartbeats it (unless it was in
    the last 10 s): its samplers are kept while a batch waits on their calls, asking nothing
    new (not committed)."""
    conn.execute(
        text(
            "UPDATE interactive_sessions SET last_heartbeat_at = now() WHERE id = :id "
            "AND last_heartbeat_at < now() - interval '10 seconds'"
        ),
        {"id": session_id(tenant_id)},
    )


def pinned(conn: Connection, tenant_id: str, model: str) -> str:
    """`model` as it reads now, pinned: a base's name, or the adapter version an alias or
    `name` (its latest) names now, `name@N`; ModelUnknown."""
    base, weights = _resolve(conn, tenant_id, model)
    if weights is None:
        return base.name
    return weights.path.removeprefix(session_weights.PREFIX)


def _resolve(
    conn: Connection, tenant_id: str, model: str
) -> tuple[BaseModelRecord, CheckpointRecord | None]:
    """The base a chat of `model` runs on, and the adapter version it reads (None: a base);
    ModelUnknown."""
    base = get_base_model(conn, model)
    weights = None
    if base is not None and base.status != BaseStatus.READY:
        raise ModelUnknown(f"base model {model!r} is {base.status}, not ready: it takes no chat")
    if base is None:
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
        base = get_base_model(conn, weights.base_model_id)
        assert base is not None  # a version's base is never deleted (lineage)
    return base, weights
