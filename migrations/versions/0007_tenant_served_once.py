"""the tenant's served time kept in one place: tenant_queue_stats.last_served_at

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 05:30:00.000000

Revision 0006 moved the fair-share tie-breaker into `tenant_queue_stats.last_served_at` but
kept writing `tenants.last_claimed_at` beside it on every claim, for readers that no longer
exist: one more row update in every claim's transaction. The column goes; a downgrade brings
it back filled from the bookkeeping.
"""

from alembic import op
import sqlalchemy as sa

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None

BUMP = """
CREATE OR REPLACE FUNCTION queue_stats_bump(
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
  END IF;{tenants_update}
END $$;
"""

OLD_TENANTS_UPDATE = """
  IF served THEN
    -- Kept for readers of tenants.last_claimed_at; the claim reads tenant_queue_stats.
    UPDATE tenants SET last_claimed_at = queue_stats_bump.last_served_at WHERE id = p_tenant;
  END IF;"""


def upgrade() -> None:
    op.execute(BUMP.replace('{tenants_update}', ''))
    op.drop_column('tenants', 'last_claimed_at')


def downgrade() -> None:
    op.add_column('tenants', sa.Column('last_claimed_at', sa.DateTime(timezone=True), nullable=True))
    op.execute(
        "UPDATE tenants t SET last_claimed_at = s.last_served_at "
        "FROM tenant_queue_stats s WHERE s.tenant_id = t.id"
    )
    op.execute(BUMP.replace('{tenants_update}', OLD_TENANTS_UPDATE))
