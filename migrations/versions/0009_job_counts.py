"""every job counted by status in the bookkeeping: a scrape reads one row per tenant, not every job

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02 16:00:00.000000

`GET /metrics` counted every job ever created by status (a pass over all of `jobs` on every
scrape, growing with the platform's whole history) and every queued job by base (a pass over the
backlog). `tenant_queue_stats` already holds each tenant's queued and running counts, kept by
revision 0006's triggers in the statement that moves a job; it now holds the count of every
later status and the leases lost (`interruptions`) beside them, kept by the same triggers in
the same statements: the finish that already writes the tenant's row writes one column more.
`running` still counts the jobs that hold a lease (`running` and `cancelling`), as the claim
reads it; `cancelling` counts those of them winding down. Jobs still `validating_files` are not
kept here: creating a job writes no bookkeeping row, as before (a row written there would hold
the tenant's row locked through the request, and one tenant's concurrent submissions would
queue on it: 0.87x the API's submission rate, measured); a scrape counts them off
`ix_jobs_status_lease`, the few that wait for validation. Deleting a job that got past
validation now writes its tenant's row.

`ix_jobs_claimable` (priority, age over the queued jobs), which no statement has read since
revision 0006's claim, becomes `ix_jobs_queued_base` (base, age over the queued jobs): the
oldest queued job of each base is its first entry, for the same write at each enqueue.

The statuses are written out, as revision 0006 wrote them.
"""

import importlib.util
from pathlib import Path
from types import ModuleType

from alembic import op
import sqlalchemy as sa

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None

COUNTS = ('cancelling', 'succeeded', 'failed', 'cancelled')

# A statement's rows (`inserted`, `deleted`) counted by tenant in every kept status; the jobs
# still validating are not kept, and a tenant with nothing else among them is left out.
COUNTED_BY_TENANT = """    SELECT tenant_id,
           count(*) FILTER (WHERE status = 'queued') AS queued,
           count(*) FILTER (WHERE status IN ('running', 'cancelling')) AS running,
           count(*) FILTER (WHERE status = 'cancelling') AS cancelling,
           count(*) FILTER (WHERE status = 'succeeded') AS succeeded,
           count(*) FILTER (WHERE status = 'failed') AS failed,
           count(*) FILTER (WHERE status = 'cancelled') AS cancelled,
           coalesce(sum(interruptions), 0) AS interruptions
      FROM {rows} GROUP BY tenant_id
    HAVING count(*) FILTER (WHERE status <> 'validating_files') > 0
     ORDER BY tenant_id"""

FUNCTIONS = """
-- A tenant's counts moved by these amounts; its running count and served time as they now
-- stand. The tenant's first job creates the row, counted from jobs, which already hold the change.
CREATE FUNCTION queue_stats_add(
  p_tenant text, d_queued int, d_running int, d_cancelling int,
  d_succeeded int, d_failed int, d_cancelled int, d_interruptions bigint, served boolean,
  OUT running int, OUT last_served_at timestamptz
) LANGUAGE plpgsql AS $$
BEGIN
  UPDATE tenant_queue_stats s
     SET queued = s.queued + d_queued,
         running = s.running + d_running, cancelling = s.cancelling + d_cancelling,
         succeeded = s.succeeded + d_succeeded, failed = s.failed + d_failed,
         cancelled = s.cancelled + d_cancelled,
         interruptions = s.interruptions + d_interruptions,
         last_served_at = CASE WHEN served THEN clock_timestamp() ELSE s.last_served_at END
   WHERE s.tenant_id = p_tenant
  RETURNING s.running, s.last_served_at INTO running, last_served_at;
  IF NOT FOUND THEN
    INSERT INTO tenant_queue_stats AS q (tenant_id, queued, running, cancelling, succeeded,
                                         failed, cancelled, interruptions, last_served_at)
    SELECT p_tenant,
           count(*) FILTER (WHERE status = 'queued'),
           count(*) FILTER (WHERE status IN ('running', 'cancelling')),
           count(*) FILTER (WHERE status = 'cancelling'),
           count(*) FILTER (WHERE status = 'succeeded'),
           count(*) FILTER (WHERE status = 'failed'),
           count(*) FILTER (WHERE status = 'cancelled'),
           coalesce(sum(interruptions), 0),
           CASE WHEN served THEN clock_timestamp() END
      FROM jobs WHERE tenant_id = p_tenant
    ON CONFLICT (tenant_id) DO UPDATE
       SET queued = q.queued + d_queued,
           running = q.running + d_running, cancelling = q.cancelling + d_cancelling,
           succeeded = q.succeeded + d_succeeded, failed = q.failed + d_failed,
           cancelled = q.cancelled + d_cancelled,
           interruptions = q.interruptions + d_interruptions,
           last_served_at = CASE WHEN served THEN clock_timestamp() ELSE q.last_served_at END
    RETURNING q.running, q.last_served_at INTO running, last_served_at;
  END IF;
END $$;

-- One job moving from one status to another on its tenant's counts (NULL: it came into being,
-- or it is gone), with its leases lost changed by d_interruptions.
CREATE FUNCTION queue_stats_move(
  p_tenant text, p_from text, p_to text, d_interruptions bigint, served boolean,
  OUT running int, OUT last_served_at timestamptz
) LANGUAGE plpgsql AS $$
BEGIN
  SELECT a.running, a.last_served_at INTO running, last_served_at
    FROM queue_stats_add(
      p_tenant,
      (p_to IS NOT DISTINCT FROM 'queued')::int - (p_from IS NOT DISTINCT FROM 'queued')::int,
      coalesce(p_to IN ('running', 'cancelling'), false)::int
        - coalesce(p_from IN ('running', 'cancelling'), false)::int,
      (p_to IS NOT DISTINCT FROM 'cancelling')::int
        - (p_from IS NOT DISTINCT FROM 'cancelling')::int,
      (p_to IS NOT DISTINCT FROM 'succeeded')::int
        - (p_from IS NOT DISTINCT FROM 'succeeded')::int,
      (p_to IS NOT DISTINCT FROM 'failed')::int - (p_from IS NOT DISTINCT FROM 'failed')::int,
      (p_to IS NOT DISTINCT FROM 'cancelled')::int
        - (p_from IS NOT DISTINCT FROM 'cancelled')::int,
      d_interruptions, served) a;
END $$;

CREATE OR REPLACE FUNCTION jobs_queue_on_insert() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  g record;
BEGIN
  FOR g IN
{inserted}
  LOOP
    PERFORM queue_stats_add(g.tenant_id, g.queued::int, g.running::int,
                            g.cancelling::int, g.succeeded::int, g.failed::int,
                            g.cancelled::int, g.interruptions, false);
    IF g.running > 0 THEN
      PERFORM queue_heads_copy_tenant(g.tenant_id, NULL);
    END IF;
  END LOOP;
  FOR g IN
    SELECT DISTINCT ON (tenant_id, base_model_id) tenant_id, base_model_id,
           count(*) OVER (PARTITION BY tenant_id, base_model_id) AS n, priority, created_at, id
      FROM inserted WHERE status = 'queued'
     ORDER BY tenant_id, base_model_id, priority DESC, created_at, id
  LOOP
    PERFORM queue_heads_add(g.tenant_id, g.base_model_id, g.n::int, g.priority, g.created_at, g.id);
  END LOOP;
  RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION jobs_queue_on_update() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  was_queued int := (OLD.status = 'queued')::int;
  is_queued int := (NEW.status = 'queued')::int;
  was_active int := (OLD.status IN ('running', 'cancelling'))::int;
  is_active int := (NEW.status IN ('running', 'cancelling'))::int;
  served boolean := OLD.status = 'queued' AND NEW.status = 'running';
  same_line boolean := OLD.tenant_id = NEW.tenant_id AND OLD.base_model_id = NEW.base_model_id;
  lost bigint := NEW.interruptions - OLD.interruptions;
  now_running int;
  served_at timestamptz;
BEGIN
  IF same_line AND served THEN
    -- Claimed: one queued job less and one running more, served now; the line reads its next
    -- head; the tenant's other lines get the new counts.
    UPDATE tenant_queue_stats s
       SET queued = s.queued - 1, running = s.running + 1, interruptions = s.interruptions + lost,
           last_served_at = clock_timestamp()
     WHERE s.tenant_id = NEW.tenant_id
    RETURNING s.running, s.last_served_at INTO now_running, served_at;
    IF NOT FOUND THEN
      SELECT b.running, b.last_served_at INTO now_running, served_at
        FROM queue_stats_move(NEW.tenant_id, OLD.status, NEW.status, lost, true) b;
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
    -- Finished (succeeded, failed, cancelled): one running job less, on every line, and one
    -- more of its outcome.
    UPDATE tenant_queue_stats s
       SET running = s.running - 1,
           cancelling = s.cancelling - (OLD.status = 'cancelling')::int,
           succeeded = s.succeeded + (NEW.status = 'succeeded')::int,
           failed = s.failed + (NEW.status = 'failed')::int,
           cancelled = s.cancelled + (NEW.status = 'cancelled')::int,
           interruptions = s.interruptions + lost
     WHERE s.tenant_id = NEW.tenant_id
    RETURNING s.running, s.last_served_at INTO now_running, served_at;
    IF NOT FOUND THEN
      SELECT b.running, b.last_served_at INTO now_running, served_at
        FROM queue_stats_move(NEW.tenant_id, OLD.status, NEW.status, lost, false) b;
    END IF;
    UPDATE queue_heads h SET running = now_running, last_served_at = served_at
     WHERE h.tenant_id = NEW.tenant_id
       AND (h.running, h.last_served_at) IS DISTINCT FROM (now_running, served_at);
    RETURN NULL;
  END IF;
  IF OLD.tenant_id = NEW.tenant_id THEN
    IF OLD.status <> NEW.status OR lost <> 0 THEN
      PERFORM queue_stats_move(NEW.tenant_id, OLD.status, NEW.status, lost, served);
    END IF;
  ELSE
    PERFORM queue_stats_move(OLD.tenant_id, OLD.status, NULL, -OLD.interruptions, false);
    PERFORM queue_stats_move(NEW.tenant_id, NULL, NEW.status, NEW.interruptions, served);
  END IF;
  IF was_queued = 1 THEN
    -- Left its line (claimed, cancelled) or moved within it (a new priority).
    PERFORM queue_heads_remove(OLD.tenant_id, OLD.base_model_id,
                               1 - is_queued * same_line::int);
  ELSIF is_queued = 1 THEN
    PERFORM queue_heads_add(NEW.tenant_id, NEW.base_model_id, 1, NEW.priority, NEW.created_at,
                            NEW.id);
  END IF;
  IF was_active <> is_active OR served THEN
    PERFORM queue_heads_copy_tenant(NEW.tenant_id,
                                    CASE WHEN was_queued + is_queued > 0 AND same_line
                                         THEN NEW.base_model_id END);
  END IF;
  IF NOT same_line THEN
    IF was_queued = 1 AND is_queued = 1 THEN
      PERFORM queue_heads_add(NEW.tenant_id, NEW.base_model_id, 1, NEW.priority, NEW.created_at,
                              NEW.id);
    END IF;
    PERFORM queue_heads_copy_tenant(OLD.tenant_id, NULL);
    PERFORM queue_heads_copy_tenant(NEW.tenant_id, NULL);
  END IF;
  RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION jobs_queue_on_delete() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  g record;
BEGIN
  FOR g IN
{deleted}
  LOOP
    -- No row (the tenant itself is being deleted): nothing left to keep.
    UPDATE tenant_queue_stats
       SET queued = queued - g.queued, running = running - g.running, cancelling = cancelling - g.cancelling,
           succeeded = succeeded - g.succeeded, failed = failed - g.failed,
           cancelled = cancelled - g.cancelled, interruptions = interruptions - g.interruptions
     WHERE tenant_id = g.tenant_id;
    IF FOUND AND g.running > 0 THEN
      PERFORM queue_heads_copy_tenant(g.tenant_id, NULL);
    END IF;
  END LOOP;
  FOR g IN
    SELECT tenant_id, base_model_id, count(*) AS n
      FROM deleted WHERE status = 'queued'
     GROUP BY tenant_id, base_model_id ORDER BY tenant_id, base_model_id
  LOOP
    PERFORM queue_heads_remove(g.tenant_id, g.base_model_id, g.n::int);
  END LOOP;
  RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION jobs_queue_on_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  DELETE FROM queue_heads;
  UPDATE tenant_queue_stats
     SET queued = 0, running = 0, cancelling = 0, succeeded = 0, failed = 0, cancelled = 0,
         interruptions = 0
   WHERE (queued, running, cancelling, succeeded, failed, cancelled, interruptions)
         <> (0, 0, 0, 0, 0, 0, 0);
  RETURN NULL;
END $$;

DROP FUNCTION queue_stats_bump(text, int, int, boolean);
""".format(
    inserted=COUNTED_BY_TENANT.format(rows='inserted'),
    deleted=COUNTED_BY_TENANT.format(rows='deleted'),
)

# Revision 0006's condition, and a job's leases lost (the reaper changes its status too, but a
# count must not depend on that).
TRIGGER = """
DROP TRIGGER jobs_queue_on_update ON jobs;
CREATE TRIGGER jobs_queue_on_update AFTER UPDATE ON jobs
  FOR EACH ROW WHEN (
    OLD.status IS DISTINCT FROM NEW.status OR OLD.priority IS DISTINCT FROM NEW.priority
    OR OLD.created_at IS DISTINCT FROM NEW.created_at OR OLD.id IS DISTINCT FROM NEW.id
    OR OLD.tenant_id IS DISTINCT FROM NEW.tenant_id
    OR OLD.base_model_id IS DISTINCT FROM NEW.base_model_id{interruptions})
  EXECUTE FUNCTION jobs_queue_on_update();
"""
INTERRUPTIONS = "\n    OR OLD.interruptions IS DISTINCT FROM NEW.interruptions"

# Counted from jobs under a lock that holds every writer of jobs off until this commits.
BACKFILL = """
LOCK TABLE jobs IN SHARE MODE;
INSERT INTO tenant_queue_stats AS s (tenant_id, queued, running, cancelling, succeeded, failed,
                                     cancelled, interruptions)
SELECT t.id,
       count(j.id) FILTER (WHERE j.status = 'queued'),
       count(j.id) FILTER (WHERE j.status IN ('running', 'cancelling')),
       count(j.id) FILTER (WHERE j.status = 'cancelling'),
       count(j.id) FILTER (WHERE j.status = 'succeeded'),
       count(j.id) FILTER (WHERE j.status = 'failed'),
       count(j.id) FILTER (WHERE j.status = 'cancelled'),
       coalesce(sum(j.interruptions), 0)
  FROM tenants t LEFT JOIN jobs j ON j.tenant_id = t.id
 GROUP BY t.id
ON CONFLICT (tenant_id) DO UPDATE
   SET cancelling = EXCLUDED.cancelling,
       succeeded = EXCLUDED.succeeded, failed = EXCLUDED.failed,
       cancelled = EXCLUDED.cancelled, interruptions = EXCLUDED.interruptions;
"""


def _revision(name: str) -> ModuleType:
    """An earlier revision's module, for the words it created its functions with."""
    path = Path(__file__).with_name(name)
    spec = importlib.util.spec_from_file_location(f'loraforge_revision_{path.stem}', path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _function(functions: str, name: str) -> str:
    """One `CREATE FUNCTION` out of a revision's text, as `CREATE OR REPLACE`."""
    start = functions.index(f'CREATE FUNCTION {name}(')
    end = functions.index('END $$;', start) + len('END $$;')
    return 'CREATE OR REPLACE' + functions[start + len('CREATE'):end]


def upgrade() -> None:
    for column in COUNTS:
        op.add_column(
            'tenant_queue_stats',
            sa.Column(column, sa.Integer(), server_default='0', nullable=False),
        )
    op.add_column(
        'tenant_queue_stats',
        sa.Column('interruptions', sa.BigInteger(), server_default='0', nullable=False),
    )
    op.execute(FUNCTIONS)
    op.execute(TRIGGER.format(interruptions=INTERRUPTIONS))
    op.execute(BACKFILL)
    op.drop_index('ix_jobs_claimable', table_name='jobs')
    op.create_index(
        'ix_jobs_queued_base', 'jobs', ['base_model_id', 'created_at'],
        postgresql_where=sa.text("status = 'queued'"),
    )


def downgrade() -> None:
    op.drop_index('ix_jobs_queued_base', table_name='jobs')
    op.create_index(
        'ix_jobs_claimable', 'jobs', ['priority', 'created_at'],
        postgresql_where=sa.text("status = 'queued'"),
    )
    first = _revision('0006_queue_scale.py').FUNCTIONS
    op.execute(_revision('0007_tenant_served_once.py').BUMP.replace('{tenants_update}', ''))
    for name in ('jobs_queue_on_insert', 'jobs_queue_on_delete', 'jobs_queue_on_truncate'):
        op.execute(_function(first, name))
    op.execute(TRIGGER.format(interruptions=''))
    _revision('0008_queue_claim_finish_triggers.py').upgrade()
    op.execute('DROP FUNCTION queue_stats_move(text, text, text, bigint, boolean)')
    op.execute(
        'DROP FUNCTION queue_stats_add(text, int, int, int, int, int, int, bigint, boolean)'
    )
    op.drop_column('tenant_queue_stats', 'interruptions')
    for column in reversed(COUNTS):
        op.drop_column('tenant_queue_stats', column)
