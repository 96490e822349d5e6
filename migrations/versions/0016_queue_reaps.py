"""queue reaps: an idle trainer's poll reaps only when the platform's last reap is a while ago

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-03 17:00:00.000000

Every trainer reaped expired leases before each claim: an idle trainer at each poll and at each
wake-up, a busy one at each job's end. A reap reads every running job's lease (the expiry is
not indexed, so that a heartbeat stays a heap-only update: revision 0012), twice (its tenants'
rows locked first, then the reap): 7.7 ms of the server's time beside 10,000 running jobs, paid
by every trainer at every claim, where the claim itself reads a few rows.

`queue_reaps` holds when a trainer last reaped (one row). A trainer's claim reaps only when
that is at least its reap interval ago (a quarter of a lease, between 0.5 and 15 s), and
stamps it in the same statement that finds it due (`JobQueue.reap_if_due`): however many
trainers poll, the platform reaps about once an interval, and the others read one row. Celery's
beat still reaps every 15 s whatever the row says. Without the row, every claim reaps, as
before.
"""

from alembic import op
import sqlalchemy as sa

revision = '0016'
down_revision = '0015'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'queue_reaps',
        sa.Column('id', sa.SmallInteger(), server_default='1', nullable=False),
        sa.Column('reaped_at', sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint('id = 1', name=op.f('ck_queue_reaps_one_row')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_queue_reaps')),
    )
    op.execute("INSERT INTO queue_reaps (id) VALUES (1)")


def downgrade() -> None:
    op.drop_table('queue_reaps')
