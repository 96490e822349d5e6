"""The executors' side of interactive sessions: take a model's next call, in its order, and
record what it answered.

A model's calls run one at a time, in `seq` order, on the one executor that holds its weights
in memory (`interactive_models.held_by`, set by the claim that first takes one of its calls).
A claim locks the call and its model (SKIP LOCKED: two executors never take two calls of one
model at once, and never wait on each other) and takes the model's first unfinished call only
when it is pending: a call still running holds every later one back. Of the calls that can
run, a base's executors serve the tenants in turn (`interactive_turns`: the tenant served least
recently first), so one tenant's burst of calls does not hold back another's. A model unloaded
while no executor held it has no weights anywhere: its calls are failed
(`interactive_health.fail_orphaned`), never taken.

An executor that dies takes its training models' weights with it:
`interactive_health.release_lost` fails what was asked of them (load the last saved state into
a new model) and frees them, so no caller waits for ever. A sampler's weights are the base's or
in the object store: only the calls it was running fail, and the next executor of the base free
loads it again for the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

from sqlalchemy import Connection, Engine, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.sql import bindparam

from control_plane import interactive_saves, usage
from control_plane.trainers import alive_sql

# What the payload retention pass empties per transaction.
FORGET_BATCH = 500

# What letting go of a finished call's payload writes (the row stays).
FORGET = "request = '{}', result = NULL, partial = NULL, payload_dropped_at = now()"

# Executors wake on this channel (payload: the base model id) when a call is asked for.
CHANNEL = "interactive_calls"


@dataclass(frozen=True)
class Call:
    """A call taken by an executor, with what it needs to run it."""

    id: str
    model_id: str
    tenant_id: str
    session_id: str
    base_model_id: str
    seq: int
    kind: str
    request: dict[str, Any]
    model_kind: str
    lora_config: dict[str, Any]
    model_path: str | None


_CLAIM = text(
    """
    WITH RECURSIVE heads AS (
        (SELECT c.model_id, c.id, c.status FROM interactive_calls c
         WHERE c.base_model_id = :base AND c.status IN ('pending', 'running')
         ORDER BY c.model_id, c.seq LIMIT 1)
        UNION ALL
        SELECT n.model_id, n.id, n.status FROM heads h
        CROSS JOIN LATERAL (
            SELECT c.model_id, c.id, c.status FROM interactive_calls c
            WHERE c.base_model_id = :base AND c.status IN ('pending', 'running')
              AND c.model_id > h.model_id
            ORDER BY c.model_id, c.seq LIMIT 1) n
    ),
    next AS (
        SELECT c.id, m.id AS model_id, m.tenant_id
        FROM heads h
        JOIN interactive_calls c ON c.id = h.id
        JOIN interactive_models m ON m.id = c.model_id
        LEFT JOIN interactive_turns t ON t.tenant_id = m.tenant_id AND t.base_model_id = :base
        WHERE h.status = 'pending' AND c.status = 'pending'
          AND (CAST(:kinds AS text[]) IS NULL OR c.kind = ANY(CAST(:kinds AS text[])))
          AND (m.held_by = :executor OR (m.held_by IS NULL AND m.unloaded_at IS NULL))
        ORDER BY t.served_at NULLS FIRST, c.created_at, c.seq
        LIMIT 1
        FOR UPDATE OF c, m SKIP LOCKED
    ),
    turn AS (
        INSERT INTO interactive_turns (tenant_id, base_model_id, served_at)
        SELECT next.tenant_id, :base, clock_timestamp() FROM next
        ON CONFLICT (tenant_id, base_model_id) DO UPDATE SET served_at = excluded.served_at
    ),
    held AS (
        UPDATE interactive_models m SET held_by = :executor
        FROM next WHERE m.id = next.model_id
        RETURNING m.id, m.session_id, m.kind, m.lora_config, m.model_path
    )
    UPDATE interactive_calls c
    SET status = 'running', claimed_by = :executor, started_at = now()
    FROM next, held
    WHERE c.id = next.id
    RETURNING c.id, c.model_id, c.tenant_id, held.session_id, c.base_model_id, c.seq, c.kind,
              c.request, held.kind AS model_kind, held.lora_config, held.model_path
    """
)


def claim_next(
    conn: Connection, executor_id: str, base_model_id: str, *, kinds: list[str] | None = None
) -> Call | None:
    """Take a call on `base_model_id` that can run now, for `executor_id` (not committed: the
    caller commits before it runs the call): of the calls that can run (each model's first
    unfinished call, when it is pending and its model is this executor's or free; only calls of
    `kinds` when given), the one of the tenant served least recently on the base (never
    served first), then the oldest. The models with unfinished calls are read by a skip scan of
    `ix_interactive_calls_unfinished`, one probe a model, so a tenant's burst of calls on one
    model costs a claim one probe."""
    params = {"base": base_model_id, "executor": executor_id, "kinds": kinds}
    row = conn.execute(_CLAIM, params).one_or_none()
    return None if row is None else Call(**row._mapping)


_MORE = text(
    """
    WITH more AS (
        SELECT c.id FROM interactive_calls c
        WHERE c.model_id = :model AND c.seq > :seq AND c.status = 'pending'
          AND c.kind = ANY(CAST(:kinds AS text[])) AND NOT EXISTS (SELECT 1 FROM interactive_calls o
              WHERE o.model_id = :model AND o.seq > :seq AND o.seq < c.seq
              AND o.kind <> ALL(CAST(:kinds AS text[])) AND o.status IN ('pending', 'running'))
        ORDER BY c.seq LIMIT :limit FOR UPDATE
    )
    UPDATE interactive_calls c SET status = 'running', claimed_by = :executor, started_at = now()
    FROM more WHERE c.id = more.id RETURNING c.id, c.seq, c.kind, c.request
    """
)


def claim_more(
    conn: Connection, executor_id: str, first: Call, limit: int, kinds: list[str]
) -> list[Call]:
    """With a call of `kinds` just taken, the model's next pending calls of `kinds` up to `limit`,
    none after a call of another kind still to run (samples, or forward calls, read the weights
    they would read in order); each is answered on its own (not committed)."""
    params = {"model": first.model_id, "seq": first.seq, "limit": limit, "kinds": kinds}
    rows = conn.execute(_MORE, {**params, "executor": executor_id})
    taken = [replace(first, id=r.id, seq=r.seq, kind=r.kind, request=r.request) for r in rows]
    return sorted(taken, key=lambda call: call.seq)


def finish(
    conn: Connection,
    call: Call,
    executor_id: str,
    result: dict[str, Any],
    *,
    checkpoint: interactive_saves.Saved | None = None,
    release_model: bool = False,
) -> bool:
    """Record `result` for a call this executor runs, with a training call's `metrics` apart
    (its curves, kept when the answer is let go) and what it used (`usage`); not committed.
    `checkpoint` records a save's weights with it (a save under a name taken overwrites it);
    `release_model` lets the model go (an unload). False, nothing written, when the call was
    released as lost meanwhile."""
    done = conn.execute(
        text(
            "UPDATE interactive_calls SET status = 'completed', result = :result, metrics = CASE "
            "WHEN kind IN ('forward_backward', 'forward', 'optim_step') THEN :result -> 'metrics' "
            "END, usage = :usage, partial = NULL, finished_at = now() "
            "WHERE id = :id AND status = 'running' AND claimed_by = :executor"
        ).bindparams(
            bindparam("result", type_=JSONB), bindparam("usage", type_=JSONB(none_as_null=True))
        ),
        {
            "id": call.id,
            "executor": executor_id,
            "result": result,
            "usage": usage.call_usage(call.kind, call.request, result),
        },
    ).rowcount
    if not done:
        return False
    if checkpoint is not None:
        interactive_saves.record(conn, call, checkpoint)
    if call.kind == "load_weights":  # the adapter version the model now holds, if one
        conn.execute(
            # A version deleted since the executor read it is none (its key would be dangling).
            text(
                "UPDATE interactive_models SET weights_version_id = "
                "(SELECT id FROM adapter_versions WHERE id = :version FOR KEY SHARE) "
                "WHERE id = :model"
            ),
            {"version": call.request.get("adapter_version_id"), "model": call.model_id},
        )
    if release_model:
        conn.execute(
            text(
                "UPDATE interactive_models SET held_by = NULL, unloaded_at = now() "
                "WHERE id = :model"
            ),
            {"model": call.model_id},
        )
    return True


@dataclass(frozen=True)
class Written:
    """A streamed chat's reply so far, written: whether its stream's client left, and, where it
    streams logprobs, how many entries each choice has stored."""

    left: bool
    entries: list[int] | None = None


# A reply so far's logprobs: each choice's entries appended to those stored where they carry on
# from them (`from`: how many the executor knows are stored), in place of them from 0 (a call
# decoded again), else left as stored (what the executor then learns from what it returns);
# `run`, the decoding they come from (the stream sends no other decoding's mid-stream).
_ENTRIES = """
    jsonb_build_object('logprobs', (
        SELECT coalesce(jsonb_agg(CASE
            WHEN n.start = 0 THEN n.entries
            WHEN jsonb_array_length(n.stored) = n.start THEN n.stored || n.entries
            ELSE n.stored END ORDER BY n.i), '[]'::jsonb)
        FROM (
            SELECT e.entries, e.i, (p.body -> 'from' ->> (e.i - 1)::int)::int AS start,
                   coalesce(c.partial -> 'logprobs' -> (e.i - 1)::int, '[]'::jsonb) AS stored
            FROM jsonb_array_elements(p.body -> 'logprobs') WITH ORDINALITY AS e(entries, i)
        ) n
    ), 'run', p.body -> 'run')"""


def progress(
    conn: Connection, executor_id: str, replies: dict[str, dict[str, Any]]
) -> dict[str, Written]:
    """A streamed chat's reply so far, for each call (by id) this executor runs: its `texts`
    (each choice's), and, streamed with logprobs, each choice's new entries (`logprobs`, from
    the index `from`), written and notified on the channel a finished call notifies, so the
    API's stream wakes (not committed; its commit does not wait for the disk; the stored value
    is rewritten whole, but only the new entries are sent). For each call written, whether its
    stream's client left (`leave_stream`: its sampling stops) and how many entries each choice
    has stored."""
    if not replies:
        return {}
    # Not waited onto the disk (a crash loses only text the answer will hold whole), and never
    # waited on long: a write that cannot go at once is dropped, not queued behind.
    conn.execute(
        text(
            "SELECT set_config('synchronous_commit', 'off', true), "
            "set_config('lock_timeout', '2s', true), set_config('statement_timeout', '5s', true)"
        )
    )
    rows = conn.execute(
        text(
            "UPDATE interactive_calls c SET partial = jsonb_build_object('texts', p.body -> 'texts')"
            f" || CASE WHEN p.body ? 'logprobs' THEN {_ENTRIES} ELSE '{{}}'::jsonb END "
            "FROM jsonb_each(:replies) AS p(id, body) "
            "WHERE c.id = p.id AND c.status = 'running' AND c.claimed_by = :executor "
            "RETURNING c.id, c.stream_left_at IS NOT NULL AS left_, "
            "(SELECT jsonb_agg(jsonb_array_length(x)) "
            " FROM jsonb_array_elements(c.partial -> 'logprobs') x) AS stored, "
            "pg_notify('loraforge_interactive_done', c.model_id || ' ' || c.id)"
        ).bindparams(bindparam("replies", type_=JSONB)),
        {"replies": replies, "executor": executor_id},
    ).all()
    return {row.id: Written(bool(row.left_), row.stored) for row in rows}


def leave_stream(conn: Connection, tenant_id: str, call_id: str) -> bool:
    """A streamed chat's client left while it ran (not committed): its executor stops sampling
    it at its next write. Whether it was still running."""
    return bool(
        conn.execute(
            text(
                "UPDATE interactive_calls SET stream_left_at = now() WHERE id = :id "
                "AND tenant_id = :tenant AND status = 'running' AND stream_left_at IS NULL"
            ),
            {"id": call_id, "tenant": tenant_id},
        ).rowcount
    )


def fail(
    conn: Connection, call: Call, executor_id: str, message: str, *, category: str = "user"
) -> bool:
    """Record a call's failure (`category` "user": the request was refused, "server": the
    platform could not run it), not committed. A model whose creation failed holds nothing."""
    done = conn.execute(
        text(
            "UPDATE interactive_calls SET status = 'failed', error = :error, partial = NULL, "
            "finished_at = now() "
            "WHERE id = :id AND status = 'running' AND claimed_by = :executor"
        ).bindparams(bindparam("error", type_=JSONB)),
        {"id": call.id, "executor": executor_id, "error": error(message, category)},
    ).rowcount
    if done and call.kind == "create_model":
        conn.execute(
            text("UPDATE interactive_models SET held_by = NULL WHERE id = :model"),
            {"model": call.model_id},
        )
    return bool(done)


def let_go_unloaded(conn: Connection, executor_id: str) -> list[str]:
    """The models this executor holds that were unloaded (by their session's end or expiry)
    and have nothing left to run: released here, for the executor to drop (not committed)."""
    return list(
        conn.execute(
            text(
                "UPDATE interactive_models m SET held_by = NULL "
                "WHERE m.held_by = :executor AND m.unloaded_at IS NOT NULL "
                "AND NOT EXISTS (SELECT 1 FROM interactive_calls c WHERE c.model_id = m.id "
                "AND c.status IN ('pending', 'running')) RETURNING m.id"
            ),
            {"executor": executor_id},
        ).scalars()
    )


def held_by(conn: Connection, executor_id: str) -> set[str]:
    """The models whose weights the database says `executor_id` holds."""
    rows = conn.execute(
        text("SELECT id FROM interactive_models WHERE held_by = :executor"),
        {"executor": executor_id},
    )
    return set(rows.scalars())


@dataclass(frozen=True)
class BaseBacklog:
    """One base's interactive calls not yet taken, how long the oldest has waited, and the
    live executors holding the base: calls waiting with no executor, or an age that grows,
    is what an operator is paged for."""

    base: str
    pending: int
    oldest_pending_seconds: float
    executors: int


def backlog(conn: Connection, lease_seconds: float) -> list[BaseBacklog]:
    """Per base with calls pending or an executor alive: read off the pending calls' partial
    index and the trainer registry, not the calls' history."""
    rows = conn.execute(
        text(
            "WITH waiting AS (SELECT b.name AS base, count(*) AS pending, "
            "  extract(epoch FROM now() - min(c.created_at)) AS oldest "
            "  FROM interactive_calls c JOIN base_models b ON b.id = c.base_model_id "
            "  WHERE c.status = 'pending' GROUP BY b.name), "
            "serving AS (SELECT resident_base AS base, count(*) AS executors FROM trainers "
            "  WHERE kind = 'interactive' AND resident_base IS NOT NULL "
            f"  AND {alive_sql('trainers')} GROUP BY resident_base) "
            "SELECT coalesce(w.base, s.base) AS base, coalesce(w.pending, 0) AS pending, "
            "coalesce(w.oldest, 0) AS oldest, coalesce(s.executors, 0) AS executors "
            "FROM waiting w FULL JOIN serving s ON s.base = w.base ORDER BY 1"
        ),
        {"lease": timedelta(seconds=lease_seconds)},
    )
    return [
        BaseBacklog(r.base, int(r.pending), max(0.0, float(r.oldest)), int(r.executors))
        for r in rows
    ]


def held_counts(conn: Connection, tenant_id: str | None) -> dict[str, int]:
    """How many models each executor holds (of `tenant_id`'s only, unless None), read off the
    held models' partial index."""
    rows = conn.execute(
        text(
            "SELECT held_by, count(*) AS models FROM interactive_models "
            "WHERE held_by IS NOT NULL AND (CAST(:tenant AS text) IS NULL OR tenant_id = :tenant) "
            "GROUP BY held_by"
        ),
        {"tenant": tenant_id},
    )
    return {r.held_by: int(r.models) for r in rows}


def error(message: str, category: str) -> dict[str, str]:
    return {"error": message, "category": category}


def forget_payloads(engine: Engine, older_than_seconds: float, *, batch: int = FORGET_BATCH) -> int:
    """Let go of the request and answer of every call finished more than `older_than_seconds`
    ago (the row stays: kind, order, status, times, error, metrics), `batch` calls a transaction
    (SKIP LOCKED: two passes share the work); how many. Read off a partial index of the finished
    calls whose payload is kept, so each pass costs what it empties."""
    forgotten = 0
    while True:
        with engine.begin() as conn:
            done = conn.execute(
                text(
                    f"UPDATE interactive_calls SET {FORGET} WHERE id IN ("
                    "  SELECT id FROM interactive_calls "
                    "  WHERE finished_at IS NOT NULL AND payload_dropped_at IS NULL "
                    "  AND finished_at < now() - :age "
                    "  ORDER BY finished_at LIMIT :batch FOR UPDATE SKIP LOCKED)"
                ),
                {"age": timedelta(seconds=older_than_seconds), "batch": batch},
            ).rowcount
        forgotten += done
        if done < batch:
            return forgotten
