"""queue lines know their tenant's running limit: a line at its limit leaves the claim's index

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-03 02:50:00.000000

The claim walks `ix_queue_heads_front` (the lines in the claim's order) for the first lines
whose tenant is under its running limit. The limit was read off `tenants` for each line walked,
so every line at its limit that ranks ahead cost the walk a row and a probe: 5,000 free-tier
tenants holding their one running job, or 5,000 tenants at the default limit with jobs of a
higher priority, made a claim of another tenant's job 16.6 ms instead of 3.4 (one claimer,
claim + complete, measured). Each line now carries its tenant's limit (`max_running`: the
tenant's own, or the platform's default) and `saturated` (running at or over it, a stored
generated column, so every write of `running` keeps it); the two front indexes hold only the
lines with something queued that are not saturated, and the walk reads no line it must skip.

The platform's default limit is a setting of the claimers (`max_running_jobs_per_tenant`), so
the database keeps the one its lines were flagged against (`queue_settings`); a claim whose
default differs sets it and re-flags the lines first (`JobQueue.claim`). A line created takes its
limit from its tenant and that default (a trigger before insert); a tenant whose limit changes
re-flags its lines (a trigger on `tenants`). 4 is the settings' default.
"""

from alembic import op
import sqlalchemy as sa

revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None

FRONT = ['top_priority DESC', 'running', 'last_served_at NULLS FIRST', 'head_created_at', 'head_id']
SETTINGS_DEFAULT = 4

FUNCTIONS = """
-- A new line's limit: its tenant's own, else the default its lines are flagged against (no
-- limit when that row is gone: the claim then finds the default unset and sets it first).
CREATE FUNCTION queue_heads_take_limit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  NEW.max_running := coalesce(
    (SELECT t.max_running_jobs FROM tenants t WHERE t.id = NEW.tenant_id),
    (SELECT d.default_max_running FROM queue_settings d),
    2147483647);
  RETURN NEW;
END $$;

-- A tenant's limit changed: its lines take it, its bookkeeping row locked first (the lock order
-- of every change to a tenant's lines). A tenant without that row yet gets an empty one: the
-- insert waits for a transaction queueing the tenant's first job (which makes the row), so that
-- job's new line, read with its tenant's old limit, is there to update once it commits.
CREATE FUNCTION tenants_queue_limit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO tenant_queue_stats (tenant_id) VALUES (NEW.id) ON CONFLICT (tenant_id) DO NOTHING;
  PERFORM 1 FROM tenant_queue_stats s WHERE s.tenant_id = NEW.id FOR UPDATE;
  UPDATE queue_heads h
     SET max_running = coalesce(NEW.max_running_jobs,
                                (SELECT d.default_max_running FROM queue_settings d),
                                2147483647)
   WHERE h.tenant_id = NEW.id;
  RETURN NULL;
END $$;

CREATE TRIGGER queue_heads_take_limit BEFORE INSERT ON queue_heads
  FOR EACH ROW EXECUTE FUNCTION queue_heads_take_limit();
CREATE TRIGGER tenants_queue_limit AFTER UPDATE OF max_running_jobs ON tenants
  FOR EACH ROW WHEN (OLD.max_running_jobs IS DISTINCT FROM NEW.max_running_jobs)
  EXECUTE FUNCTION tenants_queue_limit();
"""

DROP_FUNCTIONS = """
DROP TRIGGER tenants_queue_limit ON tenants;
DROP TRIGGER queue_heads_take_limit ON queue_heads;
DROP FUNCTION tenants_queue_limit();
DROP FUNCTION queue_heads_take_limit();
"""


def _front_indexes(where: str) -> None:
    op.create_index(
        'ix_queue_heads_front', 'queue_heads', [sa.text(c) for c in FRONT],
        postgresql_where=sa.text(where),
    )
    op.create_index(
        'ix_queue_heads_base_front', 'queue_heads',
        ['base_model_id', *(sa.text(c) for c in FRONT)],
        postgresql_where=sa.text(where),
    )


def _drop_front_indexes() -> None:
    op.drop_index('ix_queue_heads_base_front', table_name='queue_heads')
    op.drop_index('ix_queue_heads_front', table_name='queue_heads')


def upgrade() -> None:
    op.create_table(
        'queue_settings',
        sa.Column('id', sa.SmallInteger(), server_default='1', nullable=False),
        sa.Column('default_max_running', sa.Integer(), nullable=False),
        sa.CheckConstraint('id = 1', name=op.f('ck_queue_settings_one_row')),
        sa.CheckConstraint(
            'default_max_running >= 1', name=op.f('ck_queue_settings_default_max_running')
        ),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_queue_settings')),
    )
    op.execute(f"INSERT INTO queue_settings (id, default_max_running) VALUES (1, {SETTINGS_DEFAULT})")
    op.add_column('queue_heads', sa.Column('max_running', sa.Integer(), nullable=True))
    op.execute(
        f"UPDATE queue_heads h SET max_running = coalesce(t.max_running_jobs, {SETTINGS_DEFAULT}) "
        "FROM tenants t WHERE t.id = h.tenant_id"
    )
    op.alter_column('queue_heads', 'max_running', nullable=False)
    op.add_column(
        'queue_heads',
        sa.Column(
            'saturated', sa.Boolean(), sa.Computed('running >= max_running', persisted=True),
            nullable=False,
        ),
    )
    _drop_front_indexes()
    _front_indexes('queued > 0 AND NOT saturated')
    op.execute(FUNCTIONS)


def downgrade() -> None:
    op.execute(DROP_FUNCTIONS)
    _drop_front_indexes()
    _front_indexes('queued > 0')
    op.drop_column('queue_heads', 'saturated')
    op.drop_column('queue_heads', 'max_running')
    op.drop_table('queue_settings')
