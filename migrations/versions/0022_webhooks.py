"""webhooks: a tenant's endpoints and the deliveries of its events, written with the change

Revision ID: 0022
Revises: 0021
Create Date: 2026-12-04 22:40:00.000000

A tenant registers endpoints (`webhook_endpoints`: a URL, the secret its deliveries are signed
with, the event types it takes, none: every one) and the platform posts its events there,
signed per the Standard Webhooks spec, at least once, with a delivery log
(`webhook_deliveries`, one row per event and endpoint: what was sent, each attempt's outcome,
when the next is due). The rows are the outbox: they are written by triggers in the statement
that makes the event, so no path that ends a job (a finish, a failure, a cancel one at a time or
by sweep, the reaper, a dataset refused) or publishes a version can commit without them, and
none is written for a change that rolls back. `control_plane.webhooks` delivers them.

- `fine_tuning.job.succeeded`, `.failed`, `.cancelled`: a job reaching that status (OpenAI's
  event types, with OpenAI's payload: `{"id": "evt_...", "object": "event", "created_at",
  "type", "data": {"id": <job id>, ...}}`);
- `adapter.version.created` and `adapter.version.deleted`: a version published to the
  registry, or deleted from it;
- `adapter.alias.updated`: an alias set, moved or deleted (`to_version` null), as its history
  records it.

A registry rebuilt from the bucket's manifests (`loraforge registry rebuild`) restores old
versions and alias history: it sets `loraforge.replaying` for its transaction and no event is
written for what it restores.

The trigger on `jobs` fires only for a status change into a finished status (its WHEN clause
reads the row alone), so the claim and the heartbeat never run it, and a finish with no endpoint
registered costs one probe of an empty partial index.
"""

from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0022'
down_revision = '0021'
branch_labels = None
depends_on = None

FUNCTIONS = """
-- One delivery row per live endpoint of p_tenant that takes p_type, all of one event.
CREATE FUNCTION webhook_enqueue(p_tenant text, p_type text, p_data jsonb) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
  evt text := 'evt_' || replace(gen_random_uuid()::text, '-', '');
BEGIN
  IF p_tenant IS NULL OR current_setting('loraforge.replaying', true) = 'on' THEN
    RETURN;
  END IF;
  INSERT INTO webhook_deliveries (id, endpoint_id, event_id, event_type, payload)
  SELECT 'msg_' || replace(gen_random_uuid()::text, '-', ''), e.id, evt, p_type,
         jsonb_build_object('id', evt, 'object', 'event',
                            'created_at', floor(extract(epoch FROM now()))::bigint,
                            'type', p_type, 'data', p_data)
  FROM webhook_endpoints e
  WHERE e.tenant_id = p_tenant AND e.disabled_at IS NULL
    AND (e.event_types IS NULL OR p_type = ANY(e.event_types));
END $$;

CREATE FUNCTION webhook_job_finished() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  -- Most finishes are of tenants with no endpoint: one probe, and nothing built for them.
  IF NOT EXISTS (SELECT 1 FROM webhook_endpoints e
                 WHERE e.tenant_id = NEW.tenant_id AND e.disabled_at IS NULL) THEN
    RETURN NULL;
  END IF;
  PERFORM webhook_enqueue(NEW.tenant_id, 'fine_tuning.job.' || NEW.status,
    jsonb_build_object('id', NEW.id, 'object', 'fine_tuning.job', 'status', NEW.status,
                       'model', (SELECT name FROM base_models WHERE id = NEW.base_model_id),
                       'fine_tuned_model', NEW.fine_tuned_model,
                       'trained_tokens', NEW.trained_tokens,
                       'error', CASE WHEN NEW.error_code IS NULL THEN NULL ELSE
                         jsonb_build_object('code', NEW.error_code,
                                            'message', NEW.error_message,
                                            'param', NEW.error_param) END,
                       'metadata', NEW.user_metadata));
  RETURN NULL;
END $$;

-- A version published or deleted (a deleted adapter's versions go with it unannounced: its
-- row is gone, so is its tenant's name for it).
CREATE FUNCTION webhook_version_changed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  v adapter_versions;
  a record;
BEGIN
  IF TG_OP = 'INSERT' THEN v := NEW; ELSE v := OLD; END IF;
  SELECT tenant_id, name INTO a FROM adapters WHERE id = v.adapter_id;
  PERFORM webhook_enqueue(a.tenant_id,
    CASE WHEN TG_OP = 'INSERT' THEN 'adapter.version.created' ELSE 'adapter.version.deleted' END,
    jsonb_build_object('id', v.id, 'object', 'adapter.version', 'adapter', a.name,
                       'version', v.number, 'job_id', v.job_id));
  RETURN NULL;
END $$;

CREATE FUNCTION webhook_alias_updated() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  a record;
BEGIN
  SELECT tenant_id, name INTO a FROM adapters WHERE id = NEW.adapter_id;
  PERFORM webhook_enqueue(a.tenant_id, 'adapter.alias.updated',
    jsonb_build_object('id', NEW.alias, 'object', 'adapter.alias', 'adapter', a.name,
                       'alias', NEW.alias, 'from_version', NEW.from_version,
                       'to_version', NEW.to_version, 'by', NEW.actor_key_id));
  RETURN NULL;
END $$;

CREATE TRIGGER webhook_job_finished AFTER UPDATE OF status ON jobs FOR EACH ROW
  WHEN (NEW.status IN ('succeeded', 'failed', 'cancelled')
        AND OLD.status IS DISTINCT FROM NEW.status)
  EXECUTE FUNCTION webhook_job_finished();

CREATE TRIGGER webhook_version_changed AFTER INSERT OR DELETE ON adapter_versions FOR EACH ROW
  EXECUTE FUNCTION webhook_version_changed();

CREATE TRIGGER webhook_alias_updated AFTER INSERT ON alias_events FOR EACH ROW
  EXECUTE FUNCTION webhook_alias_updated();
"""


def upgrade() -> None:
    op.create_table(
        'webhook_endpoints',
        sa.Column('id', sa.String(length=64), nullable=False),
        sa.Column('tenant_id', sa.String(length=64), nullable=False),
        sa.Column('url', sa.Text(), nullable=False),
        sa.Column('secret', sa.Text(), nullable=False),
        sa.Column('event_types', postgresql.ARRAY(sa.Text()), nullable=True),
        sa.Column('description', sa.String(length=256), server_default='', nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.Column('disabled_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('previous_secret', sa.Text(), nullable=True),
        sa.Column('previous_secret_until', sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_webhook_endpoints_tenant_id_tenants'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_webhook_endpoints')),
    )
    op.create_index('ix_webhook_endpoints_live', 'webhook_endpoints', ['tenant_id'], unique=False, postgresql_where=sa.text('disabled_at IS NULL'))
    op.create_index('ix_webhook_endpoints_tenant_created', 'webhook_endpoints', ['tenant_id', 'created_at', 'id'], unique=False)
    op.create_table(
        'webhook_deliveries',
        sa.Column('id', sa.String(length=64), nullable=False),
        sa.Column('endpoint_id', sa.String(length=64), nullable=False),
        sa.Column('event_id', sa.String(length=64), nullable=False),
        sa.Column('event_type', sa.String(length=64), nullable=False),
        sa.Column('payload', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column('status', sa.String(length=16), server_default='pending', nullable=False),
        sa.Column('attempts', sa.Integer(), server_default='0', nullable=False),
        sa.Column('next_attempt_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.Column('last_status_code', sa.Integer(), nullable=True),
        sa.Column('last_error', sa.Text(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.Column('delivered_at', sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("status IN ('pending', 'delivered', 'failed')", name=op.f('ck_webhook_deliveries_status')),
        sa.ForeignKeyConstraint(['endpoint_id'], ['webhook_endpoints.id'], name=op.f('fk_webhook_deliveries_endpoint_id_webhook_endpoints'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_webhook_deliveries')),
    )
    op.create_index('ix_webhook_deliveries_due', 'webhook_deliveries', ['next_attempt_at'], unique=False, postgresql_where=sa.text("status = 'pending'"))
    op.create_index('ix_webhook_deliveries_endpoint_created', 'webhook_deliveries', ['endpoint_id', 'created_at', 'id'], unique=False)
    op.execute(FUNCTIONS)


def downgrade() -> None:
    op.execute("DROP TRIGGER webhook_alias_updated ON alias_events")
    op.execute("DROP TRIGGER webhook_version_changed ON adapter_versions")
    op.execute("DROP TRIGGER webhook_job_finished ON jobs")
    op.execute("DROP FUNCTION webhook_alias_updated()")
    op.execute("DROP FUNCTION webhook_version_changed()")
    op.execute("DROP FUNCTION webhook_job_finished()")
    op.execute("DROP FUNCTION webhook_enqueue(text, text, jsonb)")
    op.drop_index('ix_webhook_deliveries_endpoint_created', table_name='webhook_deliveries')
    op.drop_index('ix_webhook_deliveries_due', table_name='webhook_deliveries', postgresql_where=sa.text("status = 'pending'"))
    op.drop_table('webhook_deliveries')
    op.drop_index('ix_webhook_endpoints_tenant_created', table_name='webhook_endpoints')
    op.drop_index('ix_webhook_endpoints_live', table_name='webhook_endpoints', postgresql_where=sa.text('disabled_at IS NULL'))
    op.drop_table('webhook_endpoints')
