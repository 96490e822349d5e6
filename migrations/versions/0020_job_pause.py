"""job pause: OpenAI's pause and resume of a fine-tuning job

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-04 12:30:00.000000

A job can be `paused`: out of the queue, holding no trainer, until it is resumed. A queued job
pauses at once; a running one is asked to (`pause_requested`, which its trainer learns at its
next heartbeat): it stops at the next step, saves a checkpoint and leaves its trainer, and a
resume queues it again to go on from that checkpoint. The bookkeeping triggers need no change:
they count a status they do not name as none of their columns (a job that pauses leaves its
line, or stops running; one resumed joins its line again).
"""

from alembic import op
import sqlalchemy as sa

revision = '0020'
down_revision = '0019'
branch_labels = None
depends_on = None

OLD = "('validating_files', 'queued', 'running', 'cancelling', 'succeeded', 'failed', 'cancelled')"
NEW = (
    "('validating_files', 'queued', 'running', 'cancelling', 'paused', 'succeeded', 'failed', "
    "'cancelled')"
)


def upgrade() -> None:
    op.drop_constraint(op.f('ck_jobs_status'), 'jobs', type_='check')
    op.create_check_constraint(op.f('ck_jobs_status'), 'jobs', f'status IN {NEW}')
    op.add_column(
        'jobs',
        sa.Column('pause_requested', sa.Boolean(), server_default='false', nullable=False),
    )


def downgrade() -> None:
    # A paused job is queued again: the older schema has no such status.
    op.execute("UPDATE jobs SET status = 'queued', run_after = now() WHERE status = 'paused'")
    op.drop_column('jobs', 'pause_requested')
    op.drop_constraint(op.f('ck_jobs_status'), 'jobs', type_='check')
    op.create_check_constraint(op.f('ck_jobs_status'), 'jobs', f'status IN {OLD}')
