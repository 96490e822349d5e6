"""job metric rollups: a long job's loss curve read from at most a thousand rows

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-03 06:30:00.000000

The job page's loss chart (`metrics.json`) bucketed the job's metric events in PostgreSQL: two
passes over every metric event of the job, each parsing its JSON. For a job 100,000 steps into
its run that was 343 ms per page load (`downsampling` in `python -m benchmarks.dashboard`), and
it grew with every step the job logged.

`job_metric_rollups` keeps, per job, the sums of its train and eval points in buckets of
2, 4, 8, ... 65,536 steps (bucket = floor(step / width)): how many points, their steps' sum and
their losses' sum, and each bucket's first and last step. The chart takes the narrowest width
that cuts the job's steps into at most its thousand points and reads that width's rows: each
bucket's mean step and mean loss, as the bucketing of every event gave, from at most a thousand
rows however long the run.

A row trigger adds each metric event to its sixteen buckets as it is inserted, whoever inserts
it (a trainer of this version or of the last, during a rollout). Its `WHEN` is tested before
any function is called, so an event that is not metrics costs nothing more: the claim and the
finish each insert one, and a trigger per statement (any event's insert paying its call) made
the 8-claimer drain 11 % slower. A bucket's row is updated in place, which one transaction
inserting thousands of one job's metric events would pay for (each update of a row already
updated in that transaction walks its versions: 30,000 events took 7 minutes), so such a
transaction first sets `loraforge.metric_rollups` to `by_job` (no row is summed) and then sums
each job's events at once with `job_metric_rollups_rebuild(job)`
(`control_plane.events.metric_events_in_bulk`). Trainers insert one event per transaction.

Only numbers count (a step, a `train_loss` or an `eval_loss` that is a JSON number); the events
logged so far are summed here, with `job_events` locked against inserts meanwhile.
"""

from alembic import op
import sqlalchemy as sa

revision = '0015'
down_revision = '0014'
branch_labels = None
depends_on = None

# 2 ** 1 .. 2 ** 16 steps: a thousand buckets cover runs of up to 65 million steps.
WIDTHS = "ARRAY[2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]"

# An event's point: its step, and its losses where they are numbers.
POINT = """
  (e.data ->> 'step')::float8 AS step,
  CASE WHEN jsonb_typeof(e.data -> 'train_loss') = 'number'
       THEN (e.data ->> 'train_loss')::float8 END AS train,
  CASE WHEN jsonb_typeof(e.data -> 'eval_loss') = 'number'
       THEN (e.data ->> 'eval_loss')::float8 END AS eval
"""

# The buckets of the metric events in `{events}` (aliased `e`) that pass `{only}`, a row each.
SUM = f"""
SELECT p.job_id, w, floor(p.step / w)::bigint, min(p.step), max(p.step),
       count(p.train), coalesce(sum(p.step) FILTER (WHERE p.train IS NOT NULL), 0),
       coalesce(sum(p.train), 0),
       count(p.eval), coalesce(sum(p.step) FILTER (WHERE p.eval IS NOT NULL), 0),
       coalesce(sum(p.eval), 0)
FROM (
  SELECT e.job_id, {POINT} FROM {{events}}
  WHERE {{only}} e.type = 'metrics' AND jsonb_typeof(e.data -> 'step') = 'number'
) AS p
CROSS JOIN unnest({WIDTHS}) AS w
WHERE p.train IS NOT NULL OR p.eval IS NOT NULL
GROUP BY p.job_id, w, floor(p.step / w)
"""

COLUMNS = """(job_id, width, bucket, first_step, last_step,
   train_points, train_steps, train_losses, eval_points, eval_steps, eval_losses)"""

FUNCTIONS = f"""
CREATE FUNCTION job_metric_rollup() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO job_metric_rollups AS r {COLUMNS}
  {SUM.format(events="(SELECT NEW.job_id, NEW.type, NEW.data) AS e (job_id, type, data)", only="")}
  ON CONFLICT (job_id, width, bucket) DO UPDATE SET
    first_step = least(r.first_step, EXCLUDED.first_step),
    last_step = greatest(r.last_step, EXCLUDED.last_step),
    train_points = r.train_points + EXCLUDED.train_points,
    train_steps = r.train_steps + EXCLUDED.train_steps,
    train_losses = r.train_losses + EXCLUDED.train_losses,
    eval_points = r.eval_points + EXCLUDED.eval_points,
    eval_steps = r.eval_steps + EXCLUDED.eval_steps,
    eval_losses = r.eval_losses + EXCLUDED.eval_losses;
  RETURN NULL;
END $$;

-- A job's buckets summed again from all its events (after a transaction of many of them).
CREATE FUNCTION job_metric_rollups_rebuild(p_job text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
  DELETE FROM job_metric_rollups WHERE job_id = p_job;
  INSERT INTO job_metric_rollups {COLUMNS}
  {SUM.format(events="job_events e", only="e.job_id = p_job AND")};
END $$;

CREATE TRIGGER job_metric_rollup AFTER INSERT ON job_events
  FOR EACH ROW WHEN (
    NEW.type = 'metrics' AND jsonb_typeof(NEW.data -> 'step') = 'number'
    AND current_setting('loraforge.metric_rollups', true) IS DISTINCT FROM 'by_job'
  )
  EXECUTE FUNCTION job_metric_rollup();
"""

BACKFILL = f"INSERT INTO job_metric_rollups {COLUMNS} " + SUM.format(events="job_events e", only="")


def upgrade() -> None:
    op.create_table(
        'job_metric_rollups',
        sa.Column('job_id', sa.String(length=64), nullable=False),
        sa.Column('width', sa.Integer(), nullable=False),
        sa.Column('bucket', sa.BigInteger(), nullable=False),
        sa.Column('first_step', sa.Float(), nullable=False),
        sa.Column('last_step', sa.Float(), nullable=False),
        sa.Column('train_points', sa.Integer(), nullable=False),
        sa.Column('train_steps', sa.Float(), nullable=False),
        sa.Column('train_losses', sa.Float(), nullable=False),
        sa.Column('eval_points', sa.Integer(), nullable=False),
        sa.Column('eval_steps', sa.Float(), nullable=False),
        sa.Column('eval_losses', sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ['job_id'], ['jobs.id'],
            name=op.f('fk_job_metric_rollups_job_id_jobs'), ondelete='CASCADE',
        ),
        sa.PrimaryKeyConstraint('job_id', 'width', 'bucket', name=op.f('pk_job_metric_rollups')),
    )
    # The trigger first, in the table lock of the backfill: no event is summed twice or missed.
    op.execute("LOCK TABLE job_events IN SHARE MODE")
    op.execute(FUNCTIONS)
    op.execute(BACKFILL)


def downgrade() -> None:
    op.execute("DROP TRIGGER job_metric_rollup ON job_events")
    op.execute("DROP FUNCTION job_metric_rollup()")
    op.execute("DROP FUNCTION job_metric_rollups_rebuild(text)")
    op.drop_table('job_metric_rollups')
