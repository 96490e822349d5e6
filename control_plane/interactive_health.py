"""Why an interactive call is still waiting, as a poll of its future is told, and the sessions'
housekeeping that needs no executor.

The SDK shows a pause's reason to its user (`queue_state` and `queue_state_reason` on a
try-again answer: a sampler at once, a training model after a long pause). A call waits for one
of three reasons: its turn (`active`); no live executor holds its base (`paused_capacity`,
until one starts); or its model's weights were on an executor that is gone, or the model was
unloaded while no executor held it. The last two never end on their own, so the poll settles
them at once (the call fails, saying why) rather than leaving the caller to wait for the next
executor's idle pass, which may never come on a base that lost its only executor.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import Connection, text

from control_plane import interactive_calls as calls
from control_plane.trainers import alive_sql


@dataclass(frozen=True)
class Waiting:
    """What a try-again answer says of a call still waiting (the SDK's `QueueState` values)."""

    queue_state: str  # active | paused_capacity
    reason: str | None = None


ACTIVE = Waiting("active")

_WHERE = text(
    "SELECT b.name AS base, m.held_by IS NOT NULL AS held, m.unloaded_at IS NOT NULL AS unloaded,"
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
    (failed, not committed): the model's executor is gone with its weights, or the model was
    unloaded while none held it."""
    lease = timedelta(seconds=lease_seconds)
    row = conn.execute(_WHERE, {"model": model_id, "lease": lease}).one()
    if row.held and not row.holder:
        calls.release_lost(conn, lease_seconds)
        return None
    if row.unloaded and not row.held:
        calls.fail_orphaned(conn)
        return None
    if row.holder or row.served:
        return ACTIVE
    return Waiting("paused_capacity", f"{unserved(row.base)}; the call runs when one starts")


def tidy(conn: Connection, lease_seconds: float, session_timeout_seconds: float) -> None:
    """What any executor's idle pass does for every base, and the platform's beat does where no
    executor runs: free the lost executors' models, end the sessions whose SDK went silent,
    fail what waits on models unloaded with no holder (not committed)."""
    calls.release_lost(conn, lease_seconds)
    calls.expire_sessions(conn, session_timeout_seconds)
    calls.fail_orphaned(conn)
