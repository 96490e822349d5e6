"""queue due wakes: a job that backed off wakes a trainer when it is due, and idle trainers poll
every 30 s instead of every 5 s

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-03 23:00:00.000000

Since revision 0017 a queued job wakes one sleeping trainer, but a job requeued to back off (a
retry, `run_after` later than now) wakes no one when it is requeued: a trainer woken then would
find nothing. It was found by the trainers' polls, every 5 s per idle trainer: a thousand idle
trainers claimed 200 times a second to find the few jobs that no wake-up announced.

`queue_wake_due()` is that announcement, run by celery's beat every 2 s
(`loraforge.wake_due_jobs`). It wakes one sleeper (`queue_wake`) for each job that backed off
and came due since the last pass: its window starts where the last pass's ended
(`queue_due_passes`, one row, locked by the pass, so two passes never announce one job twice).
The jobs that backed off are the queued ones with an attempt used (`attempt > 0`; a job not yet
run never backs off), found through a partial index on them (`ix_jobs_backing_off`): a job
queued for its first attempt never enters it.

When no due job woke anyone, a pass wakes one sleeper if a ready job is queued in a line whose
tenant is under its limit (`queue_heads`, its claimable lines): a safety net for a job that no
wake-up reached (its trainer went away with the wake-up, or a finish freed a tenant's slot while
its trainer took another tenant's job). A job waiting for its tenant's limit wakes no one: a
trainer woken for it would claim nothing.

So the trainers' poll can be long (`control_plane.wakeups.IDLE_POLL_S`, 30 s): it now only
bounds what a lost wake-up costs where beat does not run.
"""

from alembic import op
import sqlalchemy as sa

revision = '0018'
down_revision = '0017'
branch_labels = None
depends_on = None

FUNCTIONS = """
-- Wake one sleeper for each job that backed off and came due since the last pass; when none
-- did, one sleeper if a ready job is queued where its tenant is under its limit. Returns the
-- wake-ups sent.
CREATE FUNCTION queue_wake_due() RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
  last_pass timestamptz;
  this_pass timestamptz;
  base text;
  woken integer := 0;
BEGIN
  SELECT passed_at INTO last_pass FROM queue_due_passes WHERE id = 1 FOR UPDATE;
  IF NOT FOUND THEN  -- a database restored without the row
    INSERT INTO queue_due_passes (id) VALUES (1) ON CONFLICT (id) DO NOTHING;
    SELECT passed_at INTO last_pass FROM queue_due_passes WHERE id = 1 FOR UPDATE;
  END IF;
  -- A pass that began before the last one committed ends its window where that one did.
  this_pass := greatest(now(), last_pass);
  UPDATE queue_due_passes SET passed_at = this_pass WHERE id = 1;
  FOR base IN
    SELECT j.base_model_id FROM jobs j
     WHERE j.status = 'queued' AND j.attempt > 0
       AND j.run_after <= this_pass AND j.run_after > coalesce(last_pass, '-infinity')
     ORDER BY j.run_after
  LOOP
    PERFORM queue_wake(base);
    woken := woken + 1;
  END LOOP;
  IF woken = 0
     AND EXISTS (SELECT 1 FROM queue_sleepers s WHERE s.stale_after > clock_timestamp()) THEN
    -- A ready job in a line whose tenant is under its limit (off the claimable lines' index:
    -- a job waiting for its tenant's limit wakes no one).
    SELECT h.base_model_id INTO base FROM queue_heads h
     WHERE h.queued > 0 AND NOT h.saturated
       AND EXISTS (SELECT 1 FROM jobs j
                    WHERE j.tenant_id = h.tenant_id AND j.base_model_id = h.base_model_id
                      AND j.status = 'queued' AND j.run_after <= now())
     LIMIT 1;
    IF FOUND THEN
      PERFORM queue_wake(base);
      woken := 1;
    END IF;
  END IF;
  RETURN woken;
END $$;
"""


def upgrade() -> None:
    op.create_table(
        'queue_due_passes',
        sa.Column('id', sa.SmallInteger(), server_default='1', nullable=False),
        sa.Column('passed_at', sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint('id = 1', name=op.f('ck_queue_due_passes_one_row')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_queue_due_passes')),
    )
    op.execute("INSERT INTO queue_due_passes (id) VALUES (1)")
    op.create_index(
        'ix_jobs_backing_off', 'jobs', ['run_after'],
        postgresql_where=sa.text("status = 'queued' AND attempt > 0"),
    )
    op.execute(FUNCTIONS)


def downgrade() -> None:
    op.execute("DROP FUNCTION queue_wake_due()")
    op.drop_index(
        'ix_jobs_backing_off', table_name='jobs',
        postgresql_where=sa.text("status = 'queued' AND attempt > 0"),
    )
    op.drop_table('queue_due_passes')
