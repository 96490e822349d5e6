"""queue bookkeeping: a claim and a finish each kept in three straight statements

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 08:20:00.000000

`jobs_queue_on_update` called a function per step of a job's move (the tenant's counts, the
line's head, the copies on the tenant's other lines): three nested PL/pgSQL calls on a claim and
two on a finish, each its own executor run, each re-reading the tenant's counts that the first
step had just written. The two moves every run makes now write the same rows in statements of
their own, the counts carried from the first to the others: a claim (`queued` to `running` on
its line) and a finish (out of `running` or `cancelling`, not back into the queue, on its line).
Every other move runs the steps as before. Still one trigger with revision 0006's condition: a
trigger's condition is read again in every statement that updates jobs, so a second trigger
would cost more than it saves.

The statuses are written out, as revision 0006 wrote them.
"""

import importlib.util
from pathlib import Path

from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

# Where the moves of every run leave revision 0006's function; what they do there.
DECLARED = (
    "  same_line boolean := OLD.tenant_id = NEW.tenant_id "
    "AND OLD.base_model_id = NEW.base_model_id;\n"
)
FIRST_STEP = "BEGIN\n  IF OLD.tenant_id = NEW.tenant_id THEN\n"
RUN_MOVES = """  now_running int;
  served_at timestamptz;
"""
RUN_MOVE_STEPS = """BEGIN
  IF same_line AND served THEN
    -- Claimed: one queued job less and one running more, served now; the line reads its next
    -- head; the tenant's other lines get the new counts.
    UPDATE tenant_queue_stats s
       SET queued = s.queued - 1, running = s.running + 1, last_served_at = clock_timestamp()
     WHERE s.tenant_id = NEW.tenant_id
    RETURNING s.running, s.last_served_at INTO now_running, served_at;
    IF NOT FOUND THEN
      SELECT b.running, b.last_served_at INTO now_running, served_at
        FROM queue_stats_bump(NEW.tenant_id, -1, 1, true) b;
    END IF;
    UPDATE queue_heads h
       SET queued = h.queued - 1, running = now_running, last_served_at = served_at,
           (top_priority, head_created_at, head_id) = (
             SELECT j.priority, j.created_at, j.id FROM jobs j
              WHERE j.tenant_id = NEW.tenant_id AND j.base_model_id = NEW.base_model_id
                AND j.status = 'queued'
              ORDER BY j.priority DESC, j.created_at, j.id LIMIT 1)
     WHERE h.tenant_id = NEW.tenant_id AND h.base_model_id = NEW.base_model_id;
    UPDATE queue_heads h SET running = now_running, last_served_at = served_at
     WHERE h.tenant_id = NEW.tenant_id AND h.base_model_id <> NEW.base_model_id
       AND (h.running, h.last_served_at) IS DISTINCT FROM (now_running, served_at);
    RETURN NULL;
  END IF;
  IF same_line AND was_active = 1 AND is_active = 0 AND is_queued = 0 THEN
    -- Finished (succeeded, failed, cancelled): one running job less, on every line.
    UPDATE tenant_queue_stats s SET running = s.running - 1
     WHERE s.tenant_id = NEW.tenant_id
    RETURNING s.running, s.last_served_at INTO now_running, served_at;
    IF NOT FOUND THEN
      SELECT b.running, b.last_served_at INTO now_running, served_at
        FROM queue_stats_bump(NEW.tenant_id, 0, -1, false) b;
    END IF;
    UPDATE queue_heads h SET running = now_running, last_served_at = served_at
     WHERE h.tenant_id = NEW.tenant_id
       AND (h.running, h.last_served_at) IS DISTINCT FROM (now_running, served_at);
    RETURN NULL;
  END IF;
  IF OLD.tenant_id = NEW.tenant_id THEN
"""


def _revision_0006_on_update() -> str:
    """Revision 0006's `jobs_queue_on_update`, in the words it created it with."""
    path = Path(__file__).with_name('0006_queue_scale.py')
    spec = importlib.util.spec_from_file_location('loraforge_revision_0006', path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    start = module.FUNCTIONS.index('CREATE FUNCTION jobs_queue_on_update()')
    end = module.FUNCTIONS.index('END $$;', start) + len('END $$;')
    return 'CREATE OR REPLACE' + module.FUNCTIONS[start + len('CREATE'):end]


def _replace_once(body: str, old: str, new: str) -> str:
    if body.count(old) != 1:
        raise RuntimeError(f'revision 0006 changed: {old!r} is not in jobs_queue_on_update once')
    return body.replace(old, new)


def upgrade() -> None:
    body = _revision_0006_on_update()
    body = _replace_once(body, DECLARED, DECLARED + RUN_MOVES)
    op.execute(_replace_once(body, FIRST_STEP, RUN_MOVE_STEPS))


def downgrade() -> None:
    op.execute(_revision_0006_on_update())
