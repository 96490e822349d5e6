"""queue sleepers: a queued job wakes one idle trainer, not every one

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-03 19:10:00.000000

Every job queued (validated, handed back, requeued by a retry or the reaper) notified
`loraforge_jobs`, on which every idle trainer listened; each of them woke and claimed. With T
trainers idle, one job cost T claims, T - 1 of them finding nothing: a platform with 100 idle
trainers and jobs arriving at 50 a second ran 5,000 claims a second for 50 jobs.

An idle trainer now puts itself among the sleepers (`queue_sleepers`: its own channel, the
base it holds resident, how long the row stands without being refreshed) and listens on its
own channel only. A job queued takes one sleeper out and notifies it (`queue_wake`): one that
holds the job's base resident first, then one that holds none, then the one idle longest; with
no sleeper, it notifies `loraforge_jobs` as before (for a listener that does not sleep here).

A wake-up is never lost between a trainer's empty claim and its sleep: the trainer registers,
then claims once more before it waits. An enqueuer takes a sleeper under a shared advisory lock
that it holds until it commits, and a trainer registers under the same lock held exclusively,
so its registration waits for every enqueuer that looked for sleepers before it, and the claim
after it sees their jobs. A trainer that took a job after its row was taken (the wake-up was
meant for a job it may not have claimed) passes one wake-up on (`control_plane.wakeups`). A
trainer refreshes its row each time its wait times out; the rows of trainers gone without
removing theirs are skipped once stale, and the reaper deletes them.
"""

from alembic import op
import sqlalchemy as sa

revision = '0017'
down_revision = '0016'
branch_labels = None
depends_on = None

# The advisory lock (its key, any number no other lock of the project uses) that orders
# registrations after the enqueuers that looked for sleepers.
SLEEPERS_LOCK = 1_703_926_171

FUNCTIONS = f"""
-- A job for p_base became claimable: wake one sleeper (its row taken out), preferring one that
-- holds p_base resident, then one that holds no base, then the one idle longest; with none,
-- notify loraforge_jobs. Returns the sleeper woken (NULL: none).
CREATE FUNCTION queue_wake(p_base text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
  woken text;
  wake_channel text;
BEGIN
  PERFORM pg_advisory_xact_lock_shared({SLEEPERS_LOCK});
  SELECT s.worker_id INTO woken FROM queue_sleepers s
   WHERE s.resident_base_id = p_base AND s.stale_after > clock_timestamp()
   ORDER BY s.since LIMIT 1 FOR UPDATE SKIP LOCKED;
  IF woken IS NULL THEN
    SELECT s.worker_id INTO woken FROM queue_sleepers s
     WHERE s.resident_base_id IS NULL AND s.stale_after > clock_timestamp()
     ORDER BY s.since LIMIT 1 FOR UPDATE SKIP LOCKED;
  END IF;
  IF woken IS NULL THEN
    SELECT s.worker_id INTO woken FROM queue_sleepers s
     WHERE s.stale_after > clock_timestamp()
     ORDER BY s.since LIMIT 1 FOR UPDATE SKIP LOCKED;
  END IF;
  IF woken IS NULL THEN
    PERFORM pg_notify('loraforge_jobs', coalesce(p_base, ''));
    RETURN NULL;
  END IF;
  DELETE FROM queue_sleepers s WHERE s.worker_id = woken RETURNING s.channel INTO wake_channel;
  PERFORM pg_notify(wake_channel, coalesce(p_base, ''));
  RETURN woken;
END $$;

-- A trainer goes (or stays) to sleep on p_channel, holding p_base resident, its row standing
-- for p_patience seconds; after every enqueuer that looked for sleepers before it committed.
-- Returns whether its earlier row was still there (false: a job took it, or it had none).
CREATE FUNCTION queue_sleep(p_worker text, p_channel text, p_base text, p_patience float8)
RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_advisory_xact_lock({SLEEPERS_LOCK});
  UPDATE queue_sleepers s
     SET channel = p_channel, resident_base_id = p_base,
         stale_after = clock_timestamp() + make_interval(secs => p_patience)
   WHERE s.worker_id = p_worker;
  IF FOUND THEN
    RETURN true;
  END IF;
  INSERT INTO queue_sleepers (worker_id, channel, resident_base_id, stale_after)
  VALUES (p_worker, p_channel, p_base, clock_timestamp() + make_interval(secs => p_patience));
  RETURN false;
END $$;
"""

DROP_FUNCTIONS = """
DROP FUNCTION queue_sleep(text, text, text, float8);
DROP FUNCTION queue_wake(text);
"""


def upgrade() -> None:
    op.create_table(
        'queue_sleepers',
        sa.Column('worker_id', sa.String(length=128), nullable=False),
        sa.Column('channel', sa.String(length=63), nullable=False),
        sa.Column('resident_base_id', sa.String(length=64), nullable=True),
        sa.Column(
            'since', sa.DateTime(timezone=True), server_default=sa.text('clock_timestamp()'),
            nullable=False,
        ),
        sa.Column('stale_after', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('worker_id', name=op.f('pk_queue_sleepers')),
    )
    op.create_index(
        'ix_queue_sleepers_base', 'queue_sleepers', ['resident_base_id', 'since'],
    )
    op.create_index('ix_queue_sleepers_since', 'queue_sleepers', ['since'])
    op.execute(FUNCTIONS)


def downgrade() -> None:
    op.execute(DROP_FUNCTIONS)
    op.drop_index('ix_queue_sleepers_since', table_name='queue_sleepers')
    op.drop_index('ix_queue_sleepers_base', table_name='queue_sleepers')
    op.drop_table('queue_sleepers')
