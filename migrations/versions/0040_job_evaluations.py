"""a job's evaluations in an index of their own: a comparison reads its lowest eval loss

Revision ID: 0040
Revises: 0039
Create Date: 2026-12-06 04:20:00.000000

The dashboard's comparison of jobs (`/jobs/compare`) shows each job's lowest eval loss, of every
evaluation it reported (its chart's points are bucket means past 1,000 of them, and would hide
it). Read off `ix_job_events_job_id_id`, that walked every event of the job, its metrics and log
lines, for its few evaluations: 18.6 ms a job of 100,000 steps (measured), twelve of them a
page, again at each redraw of a comparison that follows running jobs. A job's evaluations now
have a partial index of their own, as its status changes have (revision 0011): only events
with an `eval_loss` enter it, so a step's metrics write nothing more, and statistics on
`data -> 'eval_loss'` tell the planner how rare they are.

Built `CONCURRENTLY` (outside the migrations' transaction), as revision 0011 builds its index.
"""

from alembic import op
import sqlalchemy as sa

revision = '0040'
down_revision = '0039'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.create_index(
            'ix_job_events_evaluations', 'job_events', ['job_id'],
            postgresql_where=sa.text("(data -> 'eval_loss') IS NOT NULL"),
            postgresql_concurrently=True,
        )
    op.execute("CREATE STATISTICS job_events_eval_loss ON (data -> 'eval_loss') FROM job_events")
    op.execute('ANALYZE job_events')


def downgrade() -> None:
    op.execute('DROP STATISTICS job_events_eval_loss')
    op.drop_index('ix_job_events_evaluations', table_name='job_events')
