"""queue at scale: per-tenant counts and per-(tenant, base) heads kept by triggers on jobs

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 02:00:00.000000

`tenant_queue_stats` holds each tenant's queued and running counts and when the queue last
served it; `queue_heads` holds, for each (tenant, base model), its queued count and its head
(the best queued job by priority, age, id) beside a copy of the tenant's running count and
served time, so that one index orders every line of the queue the way the claim ranks them.

Triggers on `jobs` keep both exact in the statement that changes a job, whoever writes it (the
queue's transitions, a bulk insert, a tenant's deletion cascading to its jobs, a TRUNCATE).
Lock order, everywhere: the tenant's `tenant_queue_stats` row first, then its `queue_heads`
rows, so two transactions touching one tenant queue up on one row and never deadlock.

The statuses are written out ('queued'; 'running' and 'cancelling' hold a lease), as revision
0001's check constraint wrote them: a migration keeps the vocabulary of its own day.
"""

from alembic import op
import sqlalchemy as sa

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

FUNCTIONS = """
-- Every function is PL/pgSQL, whose statements are planned once per session (a SQL function's
-- are planned again at every call).

-- The tenant's row, locked first by every change to its jobs; returns its running count and
-- served time as they now stand.
CREATE FUNCTION queue_stats_bump(
  p_tenant text, d_queued int, d_running int, served boolean, OUT running int,
  OUT last_served_at timestamptz
) LANGUAGE plpgsql AS $$
BEGIN
  UPDATE tenant_queue_stats s
     SET queued = s.queued + d_queued, running = s.running + d_running,
         last_served_at = CASE WHEN served THEN clock_timestamp() ELSE s.last_served_at END
   WHERE s.tenant_id = p_tenant
  RETURNING s.running, s.last_served_at INTO running, last_served_at;
  IF NOT FOUND THEN
    -- The tenant's first job in the queue: count from jobs, which already hold this change.
    INSERT INTO tenant_queue_stats AS q (tenant_id, queued, running, last_served_at)
    SELECT p_tenant,
           count(*) FILTER (WHERE status = 'queued'),
           count(*) FILTER (WHERE status IN ('running', 'cancelling')),
           CASE WHEN served THEN clock_timestamp() END
      FROM jobs WHERE tenant_id = p_tenant
    ON CONFLICT (tenant_id) DO UPDATE
       SET queued = q.queued + d_queued, running = q.running + d_running,
           last_served_at = CASE WHEN served THEN clock_timestamp() ELSE q.last_served_at END
    RETURNING q.running, q.last_served_at INTO running, last_served_at;
  END IF;
  IF served THEN
    -- Kept for readers of tenants.last_claimed_at; the claim reads tenant_queue_stats.
    UPDATE tenants SET last_claimed_at = queue_stats_bump.last_served_at WHERE id = p_tenant;
  END IF;
END $$;

-- The tenant's running count and served time copied onto its lines (all, or all but one).
CREATE FUNCTION queue_heads_copy_tenant(p_tenant text, p_except text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
  UPDATE queue_heads h SET running = s.running, last_served_at = s.last_served_at
    FROM tenant_queue_stats s
   WHERE s.tenant_id = p_tenant AND h.tenant_id = p_tenant
     AND h.base_model_id IS DISTINCT FROM p_except
     AND (h.running, h.last_served_at) IS DISTINCT FROM (s.running, s.last_served_at);
END $$;

CREATE FUNCTION queue_heads_add(
  p_tenant text, p_base text, n int, p_priority int, p_created timestamptz, p_id text
) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO queue_heads AS h (tenant_id, base_model_id, queued, top_priority, head_created_at,
                                head_id, running, last_served_at)
  SELECT p_tenant, p_base, n, p_priority, p_created, p_id,
         coalesce(s.running, 0), s.last_served_at
    FROM (SELECT 1) AS one LEFT JOIN tenant_queue_stats s ON s.tenant_id = p_tenant
  ON CONFLICT (tenant_id, base_model_id) DO UPDATE SET
    queued = h.queued + EXCLUDED.queued,
    running = EXCLUDED.running,
    last_served_at = EXCLUDED.last_served_at,
    top_priority = CASE WHEN h.head_id IS NULL
        OR (-EXCLUDED.top_priority, EXCLUDED.head_created_at, EXCLUDED.head_id)
         < (-h.top_priority, h.head_created_at, h.head_id)
      THEN EXCLUDED.top_priority ELSE h.top_priority END,
    head_created_at = CASE WHEN h.head_id IS NULL
        OR (-EXCLUDED.top_priority, EXCLUDED.head_created_at, EXCLUDED.head_id)
         < (-h.top_priority, h.head_created_at, h.head_id)
      THEN EXCLUDED.head_created_at ELSE h.head_created_at END,
    head_id = CASE WHEN h.head_id IS NULL
        OR (-EXCLUDED.top_priority, EXCLUDED.head_created_at, EXCLUDED.head_id)
         < (-h.top_priority, h.head_created_at, h.head_id)
      THEN EXCLUDED.head_id ELSE h.head_id END;
END $$;

-- Jobs left the line: its count drops and its head is read again off the line's index (the
-- first queued job in the claim's order), with the tenant's running count and served time.
CREATE FUNCTION queue_heads_remove(p_tenant text, p_base text, n int) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
  UPDATE queue_heads h
     SET queued = h.queued - n,
         (top_priority, head_created_at, head_id) = (
           SELECT j.priority, j.created_at, j.id FROM jobs j
            WHERE j.tenant_id = p_tenant AND j.base_model_id = p_base AND j.status = 'queued'
            ORDER BY j.priority DESC, j.created_at, j.id LIMIT 1),
         (running, last_served_at) = (
           SELECT s.running, s.last_served_at FROM tenant_queue_stats s
            WHERE s.tenant_id = p_tenant)
   WHERE h.tenant_id = p_tenant AND h.base_model_id = p_base;
END $$;

CREATE FUNCTION jobs_queue_on_insert() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  g record;
BEGIN
  FOR g IN
    SELECT tenant_id,
           count(*) FILTER (WHERE status = 'queued') AS queued,
           count(*) FILTER (WHERE status IN ('running', 'cancelling')) AS running
      FROM inserted GROUP BY tenant_id
    HAVING count(*) FILTER (WHERE status IN ('queued', 'running', 'cancelling')) > 0
     ORDER BY tenant_id
  LOOP
    PERFORM queue_stats_bump(g.tenant_id, g.queued::int, g.running::int, false);
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

CREATE FUNCTION jobs_queue_on_update() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  was_queued int := (OLD.status = 'queued')::int;
  is_queued int := (NEW.status = 'queued')::int;
  was_active int := (OLD.status IN ('running', 'cancelling'))::int;
  is_active int := (NEW.status IN ('running', 'cancelling'))::int;
  served boolean := OLD.status = 'queued' AND NEW.status = 'running';
  same_line boolean := OLD.tenant_id = NEW.tenant_id AND OLD.base_model_id = NEW.base_model_id;
BEGIN
  IF OLD.tenant_id = NEW.tenant_id THEN
    IF was_queued <> is_queued OR was_active <> is_active THEN
      PERFORM queue_stats_bump(NEW.tenant_id, is_queued - was_queued, is_active - was_active,
                               served);
    END IF;
  ELSE
    PERFORM queue_stats_bump(OLD.tenant_id, -was_queued, -was_active, false);
    PERFORM queue_stats_bump(NEW.tenant_id, is_queued, is_active, served);
  END IF;
  IF was_queued = 1 THEN
    -- Left its line (claimed, cancelled) or moved within it (a new priority): a claim ends
    -- here, with one update of the job's own line.
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

CREATE FUNCTION jobs_queue_on_delete() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  g record;
BEGIN
  FOR g IN
    SELECT tenant_id,
           count(*) FILTER (WHERE status = 'queued') AS queued,
           count(*) FILTER (WHERE status IN ('running', 'cancelling')) AS running
      FROM deleted GROUP BY tenant_id
    HAVING count(*) FILTER (WHERE status IN ('queued', 'running', 'cancelling')) > 0
     ORDER BY tenant_id
  LOOP
    -- No row (the tenant itself is being deleted): nothing left to keep.
    UPDATE tenant_queue_stats SET queued = queued - g.queued, running = running - g.running
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

CREATE FUNCTION jobs_queue_on_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  DELETE FROM queue_heads;
  UPDATE tenant_queue_stats SET queued = 0, running = 0 WHERE queued <> 0 OR running <> 0;
  RETURN NULL;
END $$;

CREATE TRIGGER jobs_queue_on_insert AFTER INSERT ON jobs
  REFERENCING NEW TABLE AS inserted
  FOR EACH STATEMENT EXECUTE FUNCTION jobs_queue_on_insert();
-- Row by row, and only when a job moves in the queue (not on heartbeats or progress).
CREATE TRIGGER jobs_queue_on_update AFTER UPDATE ON jobs
  FOR EACH ROW WHEN (
    OLD.status IS DISTINCT FROM NEW.status OR OLD.priority IS DISTINCT FROM NEW.priority
    OR OLD.created_at IS DISTINCT FROM NEW.created_at OR OLD.id IS DISTINCT FROM NEW.id
    OR OLD.tenant_id IS DISTINCT FROM NEW.tenant_id
    OR OLD.base_model_id IS DISTINCT FROM NEW.base_model_id)
  EXECUTE FUNCTION jobs_queue_on_update();
CREATE TRIGGER jobs_queue_on_delete AFTER DELETE ON jobs
  REFERENCING OLD TABLE AS deleted
  FOR EACH STATEMENT EXECUTE FUNCTION jobs_queue_on_delete();
CREATE TRIGGER jobs_queue_on_truncate AFTER TRUNCATE ON jobs
  FOR EACH STATEMENT EXECUTE FUNCTION jobs_queue_on_truncate();
"""

BACKFILL = """
INSERT INTO tenant_queue_stats (tenant_id, queued, running, last_served_at)
SELECT t.id,
       count(j.id) FILTER (WHERE j.status = 'queued'),
       count(j.id) FILTER (WHERE j.status IN ('running', 'cancelling')),
       t.last_claimed_at
  FROM tenants t LEFT JOIN jobs j ON j.tenant_id = t.id
 GROUP BY t.id;

INSERT INTO queue_heads (tenant_id, base_model_id, queued, top_priority, head_created_at,
                         head_id, running, last_served_at)
SELECT DISTINCT ON (j.tenant_id, j.base_model_id) j.tenant_id, j.base_model_id,
       count(*) OVER (PARTITION BY j.tenant_id, j.base_model_id), j.priority, j.created_at, j.id,
       s.running, s.last_served_at
  FROM jobs j JOIN tenant_queue_stats s ON s.tenant_id = j.tenant_id
 WHERE j.status = 'queued'
 ORDER BY j.tenant_id, j.base_model_id, j.priority DESC, j.created_at, j.id;
"""

DROP_FUNCTIONS = """
DROP TRIGGER jobs_queue_on_truncate ON jobs;
DROP TRIGGER jobs_queue_on_delete ON jobs;
DROP TRIGGER jobs_queue_on_update ON jobs;
DROP TRIGGER jobs_queue_on_insert ON jobs;
DROP FUNCTION jobs_queue_on_truncate();
DROP FUNCTION jobs_queue_on_delete();
DROP FUNCTION jobs_queue_on_update();
DROP FUNCTION jobs_queue_on_insert();
DROP FUNCTION queue_heads_remove(text, text, int);
DROP FUNCTION queue_heads_add(text, text, int, int, timestamptz, text);
DROP FUNCTION queue_heads_copy_tenant(text, text);
DROP FUNCTION queue_stats_bump(text, int, int, boolean);
"""

# The order of a line's jobs (and of the lines themselves), as the claim ranks them.
FRONT = ['top_priority DESC', 'running', 'last_served_at NULLS FIRST', 'head_created_at', 'head_id']


def upgrade() -> None:
    op.create_table(
        'tenant_queue_stats',
        sa.Column('tenant_id', sa.String(length=64), nullable=False),
        sa.Column('queued', sa.Integer(), server_default='0', nullable=False),
        sa.Column('running', sa.Integer(), server_default='0', nullable=False),
        sa.Column('last_served_at', sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ['tenant_id'], ['tenants.id'],
            name=op.f('fk_tenant_queue_stats_tenant_id_tenants'), ondelete='CASCADE',
        ),
        sa.PrimaryKeyConstraint('tenant_id', name=op.f('pk_tenant_queue_stats')),
    )
    op.create_table(
        'queue_heads',
        sa.Column('tenant_id', sa.String(length=64), nullable=False),
        sa.Column('base_model_id', sa.String(length=64), nullable=False),
        sa.Column('queued', sa.Integer(), server_default='0', nullable=False),
        sa.Column('top_priority', sa.Integer(), nullable=True),
        sa.Column('head_created_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('head_id', sa.String(length=64), nullable=True),
        sa.Column('running', sa.Integer(), server_default='0', nullable=False),
        sa.Column('last_served_at', sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ['tenant_id'], ['tenants.id'],
            name=op.f('fk_queue_heads_tenant_id_tenants'), ondelete='CASCADE',
        ),
        sa.ForeignKeyConstraint(
            ['base_model_id'], ['base_models.id'],
            name=op.f('fk_queue_heads_base_model_id_base_models'), ondelete='CASCADE',
        ),
        sa.PrimaryKeyConstraint('tenant_id', 'base_model_id', name=op.f('pk_queue_heads')),
    )
    op.create_index(
        'ix_queue_heads_front', 'queue_heads', [sa.text(c) for c in FRONT],
        postgresql_where=sa.text('queued > 0'),
    )
    op.create_index(
        'ix_queue_heads_base_front', 'queue_heads',
        ['base_model_id', *(sa.text(c) for c in FRONT)],
        postgresql_where=sa.text('queued > 0'),
    )
    op.create_index(
        'ix_jobs_queue_front', 'jobs',
        ['tenant_id', 'base_model_id', sa.text('priority DESC'), 'created_at', 'id'],
        postgresql_where=sa.text("status = 'queued'"),
    )
    # Keyset pages of a tenant's jobs, (created_at, id) descending, straight from the index.
    op.create_index('ix_jobs_tenant_created_id', 'jobs', ['tenant_id', 'created_at', 'id'])
    op.drop_index('ix_jobs_tenant_created', table_name='jobs')
    op.execute(FUNCTIONS)
    op.execute(BACKFILL)


def downgrade() -> None:
    op.execute(DROP_FUNCTIONS)
    op.create_index('ix_jobs_tenant_created', 'jobs', ['tenant_id', 'created_at'])
    op.drop_index('ix_jobs_tenant_created_id', table_name='jobs')
    op.drop_index('ix_jobs_queue_front', table_name='jobs')
    op.drop_index('ix_queue_heads_base_front', table_name='queue_heads')
    op.drop_index('ix_queue_heads_front', table_name='queue_heads')
    op.drop_table('queue_heads')
    op.drop_table('tenant_queue_stats')
