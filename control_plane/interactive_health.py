"""Why an interactive call is still waiting, as a poll of its future is told, and the sessions'
housekeeping that needs no executor.

The SDK shows a pause's reason to its user (`queue_state` and `queue_state_reason` on a
try-again answer: a sampler at once, a training model after a long pause). A call waits for one
of three reasons: its turn (`active`); no live executor holds its base (`paused_capacity`,
until one starts); or its training model's weights were on an executor that is gone, or the
model was unloaded while no executor held it. The last two never end on their own, so the poll
settles them at once (the call fails, saying why) rather than leaving the caller to wait for the
next executor's idle pass, which may never come on a base that lost its only executor. A
sampler whose executor is gone is freed there too, and its waiting calls go to the next
executor free, which loads it again (its weights are the base's or in the object store).

The housekeeping (`tidy`): free the lost executors' models (`release_lost`), end the sessions
whose SDK went silent (`expire_sessions`), fail what waits on models unloaded with no holder
(`fail_orphaned`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import Connection, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.sql import bindparam

from control_plane import interactive_calls as calls
from control_plane.trainers import alive_sql


@dataclass(frozen=True)
class Waiting:
    """What a try-again answer says of a call still waiting (the SDK's `QueueState` values)."""

    queue_state: str  # active | paused_capacity
    reason: str | None = None


ACTIVE = Waiting("active")

_WHERE = text(
    "SELECT b.name AS base, m.kind = 'sampler' AS sampler, m.held_by IS NOT NULL AS held,"
    " m.unloaded_at IS NOT NULL AS unloaded,"
    f" EXISTS (SELECT 1 FROM trainers t WHERE t.id = m.held_by AND {alive_sql('t')}) AS holder,"
    " EXISTS (SELECT 1 FROM trainers t WHERE t.kind = 'interactive' AND t.resident_base = b.name"
    f"   AND {alive_sql('t')}) AS served "
    "FROM interactive_models m JOIN base_models b ON b.id = m.base_model_id WHERE m.id = :model"
)


def unserved(base: str) -> str:
    """Why a call on `base` cannot run now, and what the platform's operator does about it."""
    return (
        f"no interactive executor holds base {base!r} now; the platform's operator starts one "
        f"with `loraforge interactive --base {base}` or the chart's interactive.bases"
    )


def explain(conn: Connection, model_id: str, lease_seconds: float) -> Waiting | None:
    """Why the calls waiting on `model_id` wait; None when they were settled here instead
    (failed, not committed): the training model's executor is gone with its weights (or an
    unloaded sampler's), or the model was unloaded while none held it. A sampler whose executor
    is gone is freed here (its running calls failed) and the rest wait as any call does."""
    lease = timedelta(seconds=lease_seconds)
    row = conn.execute(_WHERE, {"model": model_id, "lease": lease}).one()
    held = row.held
    if held and not row.holder:
        release_lost(conn, lease_seconds)
        if not row.sampler or row.unloaded:
            return None
        held = False  # the next executor of the base free loads the sampler again
    if row.unloaded and not held:
        fail_orphaned(conn)
        return None
    if row.holder or row.served:
        return ACTIVE
    return Waiting("paused_capacity", f"{unserved(row.base)}; the call runs when one starts")


def tidy(conn: Connection, lease_seconds: float, session_timeout_seconds: float) -> None:
    """What any executor's idle pass does for every base, and the platform's beat does where no
    executor runs: free the lost executors' models, end the sessions whose SDK went silent,
    fail what waits on models unloaded with no holder (not committed)."""
    release_lost(conn, lease_seconds)
    expire_sessions(conn, session_timeout_seconds)
    fail_orphaned(conn)


def release_lost(conn: Connection, lease_seconds: float) -> int:
    """Free the models (locked in id order) of executors silent for a lease: how many freed (not
    committed). A training model's weights went with its executor, so what was asked of it and
    not answered fails and it is unloaded; so for a sampler already unloaded. A sampler's
    weights are the base's or in the object store: the calls its executor was running fail (one
    of them may be what stopped it), and the rest wait for the next executor of the base free,
    which loads it again (the base's executors are woken)."""
    lost = conn.execute(
        text(
            "WITH lost AS (SELECT m.id FROM interactive_models m "
            "  WHERE m.held_by IS NOT NULL AND NOT EXISTS ("
            f"    SELECT 1 FROM trainers t WHERE t.id = m.held_by AND {alive_sql('t')}) "
            "  ORDER BY m.id FOR UPDATE OF m) "
            "UPDATE interactive_models m SET held_by = NULL, "
            "  unloaded_at = coalesce(m.unloaded_at, CASE WHEN m.kind = 'training' THEN now() END) "
            "FROM lost WHERE m.id = lost.id "
            "RETURNING m.id, m.kind, m.base_model_id, m.unloaded_at IS NULL AS reloadable"
        ),
        {"lease": timedelta(seconds=lease_seconds)},
    ).all()
    reloadable = [m for m in lost if m.reloadable]
    for kind, message in (
        (
            "training",
            "the executor holding this model's weights stopped: create a new model and load the "
            "last state saved with save_state into it",
        ),
        ("sampler", "the executor holding this sampler stopped after it was unloaded"),
    ):
        ended = [m.id for m in lost if m.kind == kind and not m.reloadable]
        _fail_waiting(conn, ended, ("pending", "running"), message, "server")
    _fail_waiting(
        conn,
        [m.id for m in reloadable],
        ("running",),
        "the executor running this call stopped before it answered; ask again (the sampler's "
        "other calls go to another executor of the base, or wait for one to start)",
        "server",
    )
    for base in sorted({m.base_model_id for m in reloadable}):
        conn.execute(
            text("SELECT pg_notify(:channel, :base)"), {"channel": calls.CHANNEL, "base": base}
        )
    return len(lost)


def expire_sessions(conn: Connection, timeout_seconds: float) -> int:
    """End the sessions whose SDK went silent for `timeout_seconds` (a client that died never
    finishes its session): their models are unloaded, and what was asked of them and not taken
    fails; a call already running is answered (not committed): how many unloaded. Sessions,
    then models, are locked in id order (a session renewed meanwhile is read again)."""
    unloaded = conn.execute(
        text(
            "WITH stale AS (SELECT s.id FROM interactive_sessions s "
            "  WHERE s.last_heartbeat_at < now() - :timeout AND EXISTS (SELECT 1 FROM "
            "  interactive_models m WHERE m.session_id = s.id AND m.unloaded_at IS NULL) "
            "  ORDER BY s.id FOR UPDATE OF s), "
            "ended AS (SELECT m.id FROM interactive_models m JOIN stale ON stale.id = m.session_id "
            "  WHERE m.unloaded_at IS NULL ORDER BY m.id FOR UPDATE OF m) "
            "UPDATE interactive_models m SET unloaded_at = now() "
            "FROM ended WHERE m.id = ended.id RETURNING m.id"
        ),
        {"timeout": timedelta(seconds=timeout_seconds)},
    ).scalars()
    models = list(unloaded)
    _fail_waiting(
        conn,
        models,
        ("pending",),
        f"the session sent no heartbeat for {timeout_seconds:g} s and was ended",
        "user",
    )
    return len(models)


def fail_orphaned(conn: Connection) -> int:
    """Fail the calls still waiting on models that were unloaded while no executor held them
    (a session ended before its model's creation ran, or a lost executor's model asked of in a
    race with its release): no executor has their weights (not committed)."""
    return conn.execute(
        text(
            "UPDATE interactive_calls c SET status = 'failed', error = :error, finished_at = now() "
            "FROM interactive_models m WHERE m.id = c.model_id AND c.status = 'pending' "
            "AND m.unloaded_at IS NOT NULL AND m.held_by IS NULL"
        ).bindparams(bindparam("error", type_=JSONB)),
        {"error": calls.error("the model was unloaded before this call ran", "user")},
    ).rowcount


def _fail_waiting(
    conn: Connection, models: list[str], statuses: tuple[str, ...], message: str, category: str
) -> None:
    """Fail the calls of `models` in `statuses` with `message` (not committed)."""
    if not models:
        return
    conn.execute(
        text(
            "UPDATE interactive_calls SET status = 'failed', error = :error, partial = NULL, "
            "finished_at = now() "
            "WHERE model_id = ANY(:models) AND status = ANY(:statuses)"
        ).bindparams(bindparam("error", type_=JSONB)),
        {"models": models, "statuses": list(statuses), "error": calls.error(message, category)},
    )
