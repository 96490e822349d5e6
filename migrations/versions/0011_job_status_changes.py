"""a job's status changes in an index of their own: its timeline reads them, not its metrics

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02 19:20:00.000000

A job page's live panel shows the job's timeline, its events that record a change of status
(`data -> 'status'`), and is drawn again at each change the page's stream sends: for a training
job, every second or so as its metrics arrive. The timeline walked all of the job's events
through `ix_job_events_job_id_id` to find its few status changes, so a job 100,000 steps in read
100,000 events for each redraw (24–29 ms, measured), and more as it ran on. The status changes
of each job now have a partial index of their own: a job's handful of rows enters it, and its
metrics and log lines write nothing more. The planner, which cannot tell how rare a status
change is among events (its default guess for `IS NOT NULL` over an expression is nearly every
row), kept walking the primary key and filtering; statistics on `data -> 'status'` tell it, and
it reads the index (one table sample by ANALYZE here, then autovacuum's as the table grows).

Built `CONCURRENTLY` (outside the migrations' transaction), as revision 0010 builds its index.
"""

from alembic import op
import sqlalchemy as sa

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.create_index(
            'ix_job_events_status_changes', 'job_events', ['job_id', 'id'],
            postgresql_where=sa.text("(data -> 'status') IS NOT NULL"),
            postgresql_concurrently=True,
        )
    op.execute("CREATE STATISTICS job_events_status ON (data -> 'status') FROM job_events")
    op.execute('ANALYZE job_events')


def downgrade() -> None:
    op.execute('DROP STATISTICS job_events_status')
    op.drop_index('ix_job_events_status_changes', table_name='job_events')
